"""A LoRA file read the way diffusers reads it, and its low-rank updates merged straight into weights.

Reading is diffusers': ``<Pipeline>.lora_state_dict`` recognises the key layouts (diffusers/PEFT,
kohya sd-scripts, A1111/Civitai, ComfyUI/Kijai, musubi) and converts them, then each component's
keys are converted to PEFT's names exactly as diffusers does before it loads them
(``convert_unet_state_dict_to_peft``; ``convert_state_dict_to_diffusers`` and
``convert_state_dict_to_peft`` for text encoders), and the scaling of each layer follows diffusers'
``get_peft_kwargs``: ``alpha / rank`` with the file's network alphas or adapter metadata, 1 without.

Merging is not PEFT's: PEFT wraps every adapted layer in an adapter module first, about 4 s for a
rank-64 SDXL LoRA of 964 layers on an H200 (docs/PERFORMANCE.md). Here each update is
``W += scale * scaling * up @ down``, computed on the weight's device, in the weight's own storage.
"""

from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils.state_dict_utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)

from src.contract import JobError

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
UNSUPPORTED = {"lora_magnitude_vector": "DoRA", ".lokr_": "LoKr", "lora_B.bias": "LoRA biases"}


@dataclass(frozen=True)
class Update:
    """One layer's low-rank update: ``weight += scale * scaling * up @ down``."""

    weight: torch.nn.Parameter
    down: torch.Tensor  # rank x in (x kh x kw for a convolution)
    up: torch.Tensor  # out x rank (x 1 x 1)
    scaling: float

    def delta(self, scale: float) -> torch.Tensor:
        """The update at ``scale``, in float32, shaped like the weight."""
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (product * (scale * self.scaling)).view(self.weight.shape)

    def merge(self, scale: float) -> None:
        with torch.no_grad():
            self.weight.add_(self.delta(scale).to(self.weight.dtype))


def low_rank_updates(
    pipe: Any, components: list[str], tensors: dict[str, torch.Tensor], family: str, field: str
) -> list[Update]:
    """Every layer update the LoRA ``tensors`` hold for ``pipe``'s ``components``; JobError naming
    ``field`` for a file that is no LoRA of these models or whose shapes do not fit."""
    for marker, kind in UNSUPPORTED.items():
        if any(marker in key for key in tensors):
            raise JobError(field, f"uses {kind}, which this worker does not apply")
    extra = {"unet_config": pipe.unet.config} if hasattr(pipe, "unet") else {}
    try:
        read = pipe.lora_state_dict(dict(tensors), return_lora_metadata=True, **extra)
    except Exception as err:  # diffusers' converters raise many kinds for a layout they do not know
        raise JobError(
            field, f"is not a LoRA diffusers can read for {family}: {type(err).__name__}: {err}"
        ) from None
    state, alphas, metadata = read if len(read) == 3 else (read[0], None, read[1])
    updates: list[Update] = []
    unknown: list[str] = []
    for component in components:
        model = getattr(pipe, component)
        part = _peft_names(_component(state, component), component)
        part_alphas = _peft_names(_component(_alphas(alphas), component), component)
        layers = _layers(model)
        scalings = _Scalings(part, part_alphas, _component_metadata(metadata, component))
        for key, down in part.items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key.removesuffix(".lora_A.weight")
            layer = _find(layers, name)
            if layer is None:
                unknown.append(f"{component}.{name}")
                continue
            update = Update(
                layer.weight, down, part[f"{name}.lora_B.weight"], scalings.of(name, down.shape[0])
            )
            if update.up.shape[0] * math.prod(down.shape[1:]) != layer.weight.numel():
                raise JobError(
                    field,
                    f"does not fit the {family} models: {component}.{name} is {tuple(layer.weight.shape)}, "
                    f"the LoRA's update is {update.up.shape[0]}x{'x'.join(map(str, down.shape[1:]))}",
                )
            updates.append(update)
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise JobError(field, f"has layers the {family} models do not have: {shown}")
    if not updates:
        raise JobError(field, f"matches no layer of the {family} models (a LoRA for another model?)")
    return updates


def _component(state: dict[str, Any], component: str) -> dict[str, Any]:
    return {k.removeprefix(f"{component}."): v for k, v in state.items() if k.split(".")[0] == component}


def _alphas(alphas: dict[str, float] | None) -> dict[str, Any]:
    """Network alphas keyed like the weights they scale (``<down weight key>.alpha`` -> the key)."""
    return {key.removesuffix(".alpha"): torch.tensor(float(value)) for key, value in (alphas or {}).items()}


def _peft_names(state: dict[str, Any], component: str) -> dict[str, Any]:
    """PEFT's names (``<layer>.lora_A.weight``), converted as diffusers converts them before loading."""
    if not state:
        return state
    if component in TEXT_ENCODERS:
        state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
        return {k.removeprefix("text_model."): v for k, v in state.items()}
    return state if any("lora_A" in key for key in state) else convert_unet_state_dict_to_peft(state)


def _component_metadata(metadata: dict[str, Any] | None, component: str) -> dict[str, Any]:
    if not metadata:
        return {}
    prefixed = {
        k.removeprefix(f"{component}."): v for k, v in metadata.items() if k.startswith(f"{component}.")
    }
    return prefixed or metadata


def _layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    }


def _find(layers: dict[str, torch.nn.Module], name: str) -> torch.nn.Module | None:
    """The layer called ``name``, or the one layer whose name ends with it (``text_model.`` prefixes)."""
    if name in layers:
        return layers[name]
    matches = [module for full, module in layers.items() if full.endswith(f".{name}")]
    return matches[0] if len(matches) == 1 else None


class _Scalings:
    """Each layer's ``alpha / rank``, as diffusers configures PEFT for the file (``get_peft_kwargs``)."""

    def __init__(self, state: dict[str, Any], alphas: dict[str, Any], metadata: dict[str, Any]) -> None:
        self.alphas = {k.removesuffix(".lora_A.weight"): float(v) for k, v in alphas.items()}
        values = list(self.alphas.values())
        self.default_alpha = collections.Counter(values).most_common(1)[0][0] if values else None
        self.metadata = metadata

    def of(self, name: str, rank: int) -> float:
        if self.metadata:
            alpha = _pattern(
                self.metadata.get("alpha_pattern") or {}, name, self.metadata.get("lora_alpha", rank)
            )
            rank = _pattern(self.metadata.get("rank_pattern") or {}, name, rank)
            return alpha / math.sqrt(rank) if self.metadata.get("use_rslora") else alpha / rank
        alpha = self.alphas.get(name, self.default_alpha)
        return 1.0 if alpha is None else alpha / rank


def _pattern(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's pattern lookup: the first key that matches the end of the layer's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
