"""The SDXL family: one set of weights serving text-to-image and image-to-image."""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from PIL import Image

from src import acceleration
from src.contract import JobRequest
from src.fast_path import FastPath, FastPaths
from src.loras.apply import MergedLoras
from src.loras.files import LoraFiles
from src.media.assets import GeneratedImage, Generation
from src.media.images import fit_cover, size_for_aspect, to_uint8
from src.media.reference import FetchLimits, fetch_reference
from src.models import device_map_kwargs, family_dir_names, model_dirs
from src.progress import Progress
from src.sdxl.compiled_unet import CompiledUnet
from src.sdxl.compiled_vae import CompiledVaeDecode
from src.sdxl.graphed_encoders import GraphedTextEncoder
from src.sdxl.plan import DEFAULTS, SIZE_BOUNDS, SdxlConfig, SdxlMetadata, SdxlPlan, plan_sdxl
from src.sdxl.prompts import PromptEncoder
from src.sdxl.schedulers import scheduler_for
from src.settings import Settings
from src.timing import Phases

log = logging.getLogger(__name__)

REFERENCE_AREA = 1024 * 1024  # output area when the size follows the reference's aspect
WARM_UP_SIZE = 512
# With COMPILE on, the UNet and VAE decode are compiled for this image size; other sizes run eagerly.
COMPILED_SIZE = (1024, 1024)
LORA_COMPONENTS = ["unet", "text_encoder", "text_encoder_2"]  # what SDXL LoRAs adapt


