"""Where a job's GPU time goes (GPU only): the models' calls and the kernels, by kind.

- Spans (a run without the profiler): each model call the pipelines make (text encoders, UNet
  or transformer, VAE, scheduler step) between two CUDA events, so a span is GPU time from
  its first kernel's start to its last kernel's end, idle gaps inside it included.
- Kernels (a second run, under torch.profiler): busy time (the union of kernel, copy and set
  intervals) against the job's wall time, the sum per kind of kernel, the longest kernels.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# First match wins; matched against the kernel's name.
KINDS = (
    ("attention", re.compile(r"fmha|flash|attention|sdpa|cudnn_generated|sm90_.*_fprop_.*attn", re.I)),
    ("convolution", re.compile(r"conv|implicit_gemm|implicit_convolve|wgrad|dgrad|fprop", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|s16816|h16816|sm90_|ampere_|magma", re.I)),
    ("inductor", re.compile(r"^triton_", re.I)),
    ("layout", re.compile(r"nchwToNhwc|nhwcToNchw|transpose", re.I)),
)


class GpuSpans:
    """CUDA-event spans around named callables (attributes of objects), summed per name."""

    def __init__(self) -> None:
        self.events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = defaultdict(list)
        self._restore: list[tuple[Any, str, Any, bool]] = []

    def wrap(self, name: str, owner: Any, attribute: str) -> None:
        """Time every call of ``owner.attribute`` under ``name``."""
        had_own = attribute in vars(owner)
        original = getattr(owner, attribute)

        def call(*args: Any, **kwargs: Any) -> Any:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = original(*args, **kwargs)
            end.record()
            self.events[name].append((start, end))
            return result

        setattr(owner, attribute, call)
        self._restore.append((owner, attribute, original, had_own))

    def unwrap(self) -> None:
        for owner, attribute, original, had_own in reversed(self._restore):
            if had_own:
                setattr(owner, attribute, original)
            else:
                delattr(owner, attribute)
        self._restore.clear()

    def totals(self) -> dict[str, dict[str, Any]]:
        """Per name: calls, GPU seconds, and each call's milliseconds up to 60 calls (synchronizes)."""
        torch.cuda.synchronize()
        totals = {}
        for name, pairs in self.events.items():
            each_ms = [round(start.elapsed_time(end), 2) for start, end in pairs]
            totals[name] = {"calls": len(pairs), "gpu_s": round(sum(each_ms) / 1000, 4)}
            if len(pairs) <= 60:
                totals[name]["each_ms"] = each_ms
        return totals


def _kind(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def kernel_summary(trace: dict[str, Any], wall_s: float, top: int = 25) -> dict[str, Any]:
    """Busy time, time per kind and the longest kernels of a Chrome trace (torch.profiler's)."""
    intervals, per_kind, per_name = [], defaultdict(float), defaultdict(lambda: [0, 0.0])
    for event in trace.get("traceEvents", []):
        category = event.get("cat", "")
        if event.get("ph") != "X" or category not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        start, duration = float(event["ts"]), float(event.get("dur", 0.0))
        intervals.append((start, start + duration))
        name = event.get("name", "?")
        per_kind[_kind(name) if category == "kernel" else category] += duration
        per_name[name][0] += 1
        per_name[name][1] += duration
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    longest = sorted(per_name.items(), key=lambda item: -item[1][1])[:top]
    return {
        "wall_s": round(wall_s, 4),
        "gpu_busy_s": round(busy / 1e6, 4),
        "gpu_idle_s": round(wall_s - busy / 1e6, 4),
        "kernels": sum(count for count, _ in per_name.values()),
        "per_kind_s": {
            kind: round(us / 1e6, 4) for kind, us in sorted(per_kind.items(), key=lambda i: -i[1])
        },
        "longest": [
            {"name": name[:120], "kind": _kind(name), "count": count, "total_ms": round(us / 1e3, 2)}
            for name, (count, us) in longest
        ],
    }


def model_calls(families: list[Any]) -> list[tuple[str, Any, str]]:
    """The (name, owner, attribute) of each model call worth a span, for the loaded families."""
    calls: list[tuple[str, Any, str]] = []
    for family in families:
        if family.name == "sdxl":
            pipe = family.text2img
            calls += [
                ("sdxl.text_encoders", pipe.text_encoder, "forward"),
                ("sdxl.text_encoders", pipe.text_encoder_2, "forward"),
                ("sdxl.unet", pipe.unet, "forward"),
                ("sdxl.vae_decode", pipe.vae, "decode"),
                ("sdxl.scheduler_step", pipe.scheduler, "step"),
            ]
        else:
            t2v, vace = family.text2video, family.vace
            calls += [
                ("wan.text_encoder", t2v.text_encoder, "forward"),
                ("wan.transformer", t2v.transformer, "forward"),
                ("wan.vace_transformer", vace.transformer, "forward"),
                ("wan.vae_encode", t2v.vae, "encode"),
                ("wan.vae_decode", t2v.vae, "decode"),
                ("wan.scheduler_step", t2v.scheduler, "step"),
                ("wan.vace_scheduler_step", vace.scheduler, "step"),
            ]
    return calls


def _with_spans(call: Callable[[], Any], families: list[Any]) -> tuple[Any, GpuSpans]:
    spans = GpuSpans()
    for name, owner, attribute in model_calls(families):
        spans.wrap(name, owner, attribute)
    try:
        return call(), spans
    finally:
        spans.unwrap()


def profiled(call: Callable[[], Any], families: list[Any]) -> tuple[Any, dict[str, Any]]:
    """Run ``call`` with spans around the families' model calls, then again under the profiler.

    The profiler slows the host (every launch is recorded), so the spans come from the first run.
    """
    from torch.profiler import ProfilerActivity, profile

    _, spans = _with_spans(call, families)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        started = time.perf_counter()
        result, _ = _with_spans(call, families)
        torch.cuda.synchronize()
        wall_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    return result, {"spans": spans.totals(), **kernel_summary(trace, wall_s)}
