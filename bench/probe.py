"""Kernel-level A/B probes on the true-size random-weight models (GPU only).

    python -m bench.probe --models /tmp/bench-models --out results/probe.json

Times, on the models ``bench.build_models`` wrote, settings the worker could change, against
its defaults (results: docs/PERFORMANCE.md, "Probes"). ``--only`` picks probes:

- ``sdxl_unet_step_s``: the SDXL UNet, one CFG step (batch 2, 1024x1024), eager, with
  PyTorch's default SDPA kernel (named in the result), cuDNN attention first, and flash only;
- ``sdxl_unet_compiled_step_s``: the same step through ``torch.compile`` (inductor, the code
  AOTInductor generates too) with the batch static and dynamic, each called directly and replayed
  from a CUDA graph; plus the SDXL VAE decode compiled;
- ``sdxl_vae_decode_s`` / ``wan_vae_decode_s``: the SDXL VAE decode of one 1024x1024 image and
  the Wan VAE decode of 81 frames at 832x480 (fp32), with the default cuDNN convolution
  algorithms, ``torch.backends.cudnn.benchmark``, and channels-last memory format (the Wan VAE's
  5-D tensors: ``channels_last_3d``).

Each figure is the median of several synchronized runs after one untimed run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.run import timed


def _median_s(call: Callable[[], Any], runs: int) -> float:
    call()  # first-call costs (and the cuDNN algorithm search in benchmark mode)
    return round(statistics.median(timed(call)[1] for _ in range(runs)), 4)


def _variants(
    model: torch.nn.Module, call: Callable[[], Any], runs: int, contexts: dict[str, Callable[[], Any]]
) -> dict[str, float]:
    """Time ``call`` under each named setting (a context factory), restoring defaults after each."""
    results = {}
    for name, context in contexts.items():
        torch.backends.cudnn.benchmark = "benchmark" in name
        model.to(memory_format=_memory_format(name))
        with torch.inference_mode(), context():
            results[name] = _median_s(call, runs)
        print(f"  {name}: {results[name]} s", flush=True)
    torch.backends.cudnn.benchmark = False
    model.to(memory_format=torch.contiguous_format)
    return results


def _memory_format(variant: str) -> torch.memory_format:
    if "channels_last_3d" in variant:
        return torch.channels_last_3d
    return torch.channels_last if "channels_last" in variant else torch.contiguous_format


def probe_sdxl_unet(models: Path, runs: int) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    from src.sdxl.compiled_unet import example_inputs

    unet = UNet2DConditionModel.from_pretrained(models / "sdxl" / "unet", dtype=torch.float16).to("cuda")
    inputs = example_inputs(unet, (128, 128), 2)
    added = {"text_embeds": inputs[3], "time_ids": inputs[4]}

    def step() -> Any:
        return unet(inputs[0], inputs[1], inputs[2], added_cond_kwargs=added, return_dict=False)

    cudnn_first = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    contexts: dict[str, Callable[[], AbstractContextManager[Any]]] = {
        "default_sdpa": nullcontext,
        "cudnn_sdpa": lambda: sdpa_kernel(cudnn_first, set_priority=True),
        "flash_sdpa": lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION]),
        "default_sdpa_again": nullcontext,  # order effects (clocks, caches) show as a difference
    }
    q = torch.randn(2, 10, 4096, 64, device="cuda", dtype=torch.float16)  # the 64x64 level's self-attention
    choice = SDPBackend(torch._fused_sdp_choice(q, q, q)).name
    print(f"SDXL UNet, one CFG step (default SDPA kernel for self-attention: {choice}):", flush=True)
    return {"default_kernel": choice, **_variants(unet, step, runs, contexts)}


def _cuda_graph(
    call: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]
) -> Callable[[], torch.Tensor]:
    """``call(*inputs)`` captured in a CUDA graph (after a run on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = call(*inputs)

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    return replay


def probe_sdxl_unet_compiled(models: Path, runs: int) -> dict[str, Any]:
    """One CFG step compiled with a static and a dynamic batch, direct and from a CUDA graph."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from src.sdxl.compiled_unet import _Exported, example_inputs

    unet = UNet2DConditionModel.from_pretrained(models / "sdxl" / "unet", dtype=torch.float16).to("cuda")
    exported = _Exported(unet)
    inputs = example_inputs(unet, (128, 128), 2)
    results: dict[str, Any] = {}
    with torch.inference_mode():
        results["eager"] = _median_s(lambda: exported(*inputs), runs)
        for name in ("static_batch", "dynamic_batch"):
            torch._dynamo.reset()
            compiled = torch.compile(exported, dynamic=False if name == "static_batch" else None)
            if name == "dynamic_batch":
                for index in (0, 2, 3, 4):
                    torch._dynamo.mark_dynamic(inputs[index], 0)
            results[f"{name}_compile_s"] = round(timed(lambda: compiled(*inputs))[1], 1)  # noqa: B023
            results[name] = _median_s(lambda: compiled(*inputs), runs)  # noqa: B023
            replay = _cuda_graph(compiled, inputs)
            fresh = example_inputs(unet, (128, 128), 2)
            for buffer, value in zip(inputs, fresh, strict=True):
                buffer.copy_(value)
            error = (replay().float() - compiled(*fresh).float()).abs().max().item()
            results[f"{name}_cuda_graph"] = _median_s(replay, runs)
            results[f"{name}_cuda_graph_max_abs_diff"] = error
            print(f"  {name}: {results}", flush=True)
    torch._dynamo.reset()
    with torch.inference_mode():
        vae = AutoencoderKL.from_pretrained(models / "sdxl" / "vae", dtype=torch.float16).to("cuda")
        latents = torch.randn(1, 4, 128, 128, device="cuda", dtype=torch.float16)
        results["vae_decode_eager"] = _median_s(lambda: vae.decode(latents), runs)
        decode = torch.compile(vae.decode, dynamic=False)
        results["vae_decode_compile_s"] = round(timed(lambda: decode(latents))[1], 1)
        results["vae_decode_compiled"] = _median_s(lambda: decode(latents), runs)
    print(f"SDXL UNet step compiled: {results}", flush=True)
    return results


def probe_sdxl_vae(models: Path, runs: int) -> dict[str, float]:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(models / "sdxl" / "vae", dtype=torch.float16).to("cuda")
    latents = torch.randn(1, 4, 128, 128, device="cuda", dtype=torch.float16)
    print("SDXL VAE decode, 1024x1024:", flush=True)
    return _variants(vae, lambda: vae.decode(latents), runs, _conv_contexts())


def probe_wan_vae(models: Path, runs: int) -> dict[str, float]:
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(models / "wan-t2v" / "vae", dtype=torch.float32).to("cuda")
    latents = torch.randn(1, 16, 21, 60, 104, device="cuda")
    print("Wan VAE decode, 81 frames 832x480 (fp32):", flush=True)
    results = {}
    convolutions = [m for m in vae.modules() if isinstance(m, torch.nn.Conv3d)]
    for name in ("default", "benchmark", "channels_last_3d", "default_again"):
        torch.backends.cudnn.benchmark = name == "benchmark"
        for conv in convolutions:  # its other parameters are not 5-D
            conv.weight.data = conv.weight.data.contiguous(memory_format=_memory_format(name))
        inputs = latents.contiguous(memory_format=_memory_format(name))
        with torch.inference_mode():
            results[name] = _median_s(lambda: vae.decode(inputs), runs)  # noqa: B023
        print(f"  {name}: {results[name]} s", flush=True)
    torch.backends.cudnn.benchmark = False
    return results


def probe_wan_vae_dtype(models: Path, runs: int) -> dict[str, float]:
    """The Wan VAE decode of 81 frames at 832x480 in fp32 and in bf16 (channels-last 3-D weights, as
    the worker loads it), and the bf16 video's relative error against the fp32 one."""
    from diffusers import AutoencoderKLWan

    from src.acceleration import conv3d_channels_last
    from src.fast_path import relative_error

    latents = torch.randn(1, 16, 21, 60, 104, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results: dict[str, float] = {}
    videos = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        vae = AutoencoderKLWan.from_pretrained(models / "wan-t2v" / "vae", dtype=dtype).to("cuda")
        conv3d_channels_last(vae)
        inputs = latents.to(dtype)
        with torch.inference_mode():
            results[name] = _median_s(lambda vae=vae, inputs=inputs: vae.decode(inputs), runs)
            videos[name] = vae.decode(inputs).sample.float()
        print(f"  Wan VAE decode {name}: {results[name]} s", flush=True)
        vae.to("cpu")
        torch.cuda.empty_cache()
    results["bfloat16_relative_error"] = round(relative_error(videos["bfloat16"], videos["float32"]), 5)
    results["bfloat16_max_abs_error"] = round((videos["bfloat16"] - videos["float32"]).abs().max().item(), 4)
    return results


def probe_lora_apply(models: Path, runs: int) -> dict[str, Any]:
    """Applying a LoRA already on local disk (``MergedLoras.use``) and restoring the weights: a rank-64
    SDXL LoRA (UNet attention and feed-forward, both text encoders) and a rank-32 Wan LoRA (every block)."""
    from diffusers import StableDiffusionXLPipeline, WanPipeline

    from src.loras.apply import MergedLoras
    from src.loras.files import LoraFile, file_sha256
    from tests import loras as kit

    results: dict[str, Any] = {}
    sdxl_components = ["unet", "text_encoder", "text_encoder_2"]
    cases = {
        "sdxl_rank64": (StableDiffusionXLPipeline, "sdxl", torch.float16, sdxl_components, 64),
        "wan_rank32": (WanPipeline, "wan-t2v", torch.bfloat16, ["transformer"], 32),
    }
    for name, (cls, folder, dtype, components, rank) in cases.items():
        pipe = cls.from_pretrained(models / folder, dtype=dtype).to("cuda")
        patterns = {
            "unet": kit.SDXL_UNET_FULL,
            "text_encoder": kit.SDXL_TEXT_FULL,
            "text_encoder_2": kit.SDXL_TEXT_FULL,
        }
        factors = kit.join(
            *(
                kit.factors(getattr(pipe, c), patterns.get(c, kit.WAN_TARGETS), rank, 1, f"{c}.")
                for c in components
            )
        )
        path = Path(f"/tmp/probe-{name}.safetensors")
        path.write_bytes(kit.to_bytes({k: v.half() for k, v in kit.peft_layout(factors).items()}))
        lora = LoraFile(path, file_sha256(path), 0.8, "config.loras[0]", {"name": name})
        fused = MergedLoras(pipe, components, name)
        apply_s, restore_s = [], []
        for _ in range(runs):
            apply_s.append(timed(fused.use, [lora])[1])
            restore_s.append(timed(fused.use, [])[1])
        results[name] = {
            "layers": len(factors.layers),
            "file_mb": round(path.stat().st_size / 1e6, 1),
            "apply_s": [round(s, 3) for s in apply_s],
            "restore_s": [round(s, 3) for s in restore_s],
        }
        print(f"  LoRA {name}: {results[name]}", flush=True)
        del pipe, fused
        torch.cuda.empty_cache()
    return results


def probe_llm_decode(
    models: Path, runs: int, new_tokens: int = 256, prompt_tokens: int = 200
) -> dict[str, Any]:
    """256 new tokens of a Qwen2.5-7B-shaped model (random bf16 weights, greedy, length forced): plain
    ``generate``, and a static KV cache with each decode step replayed from a CUDA graph (eager kernels,
    nothing compiled); ``+compile``: ``generate`` with a static cache, which torch.compiles its step."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, StaticCache

    from bench.build_models import QWEN_7B, _on_gpu, _randomise

    model = _randomise(_on_gpu(torch.bfloat16, lambda: Qwen2ForCausalLM(Qwen2Config(**QWEN_7B))), 11).eval()
    ids = torch.randint(
        0, 150000, (1, prompt_tokens), device="cuda", generator=torch.Generator("cuda").manual_seed(1)
    )
    results: dict[str, Any] = {
        "weights_gib": round(sum(p.numel() * 2 for p in model.parameters()) / 2**30, 2)
    }
    fixed = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        plain = [timed(model.generate, ids, **fixed)[1] for _ in range(2)]
        results["plain_generate_s"] = [round(s, 3) for s in plain]
        print(f"  LLM plain generate: {results['plain_generate_s']}", flush=True)

        cache = StaticCache(config=model.config, max_cache_len=prompt_tokens + new_tokens + 8)

        def graphed() -> torch.Tensor:
            cache.reset()
            logits = model(
                ids, past_key_values=cache, cache_position=torch.arange(prompt_tokens, device="cuda")
            ).logits
            token[:] = logits[:, -1].argmax(-1, keepdim=True)
            out = [token.clone()]  # the prefill's token, then one graph replay per new token
            for step in range(new_tokens - 1):
                position.fill_(prompt_tokens + step)
                graph.replay()
                token.copy_(next_token)
                out.append(next_token.clone())
            return torch.cat(out, dim=1)

        token = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        position = torch.zeros(1, dtype=torch.long, device="cuda")
        cache.reset()
        model(ids, past_key_values=cache, cache_position=torch.arange(prompt_tokens, device="cuda"))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model(token, past_key_values=cache, cache_position=position)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        started = time.perf_counter()
        with torch.cuda.graph(graph):
            next_token = (
                model(token, past_key_values=cache, cache_position=position)
                .logits[:, -1]
                .argmax(-1, keepdim=True)
            )
        torch.cuda.synchronize()
        results["graph_capture_s"] = round(time.perf_counter() - started, 3)
        graphed()
        results["static_cuda_graph_s"] = [round(timed(graphed)[1], 3) for _ in range(3)]
        print(f"  LLM static cache + CUDA graph: {results['static_cuda_graph_s']}", flush=True)
        compiled = {**fixed, "cache_implementation": "static"}
        results["static_compile_first_s"] = round(timed(model.generate, ids, **compiled)[1], 1)
        results["static_compile_s"] = [round(timed(model.generate, ids, **compiled)[1], 3) for _ in range(2)]
        print(f"  LLM static cache + compile: {results}", flush=True)
    return results


def _conv_contexts() -> dict[str, Callable[[], AbstractContextManager[Any]]]:
    return {
        name: nullcontext for name in ("default", "benchmark", "channels_last", "channels_last_benchmark")
    }


PROBES: dict[str, Callable[[Path, int], Any]] = {
    "sdxl_unet_step_s": probe_sdxl_unet,
    "sdxl_unet_compiled_step_s": probe_sdxl_unet_compiled,
    "sdxl_vae_decode_s": probe_sdxl_vae,
    "wan_vae_decode_s": probe_wan_vae,
    "wan_vae_dtype_s": probe_wan_vae_dtype,
    "lora_apply_s": probe_lora_apply,
    "llm_decode_s": probe_llm_decode,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("/tmp/bench-models"))
    parser.add_argument("--out", type=Path, default=Path("bench-results/probe.json"))
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant (Wan VAE: half)")
    parser.add_argument("--only", default="sdxl_unet_step_s,sdxl_vae_decode_s,wan_vae_decode_s")
    args = parser.parse_args()
    results: dict[str, Any] = {"card": torch.cuda.get_device_name()}
    for name in args.only.split(","):
        runs = max(2, args.runs // 2) if name.startswith("wan") else args.runs
        results[name] = PROBES[name](args.models, runs)
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
