"""GPU benchmark: the worker against a plain diffusers pipeline on true-size random weights.

One command (see docs/PERFORMANCE.md)::

    python -m bench.run --models /tmp/bench-models --out results/

builds the true-size models (bench/build_models.py) if missing, then runs each phase in its
own process and writes ``results.json`` plus a table:

- ``plain``: StableDiffusionXLPipeline / WanPipeline / WanVACEPipeline ``from_pretrained(...)
  .to("cuda")``, default SDPA, eager: the obvious implementation.
- ``worker``: the worker from process start, through ``load_settings`` and ``start_worker``
  (load, warm-up, compile), with an empty COMPILE_CACHE_DIR; then every job through
  ``Worker.handle`` with ``LOCAL_STORAGE_DIR`` storage.
- ``cached``: a fresh worker process with the compiled packages the first one saved (and a fresh
  inductor directory, as on a new machine): cold start, then one SDXL job.
- jobs are the names in bench/figures.py, and ``enhance_256``: prompt enhancement's LLM against plain
  ``generate`` (``WORKER_MODELS`` with ``prompt``, ``--build ...,prompt``).
- ``cold``: like ``cached``, the models' and packages' files dropped from the page cache first
  (``bench/page_cache.py``): a start on a new machine, whose disk has not been read yet.
- ``background``: like ``worker`` with ``COMPILE=auto``: ready before the packages, which compile
  in the background while the first job runs again and again (bench/background.py).
- ``profile``: like ``cached``, then each job once under ``bench/gpu_profile.py`` (where its GPU time
  goes); Wan jobs run ``--profile-steps`` steps.

``--phases`` picks phases (default ``build,plain,worker,cached``; ``eager`` adds a worker with
``COMPILE=off``); results of phases run earlier into the same ``--out`` are merged, so a run
may be split across invocations. Job figures come from ``cached`` when it ran them, else from
``worker``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.figures import (
    ENHANCE_TOKENS,
    NEGATIVE,
    PROMPT,
    SDXL_JOBS,
    WAN_FRAMES,
    WAN_JOBS,
    WAN_SIZE,
    bench_enhance,
    bench_loras,
    payload,
    print_table,
    reference_png,
    serve,
    summarise,
)


# ---------------------------------------------------------------- helpers
def _gib(value: int) -> float:
    return round(value / 2**30, 2)


def timed(fn, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and its seconds, GPU work included (synchronized before and after)."""
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    torch.cuda.synchronize()
    return result, time.perf_counter() - started


