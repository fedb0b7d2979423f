"""LoRA adapters per job, end to end on the tiny models: LoRA files the tests make (PEFT, kohya,
musubi and ComfyUI layouts), served over HTTP on 127.0.0.1 or named in LORAS_DIR, assets in the moto
S3 server. What a user checks: the image changes, the next job's bytes are as if no LoRA had ever
been loaded, files are downloaded once, and every bad input is one error naming its field."""

from __future__ import annotations

import gc
import hashlib
import http.server
import io
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import requests
import torch
from PIL import Image

from src.contract import LoraSpec
from src.loras import apply
from src.loras.apply import MergedLoras
from src.loras.files import LoraFile, LoraFiles
from src.media.download import Download
from src.sdxl.prompts import PromptEncoder
from src.worker import Worker
from tests import loras as kit
from tests.conftest import BUCKET, ImageServer, free_port, list_keys
from tests.test_harness import api_server, s3_env

MAX_BYTES = 1 << 20


def lora_files(root: Path, **changes: Any) -> LoraFiles:
    values: dict[str, Any] = {
        "loras_dir": root / "loras",
        "cache_dir": root / "cache",
        "cache_bytes": 1 << 30,
        "max_loras": 4,
        "fetch": Download("LoRA", MAX_BYTES, 5.0),
    }
    (root / "loras").mkdir(parents=True, exist_ok=True)
    return LoraFiles(**{**values, **changes})


@pytest.fixture(scope="module")
def sdxl_factors(sdxl_worker: Worker) -> kit.Factors:
    pipe = sdxl_worker.families[0].text2img
    return kit.join(
        kit.factors(pipe.unet, kit.SDXL_UNET_TARGETS, 4, 1, "unet."),
        kit.factors(pipe.text_encoder, kit.SDXL_TEXT_TARGETS, 4, 2, "text_encoder."),
        kit.factors(pipe.text_encoder_2, kit.SDXL_TEXT_TARGETS, 4, 3, "text_encoder_2."),
    )


@pytest.fixture(scope="module")
def wan_factors(wan_worker: Worker) -> kit.Factors:
    return kit.factors(wan_worker.families[0].text2video.transformer, kit.WAN_TARGETS, 4, 5, "transformer.")


@pytest.fixture(scope="module")
def served(
    image_server: ImageServer, sdxl_factors: kit.Factors, wan_factors: kit.Factors
) -> dict[str, bytes]:
    """LoRA files on the test server, by path."""
    files = {
        "/sdxl.safetensors": kit.to_bytes(kit.peft_layout(sdxl_factors)),
        "/wan.safetensors": kit.to_bytes(kit.peft_layout(wan_factors)),
    }
    for path, body in files.items():
        image_server.add(path, body, "application/octet-stream")
    return files


