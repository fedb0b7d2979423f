"""Where the open targets' time goes (GPU only), on the models ``bench.build_models`` wrote:

    MODELS_DIR=/tmp/bm python -m bench.diag --out results/diag.json [--only llm,embed,imports]

- ``llm``: the prompt LLM's decode step replayed from its CUDA graph at several cache lengths, the
  grouped decode attention alone per SDPA backend at those lengths, the 256-token rewrite with
  and without reading each token back, and the kernels of one eager step (torch.profiler);
- ``embed``: the SDXL prompt embedding (Compel over the graphed encoders) weighted and
  unweighted, the encoder calls each makes, its Python profile and its CUDA runtime calls;
- ``imports``: ``python -X importtime`` of the SDXL family's module, the largest imports.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from bench.figures import NEGATIVE, PROMPT, WEIGHTED_NEGATIVE, WEIGHTED_PROMPT
from bench.run import timed

LENGTHS = (3328, 2304, 1280, 512)


def _replay_ms(replay: Any, calls: int = 100) -> float:
    """GPU milliseconds per call of ``replay`` over ``calls`` back-to-back calls."""
    replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / calls, 4)


def _kernels(prof: Any, top: int = 25) -> list[dict[str, Any]]:
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if event.device_type.name == "CUDA" or (device_us and not event.cpu_time_total):
            rows.append({"kernel": event.key[:110], "count": event.count, "us": round(device_us, 1)})
    rows.sort(key=lambda row: -row["us"])
    return rows[:top]


def _runtime_calls(prof: Any) -> dict[str, Any]:
    counts = {}
    for event in prof.key_averages():
        if event.key.startswith("cuda") or event.key.startswith("aten::"):
            counts[event.key] = [event.count, round(event.cpu_time_total, 1)]
    return dict(sorted(counts.items(), key=lambda item: -item[1][1])[:40])


def _attention_ms(length: int, backends: dict[str, Any]) -> dict[str, float]:
    """One decode step's 28 grouped attention calls over ``length`` cache positions, per backend."""
    from torch.nn.attention import sdpa_kernel

    q = torch.randn(1, 4, 7, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 4, length, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = torch.zeros(1, 1, 1, length, dtype=torch.bool, device="cuda")
    mask[..., : length - 300] = True
    out = {}
    for name, backend in backends.items():
        try:
            with torch.inference_mode(), sdpa_kernel(backend):
                call = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
                call()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(28):
                        call()
            out[name] = _replay_ms(graph.replay, 50)
        except Exception as err:
            out[name] = f"{type(err).__name__}: {str(err)[:120]}"
    return out


def diag_llm(settings: Any) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    from src.prompt.decode import attend_length
    from src.prompt.family import PromptFamily
    from src.prompt.instructions import SYSTEM_PROMPTS
    from src.timing import Phases

    llm = PromptFamily.load(settings)
    phases = Phases()
    llm.warm_up(phases)
    system = SYSTEM_PROMPTS["wan_en"]["text"]
    ids = llm.chat_ids(system, PROMPT)
    result: dict[str, Any] = {"chat_tokens": ids.shape[1], "warm_up_s": phases.seconds}
    result["rewrite_256_s"] = [
        round(timed(llm.rewrite, system, PROMPT, stop_at_end=False)[1], 4) for _ in range(3)
    ]
    (step,) = llm.fast_paths.candidates
    result["step_replay_ms"] = {}
    short = ids[:, :16]
    for length, graph in step.graphs.items():  # each replay appends to the cache: 101 from 16 fit
        with torch.inference_mode():
            step._prefill(short)
        result["step_replay_ms"][length] = _replay_ms(graph.replay)
    attend = attend_length(ids.shape[1] + 256, step.decoder.cache_length)
    with torch.inference_mode():
        step._prefill(ids)
        result["prefill_s"] = round(timed(lambda: step._prefill(ids))[1], 4)

    @torch.inference_mode()
    def no_readback() -> None:  # 256 steps, the token fed back on the device
        step._prefill(ids)
        for _ in range(256):
            step.graphs[attend].replay()
            step.token.copy_(step.logits[attend][:, -1].argmax(-1, keepdim=True))
            step.position.add_(1)

    result["steps_256_no_readback_s"] = [round(timed(no_readback)[1], 4) for _ in range(3)]

    with (
        torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof,
        torch.inference_mode(),
    ):
        for _ in range(3):
            step._call(step.token, step.position, attend)
        torch.cuda.synchronize()
    result["eager_step_kernels_x3"] = _kernels(prof, 40)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step.graphs[attend].replay()
        torch.cuda.synchronize()
    result["replay_kernels_x3"] = _kernels(prof, 15)

    backends = {
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "default": [
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.MATH,
        ],
    }
    result["attention_28_ms"] = {length: _attention_ms(length, backends) for length in LENGTHS}
    # the matrix-vector products of one layer, alone and fused (q,k,v; gate,up), in graphs of 28
    x = torch.randn(1, 3584, device="cuda", dtype=torch.bfloat16)
    shapes = {"q": 3584, "k": 512, "v": 512, "qkv": 4608, "o": 3584, "gate": 18944, "gate_up": 37888}
    gemv = {}
    for name, rows in shapes.items():
        weight = torch.randn(rows, 3584, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            torch.nn.functional.linear(x, weight)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(28):
                    torch.nn.functional.linear(x, weight)
        ms = _replay_ms(graph.replay, 30)
        gemv[name] = {"ms_28": ms, "tb_s": round(weight.numel() * 2 * 28 / (ms / 1e3) / 1e12, 2)}
    result["gemv"] = gemv
    return result


def diag_embed(settings: Any) -> dict[str, Any]:
    from src.sdxl.family import SdxlFamily
    from src.sdxl.prompts import compel_syntax, parse
    from src.timing import Phases

    sdxl = SdxlFamily.load(settings)
    sdxl.warm_up(Phases())
    prompts = sdxl.prompts
    routes = sdxl.fast_paths.routes
    jobs = {"plain": (PROMPT, NEGATIVE), "weighted": (WEIGHTED_PROMPT, WEIGHTED_NEGATIVE)}
    result: dict[str, Any] = {}
    for name, (prompt, negative) in jobs.items():

        def call(p: str = prompt, n: str = negative) -> Any:
            parse.cache_clear()  # as in the benchmark's jobs: every job parses its prompts
            return prompts.embed(p, n, weighting=True, clip_skip=0)

        def parse_only(p: str = prompt, n: str = negative) -> None:
            parse.cache_clear()
            parse(compel_syntax(p))
            parse(compel_syntax(n))

        call()
        before = [r.served for r in routes]
        runs = [timed(call)[1] for _ in range(20)]
        served = [r.served - b for r, b in zip(routes, before, strict=True)]
        parse_ms = [timed(parse_only)[1] * 1e3 for _ in range(20)]
        result[f"{name}_parse_ms"] = round(statistics.median(parse_ms), 2)
        result[name] = {
            "median_ms": round(statistics.median(runs) * 1e3, 2),
            "min_ms": round(min(runs) * 1e3, 2),
            "encoder_calls_per_embed": [s / 20 for s in served],
        }
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(10):
            call()
        torch.cuda.synchronize()
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        result[name]["python_tottime_x10"] = text.getvalue()[-6000:]
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(30)
        result[name]["python_cumulative_x10"] = text.getvalue()[-6000:]
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            for _ in range(3):
                call()
            torch.cuda.synchronize()
        result[name]["runtime_x3"] = _runtime_calls(prof)
        result[name]["kernels_x3"] = _kernels(prof, 15)
    return result


def diag_imports() -> dict[str, Any]:
    runs = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import src.sdxl.family"],
            capture_output=True,
            text=True,
            env=os.environ,
            check=False,
        )
        rows = []
        for line in done.stderr.splitlines():
            parts = line.split("|")
            if (
                len(parts) == 3
                and parts[0].startswith("import time:")
                and parts[0].split(":")[1].strip().isdigit()
            ):
                rows.append((int(parts[0].split(":")[1]), int(parts[1]), parts[2].rstrip()))
        runs.append(rows)
    rows = runs[-1]
    total = max(cumulative for _, cumulative, _ in rows) if rows else 0
    selfs = Counter()
    for own, _, name in rows:
        selfs[name.strip().split(".")[0]] += own
    return {
        "total_s": [round(max((c for _, c, _ in run), default=0) / 1e6, 3) for run in runs],
        "top_cumulative": [(round(c / 1e6, 3), n) for _, c, n in sorted(rows, key=lambda r: -r[1])[:60]],
        "top_self": [(round(s / 1e6, 3), n) for s, _, n in sorted(rows, key=lambda r: -r[0])[:40]],
        "self_by_package_s": {k: round(v / 1e6, 3) for k, v in selfs.most_common(25)},
        "of_total_s": round(total / 1e6, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default="imports,embed,llm")
    args = parser.parse_args()
    from src.settings import load_settings

    settings = load_settings()
    out: dict[str, Any] = {"device": torch.cuda.get_device_name()}
    for part in args.only.split(","):
        try:
            if part == "imports":
                out[part] = diag_imports()
            elif part == "embed":
                out[part] = diag_embed(settings)
            elif part == "llm":
                out[part] = diag_llm(settings)
        except Exception:  # a diagnostic: keep the other parts
            import traceback

            out[part] = {"error": traceback.format_exc()[-3000:]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=str))
        print(f"== {part} done", flush=True)


if __name__ == "__main__":
    main()
