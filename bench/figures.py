"""The benchmark's jobs (payloads, the LoRAs and reference image some use), their compute floors,
and the summary table."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

from src.fast_path import SERVING

PEAK_TFLOPS = 790.0  # dense bf16/fp16 measured on the H100 (shared/reference/true-size-models.md)
SDXL_UNET_TFLOP_PER_IMAGE = 6.75  # one UNet forward of one 1024x1024 latent (13.5 per CFG pair)
SDXL_VAE_TFLOP = 10.5
PROMPT = "a lighthouse on a cliff at sunset, dramatic clouds, photorealistic, detailed"
NEGATIVE = "blurry, low quality"
# sdxl_high_1_weighted: the same prompts with A1111 and Compel weights (the same token count)
WEIGHTED_PROMPT = "a (lighthouse:1.3) on a cliff at sunset, (dramatic clouds)++, photorealistic, [detailed]"
WEIGHTED_NEGATIVE = "(blurry:1.4), low quality-"
ENHANCE_TOKENS = 256  # enhance_256: new tokens of prompt enhancement's LLM, forced

SDXL_JOBS = {  # name -> (type, num_images, steps, guidance)
    "sdxl_high_1": ("sdxl_image_high", 1, 25, 7.5),
    "sdxl_high_3": ("sdxl_image_high", 3, 25, 7.5),
    "sdxl_fast_1": ("sdxl_image_fast", 1, 15, 6.0),
    "sdxl_high_1_lora": ("sdxl_image_high", 1, 25, 7.5),
    "sdxl_high_1_weighted": ("sdxl_image_high", 1, 25, 7.5),
}
WAN_JOBS = {  # name -> (type, steps, guidance, reference)
    "video_fast": ("video_fast", 25, 6.5, False),
    "video_high": ("video_high", 50, 7.5, False),
    "video_fast_ref": ("video_fast", 25, 6.5, True),
    "video_fast_lora": ("video_fast", 25, 6.5, False),
    "video_turbo": ("video_turbo", 3, 1.0, False),
}
# Jobs with a LoRA (made by bench_loras, in LORAS_DIR) -> (its name, rank): a community-typical
# SDXL LoRA (attention and feed-forward of every UNet block, both text encoders) and a Wan LoRA of
# every block.
LORA_JOBS = {"sdxl_high_1_lora": ("bench-sdxl", 64), "video_fast_lora": ("bench-wan", 32)}
WAN_SIZE = (832, 480)
WAN_FRAMES = 81


# ---------------------------------------------------------------- compute floors
def wan_forward_tflop(
    tokens: int, blocks: int, text_tokens: int = 512, d: int = 1536, ffn: int = 8960
) -> float:
    """FLOPs of one Wan 1.3B transformer forward (per block: attention, projections, FFN)."""
    per_block = (
        8 * tokens * d * d  # self-attention q, k, v, o
        + 4 * tokens * tokens * d  # QK^T and PV
        + 4 * tokens * d * d  # cross-attention q, o
        + 4 * text_tokens * d * d  # cross-attention k, v
        + 4 * tokens * text_tokens * d  # cross-attention scores
        + 4 * tokens * d * ffn  # FFN
    )
    return blocks * per_block / 1e12


def floor_s(name: str) -> float:
    """Compute floor of a job at PEAK_TFLOPS (denoising + SDXL VAE; Wan VAE not counted)."""
    if name in SDXL_JOBS:
        _, images, steps, _ = SDXL_JOBS[name]
        return (steps * 2 * SDXL_UNET_TFLOP_PER_IMAGE * images + SDXL_VAE_TFLOP * images) / PEAK_TFLOPS
    _, steps, guidance, reference = WAN_JOBS[name]
    latent_frames = (WAN_FRAMES - 1) // 4 + 1 + (1 if reference else 0)
    tokens = latent_frames * (WAN_SIZE[1] // 16) * (WAN_SIZE[0] // 16)
    blocks = 45 if reference else 30  # VACE: 30 main + 15 VACE blocks
    passes = 2 if guidance > 1 else 1  # classifier-free guidance: two forwards a step
    return steps * passes * wan_forward_tflop(tokens, blocks) / PEAK_TFLOPS


# ---------------------------------------------------------------- payloads and LoRAs
def payload(name: str, reference_url: str | None, wan_steps: int | None = None) -> dict[str, Any]:
    """The RunPod job for benchmark job ``name`` (seed 1)."""
    config: dict[str, Any] = {"seed": 1}
    metadata: dict[str, Any] = {}
    if name in SDXL_JOBS:
        job_type, images, _, _ = SDXL_JOBS[name]
        config["num_images"] = images
    else:
        job_type = WAN_JOBS[name][0]
        if wan_steps and job_type != "video_turbo":
            config["num_inference_steps"] = wan_steps
        if WAN_JOBS[name][3]:
            metadata["reference_image_url"] = reference_url
    if name in LORA_JOBS:
        config["loras"] = [{"name": LORA_JOBS[name][0], "scale": 0.8}]
    job_id = f"bench-{name}-{time.monotonic_ns()}"
    weighted = name.endswith("_weighted")
    body = {
        "id": job_id,
        "type": job_type,
        "prompt": WEIGHTED_PROMPT if weighted else PROMPT,
        "negative_prompt": WEIGHTED_NEGATIVE if weighted else NEGATIVE,
        "user_id": "bench",
    }
    return {"id": job_id, "input": {**body, "config": config, "metadata": metadata}}


def bench_loras(worker: Any, directory: Path, jobs: list[str]) -> None:
    """Write the LoRAs the ``jobs`` name into ``directory`` (LORAS_DIR), shaped for the loaded models."""
    from tests import loras as kit

    directory.mkdir(parents=True, exist_ok=True)
    families = {family.name: family for family in worker.families}
    for job in (j for j in jobs if j in LORA_JOBS):
        name, rank = LORA_JOBS[job]
        if job in SDXL_JOBS:
            pipe = families["sdxl"].text2img
            parts = [kit.factors(pipe.unet, kit.SDXL_UNET_FULL, rank, 1, "unet.")]
            parts += [
                kit.factors(getattr(pipe, e), kit.SDXL_TEXT_FULL, rank, 2, f"{e}.")
                for e in ("text_encoder", "text_encoder_2")
            ]
        else:
            parts = [
                kit.factors(families["wan"].text2video.transformer, kit.WAN_TARGETS, rank, 3, "transformer.")
            ]
        tensors = {k: v.half() for k, v in kit.peft_layout(kit.join(*parts)).items()}
        (directory / f"{name}.safetensors").write_bytes(kit.to_bytes(tensors))


def bench_enhance(worker: Any, timed: Any, runs: int = 3) -> dict[str, Any]:
    """Prompt enhancement's ENHANCE_TOKENS new tokens (length forced: random weights), through the
    worker's ``PromptFamily.rewrite`` (static cache, CUDA-graph decode step), against plain
    transformers ``generate`` (bf16, greedy) on the same model and chat, in the same process."""
    import torch

    from src.prompt.instructions import SYSTEM_PROMPTS

    (llm,) = [family for family in worker.families if family.name == "prompt"]
    system = SYSTEM_PROMPTS["wan_en"]["text"]
    ids = llm.chat_ids(system, PROMPT)
    worker_s = [timed(llm.rewrite, system, PROMPT, stop_at_end=False)[1] for _ in range(runs)]
    fixed = {"max_new_tokens": ENHANCE_TOKENS, "min_new_tokens": ENHANCE_TOKENS, "do_sample": False}
    with llm.decoder.as_shipped(), torch.inference_mode():  # plain: transformers' own model
        llm.model.generate(ids, max_new_tokens=8, do_sample=False)  # first-call costs
        plain_s = [timed(llm.model.generate, ids, **fixed)[1] for _ in range(2)]
    result = {
        "chat_tokens": ids.shape[1],
        "new_tokens": llm.decoder.max_new_tokens,
        "s": round(min(worker_s), 3),
        "runs": [round(x, 3) for x in worker_s],
        "plain_generate_s": round(min(plain_s), 3),
        "plain_runs": [round(x, 3) for x in plain_s],
    }
    print(f"worker enhance_{ENHANCE_TOKENS}: {result}", flush=True)
    return result


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """The table rows and the docs/perf/h100.json keys."""
    plain, worker, cached, eager = (results.get(k, {}) for k in ("plain", "worker", "cached", "eager"))
    rows = []
    for name in [*SDXL_JOBS, *WAN_JOBS]:
        w, p = cached.get(name) or worker.get(name) or eager.get(name), plain.get(name)
        if not w and not p:
            continue
        row = {"job": name, "floor_s": round(floor_s(name), 2)}
        if p:
            row["plain_s"] = p["s"]
            row["plain_peak_gib"] = p["peak_gib"]
        if w:
            row.update(
                worker_s=w["s"],
                first_s=w["first_s"],
                generate_s=w["generate_s"],
                outside_gpu_s=w["outside_gpu_s"],
                peak_gib=w["peak_gib"],
                peak_reserved_gib=w.get("peak_reserved_gib"),
            )
        if p and w:
            row["speedup"] = round(p["s"] / w["s"], 2)
        rows.append(row)
    card = worker.get("card") or cached.get("card") or eager.get("card") or plain.get("card")
    summary: dict[str, Any] = {"rows": rows, "card": card}
    for key, phase in (("cold_start_no_cache", worker), ("cold_start_cached", cached)):
        if phase.get("startup"):
            summary[key] = phase["startup"]
    not_serving = {
        name: state
        for phase in (worker, cached, eager)
        for name, state in phase.get("startup", {}).get("fast_paths", {}).items()
        if state != SERVING
    }
    if not_serving:  # its jobs ran eagerly: their figures are not the fast path's
        summary["fast_paths_not_serving"] = not_serving
    get = {r["job"]: r for r in rows}
    if "sdxl_high_1" in get and "speedup" in get["sdxl_high_1"]:
        summary["sdxl_high_1_speedup"] = get["sdxl_high_1"]["speedup"]
    if "worker_s" in get.get("sdxl_high_3", {}):
        summary["sdxl_high_3_per_image_s"] = round(get["sdxl_high_3"]["worker_s"] / 3, 3)
    for job in ("video_high", "video_fast", "video_turbo"):
        if "worker_s" in get.get(job, {}):
            summary[f"{job}_s"] = get[job]["worker_s"]
    for job, base, key in (
        ("sdxl_high_1_lora", "sdxl_high_1", "sdxl"),
        ("video_fast_lora", "video_fast", "wan"),
    ):
        if "worker_s" in get.get(job, {}) and "worker_s" in get.get(base, {}):
            summary[f"{key}_lora_overhead"] = round(get[job]["worker_s"] / get[base]["worker_s"], 3)
    if "worker_s" in get.get("sdxl_high_1_weighted", {}) and "worker_s" in get.get("sdxl_high_1", {}):
        weighted, plain_prompt = get["sdxl_high_1_weighted"]["worker_s"], get["sdxl_high_1"]["worker_s"]
        summary["sdxl_weighted_overhead"] = round(weighted / plain_prompt, 3)
        summary["sdxl_weighted_extra_s"] = round(weighted - plain_prompt, 3)
        summary.update(weighted_embedding(cached or worker))
    enhance = (cached or worker).get(f"enhance_{ENHANCE_TOKENS}")
    if enhance:
        summary[f"enhance_{ENHANCE_TOKENS}_tokens_s"] = enhance["s"]
        summary[f"enhance_plain_generate_{ENHANCE_TOKENS}_tokens_s"] = enhance["plain_generate_s"]
        summary["enhance_speedup"] = round(enhance["plain_generate_s"] / enhance["s"], 2)
    if "worker_s" in get.get("video_turbo", {}) and "worker_s" in get.get("video_fast", {}):
        summary["video_turbo_speedup_over_video_fast"] = round(
            get["video_fast"]["worker_s"] / get["video_turbo"]["worker_s"], 2
        )
    if cached.get("startup"):
        summary["cold_start_s"] = cached["startup"]["process_to_ready_s"]
        if "process_to_every_family_s" in cached["startup"]:
            summary["cold_start_every_family_s"] = cached["startup"]["process_to_every_family_s"]
    cold = results.get("cold", {})
    if cold.get("startup"):
        summary["cold_start_cold_disk_s"] = cold["startup"]["process_to_ready_s"]
        summary["cold_start_cold_disk_prefetch_s"] = cold["startup"].get("prefetch_s")
    background = results.get("background", {})
    if background.get("startup"):
        summary["cold_start_no_cache_ready_s"] = background["startup"]["process_to_ready_s"]
        if "process_to_every_family_s" in background["startup"]:
            summary["cold_start_no_cache_every_family_s"] = background["startup"]["process_to_every_family_s"]
        for key in ("background_compile_s", "jobs_during_compile_slowdown", "child_peak_gib"):
            if key in background["background"]:
                summary[key] = background["background"][key]
    peaks = [r["peak_gib"] for r in rows if "peak_gib" in r]
    if peaks:
        summary["peak_gpu_gib_both"] = max(peaks)
    reserved = [r["peak_reserved_gib"] for r in rows if r.get("peak_reserved_gib") is not None]
    if reserved:
        summary["peak_reserved_gpu_gib_both"] = max(reserved)
    return summary


def print_table(summary: dict[str, Any]) -> None:
    print(f"\ncard: {summary.get('card')}")
    head = f"{'job':16}{'plain s':>9}{'worker s':>10}{'x':>6}{'floor s':>9}{'gen s':>8}{'out s':>7}"
    print(head + f"{'peak GiB':>9}{'reserved':>9}{'plain GiB':>10}")
    for r in summary["rows"]:
        print(
            f"{r['job']:16}{r.get('plain_s', '-')!s:>9}{r.get('worker_s', '-')!s:>10}"
            f"{r.get('speedup', '-')!s:>6}{r['floor_s']!s:>9}{r.get('generate_s', '-')!s:>8}"
            f"{r.get('outside_gpu_s', '-')!s:>7}{r.get('peak_gib', '-')!s:>9}"
            f"{r.get('peak_reserved_gib') or '-'!s:>9}{r.get('plain_peak_gib', '-')!s:>10}"
        )
    for key in ("cold_start_no_cache", "cold_start_cached"):
        if key in summary:
            print(f"{key}: {summary[key]}")
    for name, state in summary.get("fast_paths_not_serving", {}).items():
        print(f"NOT SERVING, its jobs ran without it: {name}: {state}")


def reference_png(path: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (30, 52, 3), dtype=np.uint8)
    Image.fromarray(base).resize(WAN_SIZE, Image.Resampling.BICUBIC).save(path)


def serve(directory: Path) -> str:
    """A static file server on 127.0.0.1 (reference images for reference-mode jobs)."""
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def weighted_embedding(phase: dict[str, Any]) -> dict[str, Any]:
    """What weighting adds where it acts, the prompts' embedding (``embed_s`` of each run): each
    job's median embedding time, and the weighted one's extra as a share of the median unweighted
    job (the jobs' totals vary more than that from run to run)."""
    weighted, plain = phase.get("sdxl_high_1_weighted", {}), phase.get("sdxl_high_1", {})
    if "embed_runs" not in weighted or "embed_runs" not in plain:
        return {}
    embed_weighted, embed_plain = (
        statistics.median(sum(run) for run in job["embed_runs"]) for job in (weighted, plain)
    )
    medians = {
        f"sdxl{prefix}_{key}_median_s": round(statistics.median(job[f"{key}_runs"]), 4)
        for prefix, job in (("", plain), ("_weighted", weighted))
        for key in ("generate", "outside_gpu")
        if f"{key}_runs" in job
    }  # the job's two parts: the pipeline (embedding included), and storing its image
    return {
        "sdxl_embed_s": round(embed_plain, 4),
        "sdxl_weighted_embed_s": round(embed_weighted, 4),
        "sdxl_weighted_embed_extra_share": round(
            (embed_weighted - embed_plain) / statistics.median(plain["runs"]), 4
        ),
        **medians,
    }