@pytest.fixture
def sdxl(sdxl_worker: Worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Worker:
    """The tiny SDXL worker with its own LORAS_DIR and cache; 127.0.0.1 URLs allowed."""
    monkeypatch.setattr(sdxl_worker.families[0], "loras", lora_files(tmp_path))
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
    return sdxl_worker


@pytest.fixture
def wan(wan_worker: Worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Worker:
    monkeypatch.setattr(wan_worker.families[0], "loras", lora_files(tmp_path))
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
    return wan_worker


def run(
    worker: Worker, job_id: str, loras: list[dict[str, Any]] | None = None, **changes: Any
) -> dict[str, Any]:
    video = any(family.name == "wan" for family in worker.families)
    config: dict[str, Any] = {"width": 256, "height": 256, "num_inference_steps": 2, "seed": 3}
    config.update({"num_frames": 5} if video else {"width": 512, "height": 512})
    if loras is not None:
        config["loras"] = loras
    payload = {"id": job_id, "type": "video_fast" if video else "sdxl_image_fast", "prompt": "a red boat"}
    payload.update(user_id="loras", config=config, **changes)
    return worker.handle({"id": "rp", "input": payload})


def stored(s3: Any, result: dict[str, Any]) -> bytes:
    assert result["status"] == "completed", result
    return s3.get_object(Bucket=BUCKET, Key=result["assets"][0]["url"].split("/", 1)[1])["Body"].read()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


# ------------------------------------------------------------------------------------ SDXL


def test_a_sdxl_lora_changes_the_image_and_the_next_job_is_untouched(
    sdxl: Worker, s3: Any, image_server: ImageServer, served: dict[str, bytes]
) -> None:
    before = stored(s3, run(sdxl, "sdxl-plain-1"))
    url = image_server.base + "/sdxl.safetensors?X-Amz-Signature=abc"
    result = run(sdxl, "sdxl-lora-1", [{"url": url, "scale": 0.8}])
    with_lora = stored(s3, result)
    assert np.abs(pixels(with_lora) - pixels(before)).max() > 20  # the LoRA changed the image
    digest = hashlib.sha256(served["/sdxl.safetensors"]).hexdigest()
    assert result["assets"][0]["metadata"]["loras"] == [
        {"url": image_server.base + "/sdxl.safetensors", "scale": 0.8, "sha256": digest}
    ]
    after = run(sdxl, "sdxl-plain-2")
    assert stored(s3, after) == before  # byte-identical: nothing of the LoRA is left
    assert "loras" not in after["assets"][0]["metadata"]
    zero = run(sdxl, "sdxl-scale-0", [{"url": url, "scale": 0.0}])
    assert stored(s3, zero) == before  # scale 0 is no LoRA


def test_a_weighted_prompt_under_a_lora_is_weighted_from_the_loras_empty_prompt(
    sdxl: Worker, s3: Any, image_server: ImageServer, served: dict[str, bytes]
) -> None:
    """Compel weights from the empty prompt's embedding, which a LoRA on the text encoders changes:
    the UNet gets what a new encoder computes with the LoRA merged (not the embedding the worker
    kept from before), and the next job without the LoRA gets exactly what it got before."""
    pipe = sdxl.families[0].text2img
    prompt, url = "a (red:1.3) boat", image_server.base + "/sdxl.safetensors"
    seen: list[torch.Tensor] = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"][-1:].clone()),
        with_kwargs=True,
    )
    try:
        before = stored(s3, run(sdxl, "weighted-plain-1", prompt=prompt))
        stored(s3, run(sdxl, "weighted-lora", [{"url": url, "scale": 0.8}], prompt=prompt))
        under_lora = seen[-1]  # the prompt's row of the CFG batch
        expected = PromptEncoder(pipe).embed(prompt, None, weighting=True, clip_skip=0).embeds  # still merged
        after = stored(s3, run(sdxl, "weighted-plain-2", prompt=prompt))
    finally:
        hook.remove()
    torch.testing.assert_close(under_lora, expected)
    assert after == before


def test_kohya_and_peft_layouts_give_the_same_image(sdxl: Worker, s3: Any, sdxl_factors: kit.Factors) -> None:
    family = sdxl.families[0]
    layers = family.text2img.unet.config.layers_per_block
    (family.loras.loras_dir / "peft.safetensors").write_bytes(kit.to_bytes(kit.peft_layout(sdxl_factors)))
    (family.loras.loras_dir / "kohya.safetensors").write_bytes(
        kit.to_bytes(kit.kohya_sdxl_layout(sdxl_factors, layers))
    )
    peft = stored(s3, run(sdxl, "layout-peft", [{"name": "peft", "scale": 0.7}]))
    kohya = run(sdxl, "layout-kohya", [{"name": "kohya", "scale": 0.7}])
    assert kohya["assets"][0]["metadata"]["loras"][0]["name"] == "kohya"
    assert np.abs(pixels(stored(s3, kohya)) - pixels(peft)).max() <= 1


def test_merged_weights_follow_the_lora_formula_and_are_restored_exactly(
    sdxl: Worker, sdxl_factors: kit.Factors, tmp_path: Path
) -> None:
    """Inside the job each adapted weight is W + scale * alpha / rank * up @ down (an independent
    computation, in float64); afterwards the very same storage holds the original bytes."""
    pipe = sdxl.families[0].text2img
    path = tmp_path / "f.safetensors"
    path.write_bytes(kit.to_bytes(kit.peft_layout(sdxl_factors)))
    lora = LoraFile(path, "0" * 64, 0.6, "config.loras[0]", {"name": "f"})
    checked = [
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
        "text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj",
    ]
    weights = {}
    for name in checked:
        component, layer = name.split(".", 1)
        weights[name] = getattr(pipe, component).get_submodule(layer).weight
    originals = {name: (w.data_ptr(), w.detach().clone()) for name, w in weights.items()}
    merged = MergedLoras(pipe, ["unet", "text_encoder", "text_encoder_2"], "SDXL")
    merged.use([lora])
    for name, weight in weights.items():
        expected = originals[name][1].double() + sdxl_factors.delta(name, scale=0.6)
        torch.testing.assert_close(weight.double(), expected, rtol=1e-5, atol=1e-5)
        assert weight.data_ptr() == originals[name][0]  # merged in place: fast paths see it
    assert all(
        type(m).__module__.startswith(("torch", "diffusers", "transformers")) for m in pipe.unet.modules()
    )
    merged.use([])
    for name, weight in weights.items():
        assert weight.data_ptr() == originals[name][0] and torch.equal(weight, originals[name][1])


def test_consecutive_jobs_with_the_same_loras_keep_them_merged(
    sdxl: Worker, s3: Any, sdxl_factors: kit.Factors, monkeypatch: pytest.MonkeyPatch
) -> None:
    family = sdxl.families[0]
    (family.loras.loras_dir / "same.safetensors").write_bytes(kit.to_bytes(kit.peft_layout(sdxl_factors)))
    loads = []
    real = apply.low_rank_updates
    monkeypatch.setattr(apply, "low_rank_updates", lambda *a, **k: loads.append(1) or real(*a, **k))
    first = stored(s3, run(sdxl, "same-1", [{"name": "same", "scale": 0.5}]))
    assert stored(s3, run(sdxl, "same-2", [{"name": "same", "scale": 0.5}])) == first
    assert len(loads) == 1  # the second job found it merged already
    other = stored(s3, run(sdxl, "same-3", [{"name": "same", "scale": 0.9}]))
    assert len(loads) == 2 and other != first  # another scale: applied anew, from the original weights
    assert stored(s3, run(sdxl, "same-4", [{"name": "same", "scale": 0.5}])) == first


def test_many_lora_jobs_leave_no_memory_behind(
    sdxl: Worker, sdxl_factors: kit.Factors, tmp_path: Path
) -> None:
    """A soak of 150 apply-and-restore cycles (300 jobs alternating LoRA and none): resident memory
    stays flat, no adapter is left."""
    pipe = sdxl.families[0].text2img
    path = tmp_path / "soak.safetensors"
    path.write_bytes(kit.to_bytes(kit.peft_layout(sdxl_factors)))
    lora = LoraFile(path, "0" * 64, 1.0, "config.loras[0]", {"name": "soak"})
    components = ["unet", "text_encoder", "text_encoder_2"]
    process = psutil.Process()

    merged = MergedLoras(pipe, components, "SDXL")

    def cycles(count: int) -> None:
        for _ in range(count):
            merged.use([lora])  # applied
            merged.use([])  # and restored
        gc.collect()

    cycles(20)  # allocator and caches settle
    before = process.memory_info().rss
    cycles(150)
    grown = (process.memory_info().rss - before) / 2**20
    assert grown < 48, f"resident memory grew {grown:.1f} MiB over 150 LoRA jobs"
    assert merged.key == () and not merged._applied.saved


# ------------------------------------------------------------------------------- the cache


def test_a_url_or_a_sha256_is_downloaded_once(
    sdxl: Worker, s3: Any, image_server: ImageServer, served: dict[str, bytes]
) -> None:
    image_server.add("/signed-a.safetensors", served["/sdxl.safetensors"], "application/octet-stream")
    image_server.add("/signed-b.safetensors", served["/sdxl.safetensors"], "application/octet-stream")
    digest = hashlib.sha256(served["/sdxl.safetensors"]).hexdigest()
    url = image_server.base + "/signed-a.safetensors?sig=1"
    first = stored(s3, run(sdxl, "cache-1", [{"url": url}]))
    assert stored(s3, run(sdxl, "cache-2", [{"url": url}])) == first
    assert image_server.hits["/signed-a.safetensors"] == 1  # the same URL: from the cache
    other = image_server.base + "/signed-b.safetensors?sig=2"
    assert stored(s3, run(sdxl, "cache-3", [{"url": other, "sha256": digest.upper()}])) == first
    assert image_server.hits["/signed-b.safetensors"] == 0  # another URL, the same sha256: no download
    cache = sdxl.families[0].loras.cache_dir
    assert sorted(p.name for p in cache.glob("*.safetensors")) == [f"{digest}.safetensors"]
    assert not list(cache.glob(".*"))  # no temporary file left


def test_least_recently_used_files_leave_the_cache_first(
    sdxl: Worker,
    s3: Any,
    image_server: ImageServer,
    served: dict[str, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    size = len(served["/sdxl.safetensors"])
    family = sdxl.families[0]
    monkeypatch.setattr(family, "loras", lora_files(tmp_path / "lru", cache_bytes=int(size * 1.5)))
    bodies = {}
    for name, scale in (("a", 1.0), ("b", 2.0)):  # two different files of the same size
        tensors = kit.peft_layout(
            kit.factors(family.text2img.unet, kit.SDXL_UNET_TARGETS, 4, 10 + int(scale), "unet.")
        )
        bodies[name] = kit.to_bytes(tensors)
        image_server.add(f"/lru-{name}.safetensors", bodies[name], "application/octet-stream")
    for name in ("a", "b"):
        stored(s3, run(sdxl, f"lru-{name}", [{"url": f"{image_server.base}/lru-{name}.safetensors"}]))
    kept = {p.stem for p in family.loras.cache_dir.glob("*.safetensors")}
    assert kept == {hashlib.sha256(bodies["b"]).hexdigest()}


def test_an_unwritable_cache_still_serves_lora_jobs(
    sdxl: Worker,
    s3: Any,
    image_server: ImageServer,
    served: dict[str, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache should be")
    monkeypatch.setattr(sdxl.families[0], "loras", lora_files(tmp_path / "x", cache_dir=blocker / "cache"))
    before = image_server.hits["/sdxl.safetensors"]
    url = image_server.base + "/sdxl.safetensors"
    first = stored(s3, run(sdxl, "nocache-1", [{"url": url}]))
    assert stored(s3, run(sdxl, "nocache-2", [{"url": url}])) == first
    assert image_server.hits["/sdxl.safetensors"] == before + 2  # no cache: each job downloads


def test_concurrent_downloads_of_one_file_leave_one_good_file(
    image_server: ImageServer, served: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
    spec = LoraSpec(url=image_server.base + "/sdxl.safetensors?n=1")
    workers = [lora_files(tmp_path) for _ in range(4)]  # four workers sharing one cache directory
    results: list[Any] = [None] * 4
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, workers[i].resolve([spec])))
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    digest = hashlib.sha256(served["/sdxl.safetensors"]).hexdigest()
    assert {files[0].sha256 for files in results} == {digest}
    (cached,) = (tmp_path / "cache").glob("*.safetensors")
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == digest and cached.stem == digest


# ------------------------------------------------------------------------------- bad input


def _drip(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    try:
        for _ in range(40):
            handler.wfile.write(b"\0")
            handler.wfile.flush()
            time.sleep(0.2)
    except OSError:
        pass


def _lying_header(real: bytes) -> bytes:
    """A header whose last tensor ends past the end of the file."""
    length = int.from_bytes(real[:8], "little")
    header = real[8 : 8 + length].decode().rstrip()
    end = len(real) - 8 - length
    return real[:8] + header.replace(str(end), str(end + 4096)).encode().ljust(length) + real[8 + length :]


@pytest.fixture(scope="module")
def bad_files(
    image_server: ImageServer, served: dict[str, bytes], sdxl_factors: kit.Factors
) -> dict[str, str]:
    real = served["/sdxl.safetensors"]
    pickle = io.BytesIO()
    torch.save({"unet.x.lora_A.weight": torch.zeros(2, 2)}, pickle)
    wrong = {
        k: (v[:, :-1] if k.endswith("lora_A.weight") else v) for k, v in kit.peft_layout(sdxl_factors).items()
    }
    bodies = {
        "/pickle.safetensors": pickle.getvalue(),
        "/truncated.safetensors": real[: len(real) // 2],
        "/lying.safetensors": _lying_header(real),
        "/shapes.safetensors": kit.to_bytes(wrong),
    }
    for path, body in bodies.items():
        image_server.add(path, body, "application/octet-stream")
    image_server.add_route("/slow.safetensors", _drip)
    image_server.add_route("/gone.safetensors", lambda handler: handler.send_error(404))
    return {path: image_server.base + path for path in [*bodies, "/slow.safetensors", "/gone.safetensors"]}


def good(image_server: ImageServer) -> dict[str, Any]:
    return {"url": image_server.base + "/sdxl.safetensors"}


BAD = [
    ("unreachable", lambda s, b: [{"url": f"http://127.0.0.1:{free_port()}/x.safetensors"}], "config.loras[0].url: could not fetch the LoRA: ConnectionError"),
    ("http-404", lambda s, b: [good(s), {"url": b["/gone.safetensors"]}], "config.loras[1].url: could not fetch the LoRA: HTTP 404"),
    ("too-large", lambda s, b: [{"url": s.base + "/wan.safetensors", "scale": 1}], "config.loras[0].url: LoRA is larger than 4096 bytes"),
    ("too-slow", lambda s, b: [{"url": b["/slow.safetensors"]}], "config.loras[0].url: LoRA download took longer than 1 s"),
    ("pickle", lambda s, b: [{"url": b["/pickle.safetensors"]}], "config.loras[0]: is not a valid safetensors file ("),
    ("truncated", lambda s, b: [{"url": b["/truncated.safetensors"]}], "config.loras[0]: is not a valid safetensors file ("),
    ("lying-header", lambda s, b: [{"url": b["/lying.safetensors"]}], "config.loras[0]: is not a valid safetensors file ("),
    ("sha256", lambda s, b: [{"url": s.base + "/sdxl.safetensors?v=2", "sha256": "ab" * 32}], "config.loras[0].sha256: the file's SHA-256 is "),
    ("shapes", lambda s, b: [{"url": b["/shapes.safetensors"]}], "config.loras[0]: does not fit the SDXL models: "),
    ("too-many", lambda s, b: [good(s)] * 5, "config.loras: at most 4 LoRAs per job (MAX_LORAS), got 5"),
    ("unknown-name", lambda s, b: [{"name": "missing"}], "config.loras[0].name: no LoRA missing.safetensors in LORAS_DIR"),
    ("slash", lambda s, b: [{"name": "../etc/passwd"}], "config.loras[0].name: must be a file name in LORAS_DIR"),
    ("dots", lambda s, b: [{"name": "a..b"}], "config.loras[0].name: must not contain '..'"),
    ("link-out", lambda s, b: [{"name": "outside"}], "config.loras[0].name: no LoRA outside.safetensors in LORAS_DIR"),
    ("url-and-name", lambda s, b: [{"url": s.base + "/sdxl.safetensors", "name": "x"}], "config.loras[0]: give exactly one of url and name"),
    ("scale", lambda s, b: [{"name": "x", "scale": 3}], "config.loras[0].scale: Input should be less than or equal to 2"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "loras", "error"), BAD, ids=[case[0] for case in BAD])
def test_bad_loras_fail_clearly_store_nothing_and_the_next_job_runs(
    sdxl: Worker, s3: Any, image_server: ImageServer, bad_files: dict[str, str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, case: str, loras: Any, error: str,
) -> None:  # fmt: skip
    family = sdxl.families[0]
    if case == "too-large":
        monkeypatch.setattr(family.loras, "fetch", Download("LoRA", 4096, 5.0))
    if case == "too-slow":
        monkeypatch.setattr(family.loras, "fetch", Download("LoRA", MAX_BYTES, 1.0))
    secret = tmp_path / "outside.safetensors"
    secret.write_bytes(b"not for jobs")
    (family.loras.loras_dir / "outside.safetensors").symlink_to(secret)
    result = run(sdxl, f"bad-{case}", loras(image_server, bad_files))
    assert result["status"] == "failed" and result["error"].startswith(error), result["error"]
    assert list_keys(s3, f"loras/bad-{case}/") == []
    assert stored(s3, run(sdxl, f"after-{case}")) == stored(s3, run(sdxl, "after-baseline"))


def test_a_private_address_is_refused_without_the_sdk_setting(
    sdxl: Worker, image_server: ImageServer, served: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS")
    result = run(sdxl, "private", [{"url": image_server.base + "/sdxl.safetensors"}])
    assert result["error"].startswith("config.loras[0].url: refused to fetch the LoRA: ")


# ------------------------------------------------------------------------------------- Wan


def test_a_wan_lora_changes_the_video_in_every_layout_and_leaves_nothing_behind(
    wan: Worker, s3: Any, image_server: ImageServer, served: dict[str, bytes], wan_factors: kit.Factors
) -> None:
    before = stored(s3, run(wan, "wan-plain-1"))
    result = run(wan, "wan-lora-1", [{"url": image_server.base + "/wan.safetensors"}])
    with_lora = stored(s3, result)
    assert with_lora != before and result["assets"][0]["metadata"]["loras"][0]["scale"] == 1.0
    directory = wan.families[0].loras.loras_dir
    for layout, tensors in (
        ("musubi", kit.musubi_wan_layout(wan_factors)),
        ("comfy", kit.comfy_wan_layout(wan_factors)),
    ):
        (directory / f"{layout}.safetensors").write_bytes(kit.to_bytes(tensors))
        assert stored(s3, run(wan, f"wan-{layout}", [{"name": layout}])) == with_lora, layout
    assert stored(s3, run(wan, "wan-plain-2")) == before


def test_a_wan_lora_applies_to_the_vace_transformer(
    wan: Worker, s3: Any, image_server: ImageServer, served: dict[str, bytes]
) -> None:
    reference = {"reference_image_url": image_server.add_image("/lora-ref.png", (256, 256))}
    plain = stored(s3, run(wan, "vace-plain", metadata=reference))
    result = run(wan, "vace-lora", [{"url": image_server.base + "/wan.safetensors"}], metadata=reference)
    assert result["metadata"]["reference_mode"] == "single" and stored(s3, result) != plain
    assert stored(s3, run(wan, "vace-plain-2", metadata=reference)) == plain


def test_a_sdxl_lora_on_a_wan_job_matches_no_layer(
    wan: Worker, s3: Any, image_server: ImageServer, served: dict[str, bytes]
) -> None:
    result = run(wan, "wan-sdxl-lora", [{"url": image_server.base + "/sdxl.safetensors"}])
    assert (
        result["error"] == "config.loras[0]: matches no layer of the Wan models (a LoRA for another model?)"
    )
    assert list_keys(s3, "loras/wan-sdxl-lora/") == []


# ------------------------------------------------------------------------- the local API


def test_lora_jobs_through_the_local_api(
    s3: Any, s3_endpoint: str, image_server: ImageServer, served: dict[str, bytes], tmp_path: Path
) -> None:
    env = {
        **s3_env(s3_endpoint),
        "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "true",
        "LORA_CACHE_DIR": str(tmp_path),
    }
    lora = {"url": image_server.base + "/sdxl.safetensors", "scale": 0.5}
    job = {"id": "api-lora", "type": "sdxl_image_fast", "prompt": "a boat", "user_id": "loras",
           "config": {"width": 512, "height": 512, "num_inference_steps": 2, "loras": [lora]}}  # fmt: skip
    with api_server(env) as base:
        ok = requests.post(f"{base}/runsync", json={"input": job}, timeout=240).json()
        bad = requests.post(
            f"{base}/runsync",
            json={"input": {**job, "id": "api-lora-bad", "config": {"loras": [{"name": "../x"}]}}},
            timeout=60,
        ).json()
    assert ok["status"] == "COMPLETED", ok
    assert ok["output"]["assets"][0]["metadata"]["loras"][0]["scale"] == 0.5
    assert list_keys(s3, "loras/api-lora/") == ["loras/api-lora/0.png", "loras/api-lora/0.thumb.webp"]
    assert bad["status"] == "FAILED" and bad["error"].startswith("config.loras[0].name: ")
