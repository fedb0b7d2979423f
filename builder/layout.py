"""Which repo files go where: the model directories under MODELS_DIR and how each is planned.

A ``ModelSpec`` is one directory (sdxl, wan-t2v, wan-vace, wan-turbo, prompt): the repos that contribute to
it, what each contributes (plain files, weights stored in a given dtype) and the relative links it
holds.
``plan_part`` turns one repo's listing into the ``Step``s that write its share.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from builder.errors import UnavailableError
from builder.sources import FileMeta

SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_VAE_REPO = "madebyollin/sdxl-vae-fp16-fix"
WAN_T2V_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
WAN_VACE_REPO = "Wan-AI/Wan2.1-VACE-1.3B-diffusers"
FASTWAN_REPO = "FastVideo/FastWan2.1-T2V-1.3B-Diffusers"  # video_turbo: Wan 2.1 T2V 1.3B, DMD-distilled
PROMPT_REPO = "Qwen/Qwen2.5-7B-Instruct"  # prompt enhancement's LLM: PROMPT_MODEL's default


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Files:
    """Plain files copied as they are: every repo file matching ``patterns``; ``required`` must exist."""

    patterns: tuple[str, ...]
    required: tuple[str, ...] = ()


@dataclass(frozen=True)
class Weights:
    """One component's safetensors weights (single file or index + shards) and its ``config.json``.

    ``dtype``: floating tensors are stored in this dtype (converted tensor by tensor when needed).
    ``variant``: a single file ``<stem>.<variant>.safetensors`` preferred to the plain one (e.g. SDXL's
    fp16 files); it is stored under the plain name, which is what ``from_pretrained`` loads.
    """

    folder: str
    stem: str
    dtype: str
    variant: str | None = None


@dataclass(frozen=True)
class Part:
    """What one hub repo contributes to a model directory (under ``dest``)."""

    repo: str
    items: tuple[Files | Weights, ...]
    dest: str = ""
    config_updates: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    # (another repo, folders): this repo's folders must hold exactly that repo's files (same names
    # and hashes): the model directory links to the other's copy instead of holding its own.
    same_as: tuple[str, tuple[str, ...]] | None = None


@dataclass(frozen=True)
class ModelSpec:
    """One directory under MODELS_DIR."""

    name: str
    family: str
    parts: tuple[Part, ...]
    links: tuple[tuple[str, str], ...] = ()  # (path in this dir, relative symlink target)


SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="sdxl",
        family="sdxl",
        parts=(
            Part(
                SDXL_REPO,
                (
                    Files(
                        ("model_index.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*"),
                        required=(
                            "model_index.json",
                            "scheduler/scheduler_config.json",
                            "tokenizer/tokenizer_config.json",
                            "tokenizer_2/tokenizer_config.json",
                        ),
                    ),
                    Weights("unet", "diffusion_pytorch_model", "float16", variant="fp16"),
                    Weights("text_encoder", "model", "float16", variant="fp16"),
                    Weights("text_encoder_2", "model", "float16", variant="fp16"),
                ),
            ),
            Part(
                SDXL_VAE_REPO,
                (Weights("", "diffusion_pytorch_model", "float16"),),
                dest="vae",
                config_updates=(("config.json", (("force_upcast", False),)),),
            ),
        ),
    ),
    ModelSpec(
        name="wan-t2v",
        family="wan",
        parts=(
            Part(
                WAN_T2V_REPO,
                (
                    Files(
                        ("model_index.json", "scheduler/*", "tokenizer/*"),
                        required=(
                            "model_index.json",
                            "scheduler/scheduler_config.json",
                            "tokenizer/tokenizer_config.json",
                        ),
                    ),
                    Weights("text_encoder", "model", "bfloat16"),
                    Weights("transformer", "diffusion_pytorch_model", "bfloat16"),
                    Weights("vae", "diffusion_pytorch_model", "float32"),
                ),
            ),
        ),
    ),
    ModelSpec(
        name="wan-vace",
        family="wan",
        parts=(
            Part(
                WAN_VACE_REPO,
                (
                    Files(
                        ("model_index.json", "scheduler/*"),
                        required=("model_index.json", "scheduler/scheduler_config.json"),
                    ),
                    Weights("transformer", "diffusion_pytorch_model", "bfloat16"),
                ),
            ),
        ),
        links=(
            ("text_encoder", "../wan-t2v/text_encoder"),
            ("tokenizer", "../wan-t2v/tokenizer"),
            ("vae", "../wan-t2v/vae"),
        ),
    ),
    ModelSpec(
        name="wan-turbo",
        family="wan",
        parts=(
            Part(
                FASTWAN_REPO,
                (
                    Files(
                        ("model_index.json", "scheduler/*"),
                        required=("model_index.json", "scheduler/scheduler_config.json"),
                    ),
                    Weights("transformer", "diffusion_pytorch_model", "bfloat16"),
                ),
                same_as=(WAN_T2V_REPO, ("text_encoder", "tokenizer", "vae")),
            ),
        ),
        links=(
            ("text_encoder", "../wan-t2v/text_encoder"),
            ("tokenizer", "../wan-t2v/tokenizer"),
            ("vae", "../wan-t2v/vae"),
        ),
    ),
)


def prompt_spec(repo: str) -> ModelSpec:
    """``prompt/``: a transformers causal LM (``repo``, PROMPT_MODEL) with its tokenizer and chat
    template, weights in bf16."""
    tokenizer = (
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
    )
    return ModelSpec(
        name="prompt",
        family="prompt",
        parts=(
            Part(
                repo,
                (
                    Files(
                        ("generation_config.json", "chat_template.jinja", "LICENSE", *tokenizer),
                        required=("tokenizer_config.json",),
                    ),
                    Weights("", "model", "bfloat16"),
                ),
            ),
        ),
    )


def specs_for(families: Iterable[str], prompt_model: str = PROMPT_REPO) -> list[ModelSpec]:
    """The model directories the given families need, in build order (``prompt_model``: the
    prompt family's repo)."""
    wanted = set(families)
    return [spec for spec in (*SPECS, prompt_spec(prompt_model)) if spec.family in wanted]


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Step:
    """One output file: copied (or converted) from ``src`` in the snapshot to ``out`` in the model dir."""

    src: str
    out: str
    dtype: str | None = None  # safetensors: store floating tensors in this dtype
    role: str = "file"  # file | weights | index
    updates: tuple[tuple[str, Any], ...] = ()  # JSON keys to set


def plan_part(part: Part, files: dict[str, FileMeta]) -> list[Step]:
    """The steps that build ``part`` from a repo listing; raise UnavailableError if files are missing."""
    steps: list[Step] = []
    updates = dict(part.config_updates)
    dest = f"{part.dest}/" if part.dest else ""
    for item in part.items:
        if isinstance(item, Files):
            missing = [path for path in item.required if path not in files]
            if missing:
                raise UnavailableError(f"missing {', '.join(missing)}")
            chosen = [p for p in files if any(fnmatch.fnmatchcase(p, pat) for pat in item.patterns)]
            steps += [Step(p, dest + p, updates=updates.get(p, ())) for p in sorted(chosen)]
        else:
            steps += _plan_weights(item, files, dest, updates)
    return steps


def _plan_weights(
    item: Weights, files: dict[str, FileMeta], dest: str, updates: dict[str, tuple[tuple[str, Any], ...]]
) -> list[Step]:
    """The config and weights of one component: the variant file, the plain one, or index and shards."""
    base = f"{item.folder}/" if item.folder else ""
    config = f"{base}config.json"
    if config not in files:
        raise UnavailableError(f"missing {config}")
    steps = [Step(config, dest + config, updates=updates.get(config, ()))]
    single = f"{base}{item.stem}.safetensors"
    if item.variant and f"{base}{item.stem}.{item.variant}.safetensors" in files:
        src = f"{base}{item.stem}.{item.variant}.safetensors"
        return [*steps, Step(src, dest + single, item.dtype, "weights")]
    if single in files:
        return [*steps, Step(single, dest + single, item.dtype, "weights")]
    index = f"{single}.index.json"
    shard = re.compile(re.escape(f"{base}{item.stem}") + r"-\d+-of-\d+\.safetensors")
    shards = sorted(p for p in files if shard.fullmatch(p))
    if index in files and shards:
        steps += [Step(p, dest + p, item.dtype, "weights") for p in shards]
        return [*steps, Step(index, dest + index, item.dtype, "index")]
    raise UnavailableError(f"no safetensors weights in {item.folder or 'the repo root'}/")