class SdxlFamily:
    """``sdxl_image_fast`` / ``sdxl_image_high`` on StableDiffusionXL(Img2Img)Pipeline."""

    name = "sdxl"
    job_types = frozenset(DEFAULTS)
    config_model = SdxlConfig
    metadata_model = SdxlMetadata

    def __init__(
        self,
        text2img: StableDiffusionXLPipeline,
        img2img: StableDiffusionXLImg2ImgPipeline,
        limits: FetchLimits,
        loras: LoraFiles,
        fast_paths: FastPaths,
        warm_up_size: tuple[int, int] = (WARM_UP_SIZE, WARM_UP_SIZE),
    ) -> None:
        self.text2img = text2img
        self.img2img = img2img
        self.limits = limits
        self.loras = loras
        self.merged = MergedLoras(text2img, LORA_COMPONENTS, "SDXL")  # img2img shares the models
        self.prompts = PromptEncoder(text2img)
        self.scheduler_config = (
            text2img.scheduler.config
        )  # the model's own: every job's sampler starts from it
        self.fast_paths = fast_paths
        self.warm_up_size = warm_up_size

    @classmethod
    def load(cls, settings: Settings) -> SdxlFamily:
        """Load the weights once; the img2img pipeline shares every component."""
        from src.sdxl.tiny import build_tiny_sdxl

        (path,) = model_dirs(settings, family_dir_names("sdxl", settings), build_tiny_sdxl)
        device = settings.torch_device
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        log.info("loading SDXL from %s on %s (%s)", path, device, dtype)
        text2img = StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype, **device_map_kwargs(device))
        if device != "cpu":
            text2img.to(device)
        text2img.set_progress_bar_config(disable=True)
        # from_pipe casts the shared components to its dtype argument, float32 by default:
        # without it the UNet silently ran in float32 on the GPU, far slower than fp16.
        img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(text2img, dtype=dtype)
        img2img.set_progress_bar_config(disable=True)
        candidates: list[FastPath] = []
        warm_up_size = (WARM_UP_SIZE, WARM_UP_SIZE)
        if acceleration.compile_enabled(settings, device) and settings.compile_sdxl:
            scale = text2img.vae_scale_factor
            latent_size = (COMPILED_SIZE[1] // scale, COMPILED_SIZE[0] // scale)
            cache = settings.compile_cache_path
            here = not acceleration.compile_in_background(settings, device)  # else a child compiles them
            candidates += [
                CompiledUnet(text2img.unet, latent_size, cache, compile_missing=here),
                CompiledVaeDecode(text2img.vae, latent_size, cache, compile_missing=here),
            ]
            warm_up_size = COMPILED_SIZE
        if device.startswith("cuda") and settings.cuda_graphs:
            encoders = {
                "sdxl-text-encoder": text2img.text_encoder,
                "sdxl-text-encoder-2": text2img.text_encoder_2,
            }
            candidates += [GraphedTextEncoder(encoder, name) for name, encoder in encoders.items()]
        fast_paths = FastPaths(candidates, acceleration.required_settings(settings))
        limits = FetchLimits.from_settings(settings)
        return cls(text2img, img2img, limits, LoraFiles.from_settings(settings), fast_paths, warm_up_size)

    def warm_up(self, phases: Phases) -> None:
        """Prepare the fast paths, then run both pipelines once so the first job pays no first-call cost.

        With COMPILE on, the compiled UNet and VAE decode are loaded first (compiled and saved
        when missing: minutes, once per GPU type and version) and the pipelines run at
        COMPILED_SIZE; with CUDA_GRAPHS, the text encoders are captured.
        """
        self.fast_paths.prepare(phases)
        width, height = self.warm_up_size
        self.prompts.embed("a (warm:1.1) up", "warm-up", weighting=True, clip_skip=0)  # Compel's first call
        with torch.inference_mode():
            image = self.text2img("warm-up", width=width, height=height, num_inference_steps=2).images[0]
            self.img2img("warm-up", image=image, strength=0.5, num_inference_steps=2)

    def plan(self, request: JobRequest) -> SdxlPlan:
        """Validate the SDXL part of the payload."""
        return plan_sdxl(request)

    def generate(self, plan: SdxlPlan, progress: Progress) -> Generation:
        """Fetch the reference (if any) and the LoRAs, run the pipeline with the job's LoRAs merged (or
        none), return the images with metadata."""
        reference = None
        if plan.reference_url is not None:
            reference = fetch_reference(plan.reference_url, "metadata.reference_image_url", self.limits)
        size = plan.size or size_for_aspect(*reference.size, area=REFERENCE_AREA, **SIZE_BOUNDS)
        loras = self.loras.resolve(plan.loras)
        try:
            self.merged.use(loras)
        finally:
            self.loras.release(loras)
        images = self._run(plan, size, reference, progress)
        extra: dict[str, Any] = {}
        if plan.denoise_strength is not None:
            extra["denoise_strength"] = plan.denoise_strength
        if loras:
            extra["loras"] = [lora.metadata for lora in loras]
        extra.update(
            steps=plan.steps,
            guidance_scale=plan.guidance_scale,
            scheduler=plan.scheduler,
            negative_prompt_used=plan.negative_prompt,
        )
        assets = [
            GeneratedImage(image, {**extra, "seed": seed}, plan.output)
            for image, seed in zip(images, plan.seeds, strict=True)
        ]
        return Generation(assets, reference_mode="none" if reference is None else "single")

    def _run(
        self,
        plan: SdxlPlan,
        size: tuple[int, int],
        reference: Image.Image | None,
        progress: Progress,
    ) -> list[Image.Image]:
        def on_step(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            order = pipe.scheduler.order  # a second-order sampler (heun) calls back twice per step
            progress.step(min(plan.steps, -(-(step + 1) // order)), plan.steps)
            return tensors

        pipe = self.text2img if reference is None else self.img2img
        pipe.scheduler = scheduler_for(plan.scheduler, self.scheduler_config)  # a fresh one every job
        prompts = self.prompts.embed(
            plan.prompt,
            plan.negative_prompt,
            weighting=plan.prompt_weighting,
            clip_skip=plan.clip_skip,
            weights_key=self.merged.key,
        )
        common: dict[str, Any] = {
            **prompts.as_kwargs(),
            "num_images_per_prompt": len(plan.seeds),
            "generator": [torch.Generator("cpu").manual_seed(seed) for seed in plan.seeds],
            "guidance_scale": plan.guidance_scale,
            "num_inference_steps": plan.schedule_steps,
            "callback_on_step_end": on_step,
            "output_type": "pt",  # converted to uint8 on the device: output_type="pil" does it on the host
        }
        with torch.inference_mode():
            if reference is None:
                width, height = size
                output = pipe(width=width, height=height, **common)
            else:
                output = pipe(image=fit_cover(reference, size), strength=plan.denoise_strength, **common)
            return [Image.fromarray(pixels) for pixels in to_uint8(output.images)]
