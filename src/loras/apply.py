"""A job's LoRAs merged into a pipeline's models, and exactly undone before a job without them.

Each file's layer updates (``src/loras/merge.py``: read as diffusers reads it, every key layout it
knows for the family) are merged into the weights **in their own storage**: the models keep their
plain layers, so every fast path (the AOT-compiled packages, which run on the models' own tensors;
the CUDA-graphed text encoders) serves the job at its usual speed, and no job compiles anything.
Before merging, each weight a LoRA touches is copied; before the next job that asks for other
LoRAs (or none) the copies are written back into the same storage: that job sees the exact bytes it
would have seen had no LoRA ever been loaded (no merge/unmerge drift), and the copies are freed.
Consecutive jobs with the same LoRAs at the same scales keep them merged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from safetensors.torch import load_file

from src.loras.files import LoraFile
from src.loras.merge import low_rank_updates

log = logging.getLogger(__name__)


class AppliedLoras:
    """The weights a job's LoRAs changed: their storage, and a copy of what was there before."""

    def __init__(self) -> None:
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # storage, its original bytes

    def save(self, weights: list[torch.nn.Parameter]) -> None:
        """Copy each weight (once) before anything is merged into it."""
        for weight in weights:
            if id(weight) not in self.saved:
                self.saved[id(weight)] = (weight.data, weight.detach().clone())

    def restore(self) -> None:
        """Write the original bytes back into the model's storage; free the copies."""
        with torch.no_grad():
            for data, original in self.saved.values():
                data.copy_(original)
        self.saved = {}


class MergedLoras:
    """The LoRAs merged into one pipeline's models now. They stay merged while the following jobs ask
    for the same files at the same scales (nothing to do between them); any other job, with other
    LoRAs or none, first gets the original weights back."""

    def __init__(self, pipe: Any, components: list[str], family: str) -> None:
        self.pipe = pipe
        self.components = components
        self.family = family
        self.key: tuple[tuple[str, float], ...] = ()
        self._applied = AppliedLoras()

    def use(self, files: list[LoraFile]) -> None:
        """Make the models those of ``files`` merged at their scales (or the originals, for none)."""
        key = tuple((lora.sha256, lora.scale) for lora in files)
        if key == self.key:
            return
        self.clear()
        if not files:
            return
        self.key = key  # from here on, clear() undoes whatever part of the merging happened
        try:
            _merge(self.pipe, self.components, files, self.family, self._applied)
        except BaseException:
            self.clear()  # a LoRA that failed half-way leaves nothing behind
            raise

    def clear(self) -> None:
        """The original weights, exactly."""
        self._applied.restore()
        self.key = ()


def _merge(
    pipe: Any, components: list[str], files: list[LoraFile], family: str, applied: AppliedLoras
) -> None:
    device = next(getattr(pipe, components[0]).parameters()).device
    layers = 0
    for lora in files:
        tensors = load_file(str(lora.path), device=str(device))
        updates = low_rank_updates(pipe, components, tensors, family, lora.field)
        applied.save([update.weight for update in updates])
        for update in updates:
            update.merge(lora.scale)
        layers += len(updates)
    log.info("LoRAs merged into %d layers: %s", layers, ", ".join(str(f.source) for f in files))