# ---------------------------------------------------------------- phase: plain diffusers
def phase_plain(models: Path, out: dict[str, Any], only: set[str]) -> None:
    """The obvious implementation: from_pretrained(...).to("cuda"), eager, default SDPA."""
    import torch
    from diffusers import (
        AutoencoderKLWan,
        StableDiffusionXLPipeline,
        WanPipeline,
        WanVACEPipeline,
        WanVACETransformer3DModel,
    )
    from PIL import Image

    if only & set(SDXL_JOBS):
        pipe, load_s = timed(
            lambda: StableDiffusionXLPipeline.from_pretrained(models / "sdxl", torch_dtype=torch.float16).to(
                "cuda"
            )
        )
        pipe.set_progress_bar_config(disable=True)
        out["plain_load_sdxl_s"] = round(load_s, 2)
        pipe(PROMPT, width=1024, height=1024, num_inference_steps=2)  # first-call costs
        for name, (_, images, steps, guidance) in SDXL_JOBS.items():
            if name not in only:
                continue
            runs = []
            for seed in (1, 2):
                torch.cuda.reset_peak_memory_stats()
                _, seconds = timed(
                    pipe,
                    PROMPT,
                    negative_prompt=NEGATIVE,
                    width=1024,
                    height=1024,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    num_images_per_prompt=images,
                    generator=torch.Generator("cpu").manual_seed(seed),
                )
                runs.append(seconds)
            out[name] = {"s": round(min(runs), 3), "runs": [round(r, 3) for r in runs]}
            out[name]["peak_gib"] = _gib(torch.cuda.max_memory_allocated())
            out[name]["peak_reserved_gib"] = _gib(torch.cuda.max_memory_reserved())
            print(f"plain {name}: {out[name]}", flush=True)
        del pipe
        torch.cuda.empty_cache()

    wan_jobs = [name for name in WAN_JOBS if name in only]
    if not wan_jobs:
        return
    started = time.perf_counter()
    vae = AutoencoderKLWan.from_pretrained(models / "wan-t2v", subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(models / "wan-t2v", vae=vae, torch_dtype=torch.bfloat16).to("cuda")
    vace = WanVACEPipeline(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        scheduler=pipe.scheduler,
        transformer=WanVACETransformer3DModel.from_pretrained(
            models / "wan-vace", subfolder="transformer", torch_dtype=torch.bfloat16
        ),
    ).to("cuda")
    torch.cuda.synchronize()
    out["plain_load_wan_s"] = round(time.perf_counter() - started, 2)
    for p in (pipe, vace):
        p.set_progress_bar_config(disable=True)
    small = {"width": 64, "height": 64, "num_frames": 5, "num_inference_steps": 1}
    pipe(PROMPT, **small)
    gray = Image.new("RGB", (64, 64), (128, 128, 128))
    vace(PROMPT, reference_images=[gray], **small)
    reference = Image.new("RGB", WAN_SIZE, (90, 120, 150))
    for name in wan_jobs:
        _, steps, guidance, with_reference = WAN_JOBS[name]
        common = dict(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            width=WAN_SIZE[0],
            height=WAN_SIZE[1],
            num_frames=WAN_FRAMES,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(1),
            output_type="np",
        )
        torch.cuda.reset_peak_memory_stats()
        if with_reference:
            _, seconds = timed(vace, reference_images=[reference], conditioning_scale=0.85, **common)
        else:
            _, seconds = timed(pipe, **common)
        out[name] = {
            "s": round(seconds, 2),
            "peak_gib": _gib(torch.cuda.max_memory_allocated()),
            "peak_reserved_gib": _gib(torch.cuda.max_memory_reserved()),
        }
        print(f"plain {name}: {out[name]}", flush=True)


# ---------------------------------------------------------------- phase: the worker
def phase_worker(
    out: dict[str, Any],
    jobs: list[str],
    repeats: int,
    profile_steps: int | None = None,
    while_compiling: bool = False,
) -> None:
    """Start the worker (settings from the environment), then time each job through handle().

    With ``profile_steps``, Wan jobs run that many steps, every job runs once, then once more
    under the profiler. ``while_compiling`` (the ``background`` phase): the first job runs while
    the packages compile in the background (bench/background.py), instead.
    """
    spawned = float(os.environ["BENCH_SPAWNED_AT"])
    import torch

    from src.settings import load_settings
    from src.worker import start_worker

    imported = time.time()
    worker = start_worker(load_settings())
    torch.cuda.synchronize()
    ready = time.time()
    out["startup"] = {
        "process_to_ready_s": round(ready - spawned, 2),
        "python_and_imports_s": round(imported - spawned, 2),
        **worker.startup,
    }
    if worker.late is not None:  # READY_AFTER=first: the other families load behind the ready worker
        worker.late.wait()
        out["startup"]["process_to_every_family_s"] = round(time.time() - spawned, 2)
    out["resident_gib"] = _gib(torch.cuda.memory_allocated())
    out["reserved_gib"] = _gib(torch.cuda.memory_reserved())
    print(f"worker ready: {out['startup']}", flush=True)
    if while_compiling:
        from bench.background import jobs_while_compiling

        jobs_while_compiling(worker, payload(jobs[0], None), out)
        return

    bench_loras(worker, worker.settings.loras_path, jobs)
    if f"enhance_{ENHANCE_TOKENS}" in jobs:
        out[f"enhance_{ENHANCE_TOKENS}"] = bench_enhance(worker, timed)
        jobs = [job for job in jobs if job != f"enhance_{ENHANCE_TOKENS}"]
    generate_s: list[float] = []
    spans: dict[str, list[float]] = {"lora_use_s": [], "vae_decode_s": [], "embed_s": []}  # this job's calls

    def timing(call: Any, key: str) -> Any:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            result, seconds = timed(call, *args, **kwargs)
            spans[key].append(round(seconds, 3))
            return result

        return timed_call

    for family in (family for family in worker.families if family.job_types):  # not the prompt LLM
        family.generate = timing(family.generate, "generate")  # type: ignore[method-assign]
        merged = family.merged.values() if isinstance(family.merged, dict) else [family.merged]
        for each in merged:
            each.use = timing(each.use, "lora_use_s")  # type: ignore[method-assign]
        if family.name == "wan":
            family.text2video.vae.decode = timing(family.text2video.vae.decode, "vae_decode_s")
        if family.name == "sdxl":  # the prompts' embedding: what prompt weighting adds to
            family.prompts.embed = timing(family.prompts.embed, "embed_s")
    spans["generate"] = generate_s

    tmp = Path(os.environ.get("BENCH_TMP", "/tmp/bench-tmp"))
    tmp.mkdir(parents=True, exist_ok=True)
    reference_png(tmp / "reference.png")
    reference_url = serve(tmp) + "/reference.png"
    from src.sdxl.prompts import parse  # after ready: the worker's imports are timed as its own

    for name in jobs:
        runs = []
        for _ in range(repeats if (name in SDXL_JOBS or name == "video_turbo") and not profile_steps else 1):
            for values in spans.values():
                values.clear()
            parse.cache_clear()  # every run parses its prompts, as a job with a new prompt does
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            result = worker.handle(payload(name, reference_url, profile_steps))
            seconds = time.perf_counter() - started
            if result.get("status") != "completed":
                raise RuntimeError(f"{name}: {result}")
            runs.append(
                {
                    "s": round(seconds, 3),
                    "generate_s": round(generate_s[0], 3),
                    "outside_gpu_s": round(seconds - generate_s[0], 3),
                    "peak_gib": _gib(torch.cuda.max_memory_allocated()),
                    "peak_reserved_gib": _gib(torch.cuda.max_memory_reserved()),
                    **{key: list(values) for key, values in spans.items() if key != "generate" and values},
                }
            )
        best = min(runs, key=lambda r: r["s"])
        out[name] = {**best, "first_s": runs[0]["s"], "runs": [r["s"] for r in runs]}
        out[name]["generate_runs"] = [r["generate_s"] for r in runs]  # and what follows it: storing
        out[name]["outside_gpu_runs"] = [r["outside_gpu_s"] for r in runs]
        for key in ("lora_use_s", "embed_s"):  # lora_use_s: the first run merges, the next find them merged
            if key in runs[0]:
                out[name][key.replace("_s", "_runs")] = [r[key] for r in runs]
        print(f"worker {name}: {out[name]}", flush=True)
        if profile_steps:
            from bench.gpu_profile import profiled

            job = payload(name, reference_url, profile_steps)
            result, out[name]["profile"] = profiled(lambda: worker.handle(job), worker.families)  # noqa: B023
            if result.get("status") != "completed":
                raise RuntimeError(f"{name} (profiled): {result}")
            print(f"profile {name}: {json.dumps(out[name]['profile'])}", flush=True)


# ---------------------------------------------------------------- orchestration
def _run_phase(phase: str, args: argparse.Namespace, env: dict[str, str], jobs: list[str]) -> dict[str, Any]:
    result_path = args.out / f"{phase}.json"
    env = {**os.environ, **env, "BENCH_SPAWNED_AT": repr(time.time()), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "bench.run", "--child", phase, "--models", str(args.models)]
    command += ["--out", str(args.out), "--jobs", ",".join(jobs), "--repeats", str(args.repeats)]
    command += ["--profile-steps", str(args.profile_steps)]
    with open(args.out / f"{phase}.log", "w") as log:
        code = subprocess.call(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    text = (args.out / f"{phase}.log").read_text()
    picked = [line for line in text.splitlines() if "bench" in line or ": {" in line]
    print(text[-3000:] if code else "\n".join(picked))
    if code:
        raise SystemExit(f"phase {phase} failed ({code}); see {phase}.log")
    return json.loads(result_path.read_text())


def _child(args: argparse.Namespace) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out: dict[str, Any] = {}
    jobs = [j for j in args.jobs.split(",") if j]
    try:
        if args.child == "plain":
            phase_plain(args.models, out, set(jobs))
        else:
            profile = args.profile_steps if args.child == "profile" else None
            phase_worker(out, jobs, args.repeats, profile, while_compiling=args.child == "background")
    finally:
        import torch

        out["card"] = torch.cuda.get_device_name()
        (args.out / f"{args.child}.json").write_text(json.dumps(out, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("/tmp/bench-models"))
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--phases", default="build,plain,worker,cached")
    parser.add_argument("--jobs", default=",".join([*SDXL_JOBS, *WAN_JOBS]))
    parser.add_argument("--build", default="sdxl,wan", help="families the build phase builds (and prompt)")
    parser.add_argument("--cached-jobs", default="sdxl_high_1", help="jobs the cached-worker phase runs")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each SDXL job (best reported)")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps of the Wan jobs profiled")
    parser.add_argument("--worker-env", default="", help="extra KEY=VALUE,... for the worker phases")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        _child(args)
        return
    phases = args.phases.split(",")
    jobs = args.jobs.split(",")
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if "build" in phases:
        from bench.build_models import build

        results["build_s"] = build(args.models, args.build.split(","))
    storage = Path(os.environ.get("BENCH_TMP", "/tmp/bench-tmp")) / "storage"
    worker_env = {
        "MODELS_DIR": str(args.models),
        "LOCAL_STORAGE_DIR": str(storage),
        "COMPILE_CACHE_DIR": str(args.models.parent / "bench-compile-cache"),
        "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "true",  # the reference image is served on 127.0.0.1
    }
    # KEY=VALUE pairs, comma-separated; a value may hold commas (WORKER_MODELS=sdxl,wan,prompt)
    worker_env.update(kv.split("=", 1) for kv in re.split(r",(?=[A-Z_]+=)", args.worker_env) if kv)
    for phase in phases:
        if phase == "build":
            continue
        env = dict(worker_env)
        # A fresh inductor/Triton directory per process: only COMPILE_CACHE_DIR carries over.
        env["TORCHINDUCTOR_CACHE_DIR"] = f"/tmp/inductor-{phase}-{time.time_ns()}"
        env["TRITON_CACHE_DIR"] = env["TORCHINDUCTOR_CACHE_DIR"] + "/triton"
        if phase == "eager":
            env["COMPILE"] = "off"
        if phase == "worker":  # compiles every package before it is ready (the first start's cost)
            env.setdefault("COMPILE", "wait")
        phase_jobs = args.cached_jobs.split(",") if phase in ("cached", "cold", "profile") else jobs
        if phase == "cold":  # like cached, on a new machine: nothing of the disk in memory
            from bench.page_cache import evict

            gib = evict([args.models, Path(worker_env["COMPILE_CACHE_DIR"])]) / 2**30
            print(f"cold: {gib:.1f} GiB of models and packages dropped from the page cache", flush=True)
        if phase in ("worker", "background"):  # an empty cache: a new machine
            import shutil

            shutil.rmtree(worker_env["COMPILE_CACHE_DIR"], ignore_errors=True)
        results[phase] = _run_phase(phase, args, env, phase_jobs)
        results_path.write_text(json.dumps(results, indent=2))
    summary = summarise(results)
    results["summary"] = summary
    results_path.write_text(json.dumps(results, indent=2))
    print_table(summary)


if __name__ == "__main__":
    main()
