"""Tiny random-weight Wan 2.1 T2V, VACE and turbo (FastWan) pipelines built from the real classes.

Used by tests, the CPU demo and ``MODEL_PROFILE=tiny``: the three output directories have the
layout of ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``, ``Wan-AI/Wan2.1-VACE-1.3B-diffusers`` and
``FastVideo/FastWan2.1-T2V-1.3B-Diffusers`` and load through ``WanPipeline`` and
``WanVACEPipeline.from_pretrained``. Their tokenizer, text encoder, VAE and scheduler are
byte-identical, so a worker can load them once and share them; the turbo transformer is the T2V
architecture with its own (random) weights, as FastWan is Wan 2.1 T2V 1.3B distilled.
"""

import math
import string
from collections import Counter
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
    WanVACEPipeline,
    WanVACETransformer3DModel,
)
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

SEED = 0
TEXT_DIM = 32  # UMT5 d_model == transformer text_dim
MAX_SEQUENCE_LENGTH = 512
CORPUS = [
    "A cat walks on the grass, realistic style, high quality, detailed.",
    "A cinematic shot of a red sports car driving along a coastal road at sunset.",
    "Two astronauts dance on the moon while the earth rises in the background.",
    "A close-up of a woman smiling, soft light, shallow depth of field, 4k video.",
    "Bright tones, overexposed, static, blurred details, subtitles, worst quality,",
    "low quality, JPEG artifacts, ugly, deformed, extra fingers, still picture.",
]
TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=16,
    out_channels=16,
    text_dim=TEXT_DIM,
    freq_dim=256,
    ffn_dim=48,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
)


def umt5_tokenizer() -> T5Tokenizer:
    """UMT5-style SentencePiece-Unigram tokenizer estimated from ``CORPUS``.

    Pieces are the corpus words and printable ASCII characters, scored by log
    frequency. Ids follow T5: ``<pad>``=0, ``</s>``=1 (appended), ``<unk>``=2.
    """
    counts = Counter(f"▁{word}" for line in CORPUS for word in line.split())
    counts.update("▁" + string.ascii_letters + string.digits + string.punctuation)
    total = sum(counts.values())
    pieces = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, math.log(count / total)) for piece, count in pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH)


def wan_scheduler() -> UniPCMultistepScheduler:
    """Wan 2.1's flow-matching UniPC scheduler (``flow_shift=3.0`` as for 480p)."""
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
    )


def build_tiny_wan(t2v_dir: Path, vace_dir: Path, turbo_dir: Path | None = None) -> None:
    """Write tiny, deterministic Wan T2V, VACE and (given its directory) turbo pipelines (a few MB each)."""
    torch.manual_seed(SEED)
    tokenizer = umt5_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    # Real Wan 2.1 VAE layout (8x spatial, 4x temporal, 16 latent channels), 4-channel base.
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, num_res_blocks=1)
    shared = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae)
    t2v = WanPipeline(**shared, scheduler=wan_scheduler(), transformer=WanTransformer3DModel(**TRANSFORMER))
    t2v.save_pretrained(t2v_dir)
    vace_transformer = WanVACETransformer3DModel(
        **TRANSFORMER,
        vace_layers=[0, 1],
        # video latents (16 inactive + 16 reactive) + 8x8 pixel mask folded (64)
        vace_in_channels=96,
    )
    vace = WanVACEPipeline(**shared, scheduler=wan_scheduler(), transformer=vace_transformer)
    vace.save_pretrained(vace_dir)
    if turbo_dir is not None:
        turbo = WanPipeline(
            **shared, scheduler=wan_scheduler(), transformer=WanTransformer3DModel(**TRANSFORMER)
        )
        turbo.save_pretrained(turbo_dir)
