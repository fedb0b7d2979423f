"""Tiny random-weight SDXL pipeline built from the real diffusers/transformers classes.

Used by tests, the CPU demo and ``MODEL_PROFILE=tiny``: the output directory has the
same layout as ``stabilityai/stable-diffusion-xl-base-1.0`` and loads through
``StableDiffusionXLPipeline.from_pretrained``. Images are noise, but every code path
(two text encoders, ``text_time`` conditioning, 8x VAE, Euler schedule) is real.
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from src.sdxl import TEXT_TOKENS

SEED = 0
TEXT_HIDDEN = (32, 32)  # text_encoder, text_encoder_2; their sum is the UNet cross_attention_dim
PROJECTION_DIM = 32  # text_encoder_2 pooled embedding size
TIME_EMBED_DIM = 8  # 6 micro-conditioning ids per sample -> 6 * 8 + PROJECTION_DIM inputs


def clip_tokenizer(pad_token: str) -> CLIPTokenizer:
    """Byte-level CLIP BPE tokenizer without merges (every character is one token)."""
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=[],
        pad_token=pad_token,
        model_max_length=TEXT_TOKENS,
    )


def _text_config(tokenizer: CLIPTokenizer, hidden_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=3,  # clip skip 2 reads hidden_states[-4]: three layers are the least that has it
        num_attention_heads=2,
        max_position_embeddings=TEXT_TOKENS,
        projection_dim=PROJECTION_DIM,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL base 1.0's scheduler configuration."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


def build_tiny_sdxl(target: Path) -> None:
    """Write a tiny, deterministic SDXL base pipeline (a few MB) to ``target``."""
    torch.manual_seed(SEED)
    tokenizer = clip_tokenizer(pad_token="<|endoftext|>")
    tokenizer_2 = clip_tokenizer(pad_token="!")
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        # SDXL's block layout (no attention at full latent resolution), tiny widths.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(1, 2, 4),  # head counts (diffusers naming); 16 channels per head
        use_linear_projection=True,
        transformer_layers_per_block=1,
        cross_attention_dim=sum(TEXT_HIDDEN),
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJECTION_DIM,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=1024,
        scaling_factor=0.13025,
        mid_block_add_attention=False,
    )
    text_encoder = CLIPTextModel(_text_config(tokenizer, TEXT_HIDDEN[0]))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, TEXT_HIDDEN[1]))
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
