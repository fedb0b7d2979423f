"""Build the true-size SDXL and Wan 2.1 architectures with random weights in the worker's layout.

Speed does not depend on weight values, so the benchmark runs on random weights
written exactly where and how the real baked weights live (see src/models.py):

- ``MODELS_DIR/sdxl``: StableDiffusionXLPipeline, fp16, fp16-fix VAE config (``force_upcast: false``)
- ``MODELS_DIR/wan-t2v``: WanPipeline, bf16 transformer and UMT5-XXL, fp32 VAE
- ``MODELS_DIR/wan-vace``, ``MODELS_DIR/wan-turbo``: ``model_index.json``, ``transformer/`` (bf16)
  and ``scheduler/`` only (the worker shares the rest from wan-t2v)
- ``MODELS_DIR/prompt``: Qwen2ForCausalLM with Qwen2.5-7B-Instruct's architecture, bf16

Modules are created on the GPU (fast init) directly in their storage dtype; weights are
then overwritten with a small random normal so activations stay finite. Tokenizers are
the tiny builders' (every id they produce is below the true vocab sizes).

Usage: python -m bench.build_models MODELS_DIR [--only sdxl,wan,prompt]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

SDXL_UNET = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True,
    norm_num_groups=32,
)
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=4,
    layers_per_block=2,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=False,  # the fp16-fix VAE production uses
)
WAN_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)


@torch.no_grad()
def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Small random normal weights (std 0.02, fan-in scaled for big matrices), norms at 1."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for name, param in module.named_parameters():
        if param.ndim <= 1:
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
        else:
            fan_in = param[0].numel()
            param.normal_(0.0, min(0.02, fan_in**-0.5), generator=gen)
    return module


def _on_gpu(dtype: torch.dtype, build):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            return build()
    finally:
        torch.set_default_dtype(previous)


def build_sdxl(target: Path) -> None:
    """SDXL base 1.0 layout, fp16."""
    from diffusers import (
        AutoencoderKL,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from src.sdxl.tiny import clip_tokenizer, sdxl_scheduler

    tokenizer = clip_tokenizer(pad_token="<|endoftext|>")
    tokenizer_2 = clip_tokenizer(pad_token="!")

    def clip_config(hidden: int, inter: int, layers: int, heads: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            projection_dim=1280,
            hidden_act=act,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    fp16 = torch.float16
    unet = _randomise(_on_gpu(fp16, lambda: UNet2DConditionModel(**SDXL_UNET)), 1)
    vae = _randomise(_on_gpu(fp16, lambda: AutoencoderKL(**SDXL_VAE)), 2)
    text_encoder = _randomise(
        _on_gpu(fp16, lambda: CLIPTextModel(clip_config(768, 3072, 12, 12, "quick_gelu"))), 3
    )
    text_encoder_2 = _randomise(
        _on_gpu(fp16, lambda: CLIPTextModelWithProjection(clip_config(1280, 5120, 32, 20, "gelu"))), 4
    )
    scheduler = sdxl_scheduler()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(target)


def build_wan(t2v_dir: Path, vace_dir: Path, turbo_dir: Path) -> None:
    """Wan 2.1 T2V 1.3B (bf16, UMT5-XXL bf16, VAE fp32), VACE 1.3B and FastWan 1.3B (each its
    transformer + scheduler; the worker shares T2V's encoder and VAE)."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel, WanVACETransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from src.wan.tiny import umt5_tokenizer, wan_scheduler

    bf16 = torch.bfloat16
    tokenizer = umt5_tokenizer()
    config = UMT5Config(
        vocab_size=256384,
        d_model=4096,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        d_kv=64,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    text_encoder = _randomise(_on_gpu(bf16, lambda: UMT5EncoderModel(config)), 5)
    transformer = _randomise(_on_gpu(bf16, lambda: WanTransformer3DModel(**WAN_TRANSFORMER)), 6)
    vae = _randomise(_on_gpu(torch.float32, AutoencoderKLWan), 7)
    t2v = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=wan_scheduler(),
        transformer=transformer,
    )
    t2v.save_pretrained(t2v_dir)
    del t2v, text_encoder, transformer
    torch.cuda.empty_cache()

    vace = _randomise(
        _on_gpu(
            bf16,
            lambda: WanVACETransformer3DModel(
                **WAN_TRANSFORMER, vace_layers=list(range(0, 30, 2)), vace_in_channels=96
            ),
        ),
        8,
    )
    turbo = _randomise(_on_gpu(bf16, lambda: WanTransformer3DModel(**WAN_TRANSFORMER)), 9)
    index = json.loads((t2v_dir / "model_index.json").read_text())
    for directory, transformer, pipeline in (
        (vace_dir, vace, "WanVACEPipeline"),
        (turbo_dir, turbo, "WanPipeline"),
    ):
        directory.mkdir(parents=True, exist_ok=True)
        transformer.save_pretrained(directory / "transformer")
        wan_scheduler().save_pretrained(directory / "scheduler")
        (directory / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline}, indent=2))


QWEN_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)  # Qwen2.5-7B-Instruct's architecture


def build_prompt(target: Path) -> None:
    """Qwen2.5-7B-Instruct's architecture, random bf16 weights, with the tiny tokenizer (its chat
    template and end-of-turn ids)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from src.prompt.tiny import END_OF_TEXT, IM_END, qwen_tokenizer

    tokenizer = qwen_tokenizer()
    end_ids = [tokenizer.convert_tokens_to_ids(token) for token in (IM_END, END_OF_TEXT)]
    model = _randomise(_on_gpu(torch.bfloat16, lambda: Qwen2ForCausalLM(Qwen2Config(**QWEN_7B))), 11)
    model.generation_config = GenerationConfig(eos_token_id=end_ids, pad_token_id=end_ids[1], do_sample=False)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def build(models_dir: Path, families: list[str]) -> dict[str, float]:
    """Build what is missing; returns seconds per family built."""
    times: dict[str, float] = {}
    jobs = {
        "sdxl": (["sdxl"], build_sdxl),
        "wan": (["wan-t2v", "wan-vace", "wan-turbo"], build_wan),
        "prompt": (["prompt"], build_prompt),
    }
    for family in families:
        names, builder = jobs[family]
        dirs = [models_dir / name for name in names]
        marker = "config.json" if family == "prompt" else "model_index.json"
        if all((d / marker).is_file() for d in dirs):
            continue
        started = time.perf_counter()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
        builder(*dirs)
        torch.cuda.empty_cache()
        times[family] = round(time.perf_counter() - started, 1)
        print(f"built {family} in {times[family]} s", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("--only", default="sdxl,wan")
    args = parser.parse_args()
    build(args.models_dir, args.only.split(","))


if __name__ == "__main__":
    main()
