"""A job's LoRAs applied to a pipeline's models, and exactly undone after the job.

diffusers loads each file into the pipeline (``load_lora_weights``: PEFT adapters, every key layout
diffusers reads for the family: diffusers/PEFT, kohya, A1111/Civitai, ComfyUI, musubi), the job's
scales are set (``set_adapters``), and the adapters are fused into the base weights **in their own
storage** and removed (``fuse_lora``, ``unload_lora_weights``): the model keeps its plain layers,
so every fast path (the AOT-compiled packages, which run on the model's own tensors; the
CUDA-graphed text encoders) serves the job at its usual speed with the merged weights, and no job
compiles anything. Before fusing, each weight a LoRA touches is copied; after the job the copies
are written back into the same storage: the next job sees the exact bytes it would have seen had
no LoRA ever been loaded (no fuse/unfuse drift), and the copies are freed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from safetensors.torch import load_file

from src.contract import JobError, one_line
from src.loras.files import LoraFile

log = logging.getLogger(__name__)

ADAPTER = "job_lora_{}"


def _tuner_layers(models: list[torch.nn.Module]) -> Iterator[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in models:
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                yield module


class AppliedLoras:
    """The weights a job's LoRAs changed: their storage, and a copy of what was there before."""

    def __init__(self) -> None:
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (the model's storage, its original bytes)

    def save(self, layers: list[Any]) -> dict[int, tuple[torch.nn.Parameter, torch.Tensor]]:
        """Copy every base weight (and bias) the layers wrap; return each parameter and its storage."""
        storage: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        for layer in layers:
            base = layer.get_base_layer()
            for param in (base.weight, getattr(base, "bias", None)):
                if param is not None and id(param) not in storage:
                    storage[id(param)] = (param, param.data)
                    self.saved.append((param.data, param.data.clone()))
        return storage

    def restore(self) -> None:
        """Write the original bytes back into the model's storage; free the copies."""
        with torch.no_grad():
            for data, original in self.saved:
                data.copy_(original)
        self.saved = []


@contextmanager
def loras_applied(pipe: Any, components: list[str], files: list[LoraFile], family: str) -> Iterator[None]:
    """Within: ``pipe``'s ``components`` run with ``files`` merged at their scales."""
    if not files:
        yield
        return
    applied = AppliedLoras()
    models = [getattr(pipe, name) for name in components]
    try:
        _fuse(pipe, components, models, files, family, applied)
        yield
    finally:
        pipe.unload_lora_weights()  # a LoRA that failed half-way leaves no adapter behind
        applied.restore()
        if hasattr(pipe, "_merged_adapters"):
            pipe._merged_adapters = set()


def _fuse(
    pipe: Any,
    components: list[str],
    models: list[torch.nn.Module],
    files: list[LoraFile],
    family: str,
    applied: AppliedLoras,
) -> None:
    names = []
    device = next(models[0].parameters()).device
    for index, lora in enumerate(files):
        name = ADAPTER.format(index)
        state = load_file(str(lora.path), device=str(device))
        try:
            pipe.load_lora_weights(state, adapter_name=name, low_cpu_mem_usage=True)
        except Exception as err:  # diffusers and PEFT raise many kinds for a file that does not fit
            raise JobError(lora.field, f"does not fit the {family} models: {one_line(err)}") from None
        if not any(name in layer.lora_A for layer in _tuner_layers(models)):
            raise JobError(lora.field, f"matches no layer of the {family} models (a LoRA for another model?)")
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in files])
    layers = list(_tuner_layers(models))
    storage = applied.save(layers)
    with torch.no_grad():
        pipe.fuse_lora(components=components, adapter_names=names, lora_scale=1.0)
        for param, data in storage.values():
            if param.data.data_ptr() != data.data_ptr():  # a merge that made a new tensor: back into place
                data.copy_(param.data)
                param.data = data
    pipe.unload_lora_weights()
    log.info("LoRAs fused into %d layers: %s", len(layers), ", ".join(str(f.source) for f in files))
