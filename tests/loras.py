"""Tiny LoRA files for the tiny models, in the key layouts real LoRAs come in, built by the tests.

One set of low-rank factors per layer (seeded), written in several layouts: the same factors give
the same merged weights whatever the layout, so a layout that diffusers reads wrongly shows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from safetensors.torch import save

SDXL_UNET_TARGETS = re.compile(r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
SDXL_TEXT_TARGETS = re.compile(r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
# What typical SDXL LoRAs of the community adapt: every attention and feed-forward projection of the
# UNet's transformer blocks, and the text encoders' attention and MLP.
SDXL_UNET_FULL = re.compile(
    r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$"
)
SDXL_TEXT_FULL = re.compile(r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])$")
WAN_TARGETS = re.compile(r"^blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ffn\.net\.(0\.proj|2))$")
# musubi / ComfyUI names of Wan's layers
WAN_NATIVE = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}  # fmt: skip


@dataclass(frozen=True)
class Factors:
    """``down`` (rank x in) and ``up`` (out x rank) per layer, and the alpha they were trained with."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alpha: float

    def delta(self, layer: str, scale: float = 1.0) -> torch.Tensor:
        """What merging adds to ``layer``'s weight: scale x alpha / rank x up @ down (in float64)."""
        down, up = self.layers[layer]
        return scale * self.alpha / down.shape[0] * (up.double() @ down.double())


def factors(
    model: torch.nn.Module, pattern: re.Pattern[str], rank: int, seed: int, prefix: str = ""
) -> Factors:
    """Random factors for every Linear of ``model`` whose name matches ``pattern`` (alpha = rank / 2)."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and pattern.search(name):
            down = torch.randn(rank, module.in_features, generator=generator) * 0.5
            up = torch.randn(module.out_features, rank, generator=generator) * 0.5
            layers[f"{prefix}{name}"] = (down, up)
    return Factors(layers, alpha=rank / 2)


def join(*parts: Factors) -> Factors:
    return Factors({k: v for part in parts for k, v in part.layers.items()}, parts[0].alpha)


def peft_layout(lora: Factors) -> dict[str, torch.Tensor]:
    """diffusers / PEFT: ``<model>.<layer>.lora_A.weight``, the alpha folded into lora_A."""
    out = {}
    for name, (down, up) in lora.layers.items():
        out[f"{name}.lora_A.weight"] = down * (lora.alpha / down.shape[0])
        out[f"{name}.lora_B.weight"] = up.clone()
    return out


def kohya_sdxl_layout(lora: Factors, layers_per_block: int) -> dict[str, torch.Tensor]:
    """kohya sd-scripts / A1111 / Civitai SDXL: SGM block names, ``lora_down``, ``lora_up``, ``alpha``."""
    out = {}
    for name, (down, up) in lora.layers.items():
        key = _sgm_unet(name, layers_per_block) if name.startswith("unet.") else _kohya_text(name)
        out[f"{key}.lora_down.weight"] = down.clone()
        out[f"{key}.lora_up.weight"] = up.clone()
        out[f"{key}.alpha"] = torch.tensor(lora.alpha)
    return out


def _sgm_unet(name: str, layers_per_block: int) -> str:
    """``unet.down_blocks.1.attentions.0.<rest>`` -> ``lora_unet_input_blocks_<i>_1_<rest>`` (kohya's
    SDXL names)."""
    found = re.match(r"unet\.(down_blocks|mid_block|up_blocks)\.?(\d*)\.?attentions\.(\d+)\.(.*)$", name)
    assert found, name
    kind, block, inner, rest = found.groups()
    if kind == "down_blocks":
        sgm = f"input_blocks_{1 + int(block) * (layers_per_block + 1) + int(inner)}_1"
    elif kind == "up_blocks":
        sgm = f"output_blocks_{int(block) * (layers_per_block + 1) + int(inner)}_1"
    else:
        sgm = "middle_block_1"
    return f"lora_unet_{sgm}_{rest.replace('.', '_')}"


def _kohya_text(name: str) -> str:
    encoder, rest = name.split(".", 1)
    prefix = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}[encoder]
    return f"{prefix}_{rest.replace('.', '_')}"


def musubi_wan_layout(lora: Factors) -> dict[str, torch.Tensor]:
    """musubi-tuner: ``lora_unet_blocks_<i>_self_attn_q.lora_down.weight`` and an ``alpha``."""
    out = {}
    for name, (down, up) in lora.layers.items():
        block, layer = re.match(r"transformer\.blocks\.(\d+)\.(.*)$", name).groups()
        key = f"lora_unet_blocks_{block}_{WAN_NATIVE[layer].replace('.', '_')}"
        out[f"{key}.lora_down.weight"] = down.clone()
        out[f"{key}.lora_up.weight"] = up.clone()
        out[f"{key}.alpha"] = torch.tensor(lora.alpha)
    return out


def comfy_wan_layout(lora: Factors) -> dict[str, torch.Tensor]:
    """ComfyUI / Kijai: ``diffusion_model.blocks.<i>.self_attn.q.lora_down.weight`` and an ``alpha``."""
    out = {}
    for name, (down, up) in lora.layers.items():
        block, layer = re.match(r"transformer\.blocks\.(\d+)\.(.*)$", name).groups()
        key = f"diffusion_model.blocks.{block}.{WAN_NATIVE[layer]}"
        out[f"{key}.lora_down.weight"] = down.clone()
        out[f"{key}.lora_up.weight"] = up.clone()
        out[f"{key}.alpha"] = torch.tensor(lora.alpha)
    return out


def to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """A safetensors file's bytes."""
    return save({k: v.contiguous() for k, v in tensors.items()})
