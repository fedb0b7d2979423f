"""The Wan 2.1 family: T2V 1.3B for text-only jobs, VACE 1.3B for reference modes.

Both pipelines share one text encoder, tokenizer and VAE in memory.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
    WanVACEPipeline,
    WanVACETransformer3DModel,
)
from PIL import Image

from src import acceleration
from src.contract import JobError, JobRequest
from src.fast_path import FastPaths
from src.loras.apply import MergedLoras
from src.loras.files import LoraFiles
from src.media.assets import GeneratedImage, GeneratedVideo, Generation
from src.media.images import to_uint8
from src.media.reference import FetchLimits, fetch_reference
from src.models import device_map_kwargs, family_dir_names, model_dirs
from src.progress import Progress
from src.settings import Settings
from src.timing import Phases
from src.wan.compiled_blocks import block_kinds
from src.wan.conditioning import vace_inputs
from src.wan.plan import (
    DEFAULTS,
    FPS,
    MAX_FRAMES,
    TEXT_TOKENS,
    TURBO,
    WanConfig,
    WanMetadata,
    WanPlan,
    plan_wan,
)
from src.wan.turbo import DmdScheduler

log = logging.getLogger(__name__)

WARM_UP = {"width": 64, "height": 64, "num_frames": 5, "num_inference_steps": 1}
# With COMPILE on, the blocks run compiled at every size; inductor tunes them for this one
# (width, height, frames): the default video size.
TUNED_FOR = (832, 480, 81)
# The most tokens a job may have: the largest area (1280x720) at MAX_FRAMES, plus one latent frame for
# VACE's reference image.
MAX_SIZE = (1280, 720, MAX_FRAMES + 4)
MODEL_NAMES = {
    "t2v": "wan2.1-t2v-1.3b",
    "vace": "wan2.1-vace-1.3b",
    "turbo": "fastwan-1.3b",
}  # what each transformer is called in the asset metadata
TURBO_HINT = {
    "wan-turbo": "video_turbo's FastWan transformer is baked into wan-turbo/ by the builder (families wan); "
    "WAN_TURBO=false starts without it"
}


def video_tokens(pipe: WanPipeline, width: int, height: int, frames: int) -> int:
    """The transformer's tokens for a video: latent frames x latent height x width, per patch."""
    p_t, p_h, p_w = pipe.transformer.config.patch_size
    latent_frames = (frames - 1) // pipe.vae_scale_factor_temporal + 1
    spatial = pipe.vae_scale_factor_spatial
    return (latent_frames // p_t) * (height // spatial // p_h) * (width // spatial // p_w)


class WanFamily:
    """``video_*`` and ``image_*`` jobs on WanPipeline (T2V, and turbo: ``src/wan/turbo.py``) and
    WanVACEPipeline (reference modes)."""

    name = "wan"
    job_types = frozenset(DEFAULTS)
    config_model = WanConfig
    metadata_model = WanMetadata

    def __init__(
        self,
        text2video: WanPipeline,
        vace: WanVACEPipeline,
        turbo: WanPipeline | None,
        limits: FetchLimits,
        loras: LoraFiles,
        fast_paths: FastPaths,
    ) -> None:
        self.text2video = text2video
        self.vace = vace
        self.turbo = turbo  # None with WAN_TURBO=false
        self.pipes: dict[str, Any] = {"t2v": text2video, "vace": vace, "turbo": turbo}
        self.limits = limits
        self.loras = loras
        self.merged = {
            name: MergedLoras(pipe, ["transformer"], "Wan")
            for name, pipe in self.pipes.items()
            if pipe is not None
        }
        self.fast_paths = fast_paths

    @classmethod
    def load(cls, settings: Settings) -> WanFamily:
        """Load T2V, then VACE's and turbo's transformers only: encoder, tokenizer and VAE are shared."""
        from src.wan.tiny import build_tiny_wan

        names = family_dir_names("wan", settings)
        t2v_dir, vace_dir, *turbo_dir = model_dirs(settings, names, build_tiny_wan, TURBO_HINT)
        device = settings.torch_device
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        log.info("loading Wan T2V from %s and VACE from %s on %s (%s)", t2v_dir, vace_dir, device, dtype)
        on_device = device_map_kwargs(device)
        vae_dtype = getattr(torch, settings.wan_vae_dtype) if device.startswith("cuda") else torch.float32
        vae = AutoencoderKLWan.from_pretrained(t2v_dir, subfolder="vae", dtype=vae_dtype, **on_device)
        if device.startswith("cuda"):
            acceleration.conv3d_channels_last(vae)
        text2video = WanPipeline.from_pretrained(t2v_dir, vae=vae, dtype=dtype, **on_device)
        vace = WanVACEPipeline(
            tokenizer=text2video.tokenizer,
            text_encoder=text2video.text_encoder,
            vae=vae,
            scheduler=UniPCMultistepScheduler.from_pretrained(vace_dir, subfolder="scheduler"),
            transformer=WanVACETransformer3DModel.from_pretrained(
                vace_dir, subfolder="transformer", dtype=dtype, **on_device
            ),
        )
        turbo = None
        if turbo_dir:
            turbo = WanPipeline(
                tokenizer=text2video.tokenizer,
                text_encoder=text2video.text_encoder,
                vae=vae,
                scheduler=DmdScheduler(),
                transformer=WanTransformer3DModel.from_pretrained(
                    turbo_dir[0], subfolder="transformer", dtype=dtype, **on_device
                ),
            )
        pipes = [pipe for pipe in (text2video, vace, turbo) if pipe is not None]
        for pipe in pipes:
            if device != "cpu":
                pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
        transformers = [pipe.transformer for pipe in pipes]
        attention = acceleration.attention_backend(settings, device)
        acceleration.set_attention_backend(transformers, attention)
        kinds = []
        if acceleration.compile_enabled(settings, device):
            tokens = (video_tokens(text2video, *TUNED_FOR), video_tokens(text2video, *MAX_SIZE))
            here = not acceleration.compile_in_background(settings, device)  # else a child compiles them
            kinds = block_kinds(transformers, settings.compile_cache_path, tokens, attention, here)
        fast_paths = FastPaths(kinds, acceleration.required_settings(settings))
        limits = FetchLimits.from_settings(settings)
        return cls(text2video, vace, turbo, limits, LoraFiles.from_settings(settings), fast_paths)

    def warm_up(self, phases: Phases) -> None:
        """Run both pipelines once, small, so the first job pays no first-call cost; then prepare
        the fast paths.

        With COMPILE on, each block kind records its inputs during that run, and its package is
        then loaded (compiled and saved the first time).
        """
        with phases.phase("pipelines"):
            self.text2video("warm-up", **WARM_UP)
            gray = Image.new("RGB", (WARM_UP["width"], WARM_UP["height"]), (128, 128, 128))
            self.vace("warm-up", reference_images=[gray], **WARM_UP)
            if self.turbo is not None:
                self.turbo("warm-up", **{**WARM_UP, "guidance_scale": 1.0})
        self.fast_paths.prepare(phases)

    def plan(self, request: JobRequest) -> WanPlan:
        """Validate the Wan part of the payload."""
        if request.type == TURBO and self.turbo is None:
            raise JobError("type", "video_turbo is off on this worker (WAN_TURBO=false)")
        return plan_wan(request)

    def generate(self, plan: WanPlan, progress: Progress) -> Generation:
        """Fetch references and LoRAs, run T2V or VACE with the job's LoRAs merged (or none), return one
        video (or one image)."""
        images = {
            mode: fetch_reference(ref.url, ref.field, self.limits) for mode, ref in plan.references.items()
        }
        pipe = self.pipes[plan.model]
        loras = self.loras.resolve(plan.loras)
        try:
            self.merged[plan.model].use(loras)
        finally:
            self.loras.release(loras)
        frames = self._run(pipe, plan, images, progress)
        metadata: dict[str, Any] = {"model": MODEL_NAMES[plan.model]}
        if plan.denoise_strength is not None:
            metadata["denoise_strength"] = plan.denoise_strength
        if loras:
            metadata["loras"] = [lora.metadata for lora in loras]
        if plan.negative_prompt_ignored:
            metadata["negative_prompt_ignored"] = True
        metadata["negative_prompt_used"] = plan.negative_prompt
        if plan.is_video:
            metadata.update(steps=plan.steps, generation_seed=plan.seed, seed=plan.seed)
            asset: GeneratedImage | GeneratedVideo = GeneratedVideo(frames, FPS, metadata)
        else:
            metadata.update(
                steps=plan.steps,
                guidance_scale=plan.guidance_scale,
                seed=plan.seed,
                generation_seed=plan.seed,
            )
            asset = GeneratedImage(Image.fromarray(frames[0]), metadata, plan.output)
        return Generation([asset], reference_mode=plan.reference_mode)

    def _run(
        self,
        pipe: WanPipeline | WanVACEPipeline,
        plan: WanPlan,
        images: dict[str, Image.Image],
        progress: Progress,
    ) -> np.ndarray:
        def on_step(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            progress.step(step + 1, plan.steps)
            return tensors

        width, height = plan.size
        tokens = len(pipe.tokenizer(plan.prompt).input_ids)
        if tokens > TEXT_TOKENS:
            log.warning(
                "the prompt has %d tokens; UMT5 reads the first %d, the rest is cut", tokens, TEXT_TOKENS
            )
        generator = torch.Generator("cpu").manual_seed(plan.seed)
        if plan.model == "turbo":
            pipe.scheduler.generator = generator  # DMD re-noises each step from the job's generator
        else:
            pipe.scheduler = UniPCMultistepScheduler.from_config(
                pipe.scheduler.config, flow_shift=plan.flow_shift
            )
        extra = vace_inputs(plan, images) if images else {}
        with torch.inference_mode():
            output = pipe(
                prompt=plan.prompt,
                negative_prompt=plan.negative_prompt,
                width=width,
                height=height,
                num_frames=plan.num_frames,
                num_inference_steps=plan.steps,
                guidance_scale=plan.guidance_scale,
                generator=generator,
                callback_on_step_end=on_step,
                output_type="pt",
                **extra,
            )
            return to_uint8(output.frames[0])  # frames [T, 3, H, W]
