"""What the builder writes, from the fake hub cache (tests/fake_hub.py): the layout and dtypes, the
worker loading it with ``MODEL_PROFILE=full``, the skip on a second run and the rebuild of a damaged
model, and the streaming dtype conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from builder.build import BuildOptions, build
from builder.hashed_io import CHUNK, file_sha256
from builder.layout import FASTWAN_REPO, PROMPT_REPO, WAN_T2V_REPO, Step
from builder.manifest import MANIFEST
from builder.sources import CacheSource, Snapshot, repo_folder
from builder.transfer import transfer
from src.prompt.family import PromptFamily
from src.settings import Settings, StartupError
from src.worker import start_worker
from tests import fake_hub
from tests.fake_hub import add_commit, cli, run_builder

# the fake hub's fixtures, requested by name below
built, hub_cache, offline = fake_hub.built, fake_hub.hub_cache, fake_hub.offline


def dtypes(path: Path) -> set[str]:
    """The tensor dtypes a safetensors file holds."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def copy_models(src: Path, dst: Path) -> Path:
    """A copy of a built MODELS_DIR (links kept) to damage."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_layout_and_dtypes(built: Path) -> None:
    sdxl = built / "sdxl"
    assert (sdxl / "model_index.json").is_file() and not (sdxl / "sd_xl_base_1.0.safetensors").exists()
    for component in ("unet", "text_encoder", "text_encoder_2"):
        names = sorted(p.name for p in (sdxl / component).glob("*.safetensors"))
        assert names == [
            "diffusion_pytorch_model.safetensors" if component == "unet" else "model.safetensors"
        ]  # the fp16 variant, stored under the name from_pretrained loads
    assert dtypes(sdxl / "unet" / "diffusion_pytorch_model.safetensors") == {"F16"}
    vae_config = json.loads((sdxl / "vae" / "config.json").read_text())
    assert vae_config["_name_or_path"] == "madebyollin/sdxl-vae-fp16-fix"  # the fp16-fix VAE, not base's
    assert vae_config["force_upcast"] is False
    assert dtypes(sdxl / "vae" / "diffusion_pytorch_model.safetensors") == {"F16"}

    t2v = built / "wan-t2v"
    shards = sorted((t2v / "text_encoder").glob("model-*.safetensors"))
    assert len(shards) == 2 and all(dtypes(p) == {"BF16"} for p in shards)  # published fp32, stored bf16
    index = json.loads((t2v / "text_encoder" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for p in shards for t in load_file(p).values()
    )
    assert dtypes(t2v / "transformer" / "diffusion_pytorch_model.safetensors") == {"BF16"}
    assert dtypes(t2v / "vae" / "diffusion_pytorch_model.safetensors") == {"F32"}
    with safe_open(shards[0], "pt") as f:  # the streaming writer's files load with safetensors itself
        assert f.metadata() == {"format": "pt"} and f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16

    vace = built / "wan-vace"
    assert (vace / "model_index.json").is_file() and (vace / "scheduler" / "scheduler_config.json").is_file()
    assert dtypes(vace / "transformer" / "diffusion_pytorch_model.safetensors") == {"BF16"}
    for shared in ("text_encoder", "tokenizer", "vae"):
        assert os.readlink(vace / shared) == f"../wan-t2v/{shared}" and (vace / shared).is_dir()

    turbo = built / "wan-turbo"  # FastWan: its own transformer; the rest is T2V's, linked
    assert (turbo / "model_index.json").is_file() and (
        turbo / "scheduler" / "scheduler_config.json"
    ).is_file()
    assert dtypes(turbo / "transformer" / "diffusion_pytorch_model.safetensors") == {"BF16"}
    for shared in ("text_encoder", "tokenizer", "vae"):
        assert os.readlink(turbo / shared) == f"../wan-t2v/{shared}" and (turbo / shared).is_dir()

    manifest = json.loads((t2v / MANIFEST).read_text())
    assert manifest["sources"][WAN_T2V_REPO]["from"].startswith("hub cache ")
    for rel, info in manifest["files"].items():
        assert file_sha256(t2v / rel) == info["sha256"]


def test_built_models_load_and_run_in_the_worker(built: Path, tmp_path: Path) -> None:
    settings = Settings(
        models_dir=built,
        model_profile="full",
        worker_models=["sdxl", "wan"],
        device="cpu",
        local_storage_dir=tmp_path,
    )
    worker = start_worker(settings)
    assert not (built / "tiny").exists()  # the real-profile path, no tiny fallback
    image = worker.handle(
        {
            "id": "rp-1",
            "input": {
                "id": "baked-sdxl",
                "type": "sdxl_image_fast",
                "prompt": "a red kite",
                "user_id": "builder",
                "config": {"width": 512, "height": 512, "num_inference_steps": 2, "seed": 3},
            },
        }
    )
    assert image["status"] == "completed", image
    video = worker.handle(
        {
            "id": "rp-2",
            "input": {
                "id": "baked-wan",
                "type": "video_fast",
                "prompt": "a paper boat",
                "user_id": "builder",
                "config": {"resolution": "256x256", "num_frames": 5, "num_inference_steps": 2, "seed": 3},
            },
        }
    )
    assert video["status"] == "completed", video
    turbo = worker.handle(
        {
            "id": "rp-3",
            "input": {
                "id": "baked-turbo",
                "type": "video_turbo",
                "prompt": "a paper boat",
                "user_id": "builder",
                "config": {"resolution": "256x256", "num_frames": 5, "seed": 3},
            },
        }
    )
    assert turbo["status"] == "completed", turbo
    assert turbo["assets"][0]["metadata"]["model"] == "fastwan-1.3b"
    assert (tmp_path / "builder" / "baked-sdxl" / "0.png").is_file()
    assert (tmp_path / "builder" / "baked-wan" / "0.mp4").is_file()


def test_second_run_skips_everything(
    built: Path, hub_cache: Path, tmp_path: Path, offline: None, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p: p.stat().st_mtime_ns for p in built.rglob("*") if p.is_file()}
    started = time.monotonic()
    assert run_builder(*cli(built, hub_cache, tmp_path)) == 0
    assert time.monotonic() - started < 5
    assert "sdxl skipped, wan-t2v skipped, wan-vace skipped, wan-turbo skipped" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in built.rglob("*") if p.is_file()}


def test_truncated_output_is_detected_and_rebuilt(
    built: Path, hub_cache: Path, tmp_path: Path, offline: None
) -> None:
    models = copy_models(built, tmp_path / "models")
    weights = models / "wan-t2v" / "transformer" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-10])
    options = BuildOptions(models, [CacheSource(hub_cache)])
    assert build(["sdxl", "wan"], options) == {
        "sdxl": "skipped",
        "wan-t2v": "built",
        "wan-vace": "skipped",
        "wan-turbo": "skipped",
    }
    assert weights.read_bytes() == good


def test_a_fastwan_repo_whose_shared_parts_differ_from_t2v_fails_the_build(
    hub_cache: Path, tmp_path: Path, offline: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """wan-turbo links to wan-t2v's VAE: a FastWan repo with another VAE must not be baked as if shared."""
    cache = tmp_path / "cache"
    shutil.copytree(hub_cache, cache, symlinks=True)
    snapshot = cache / repo_folder(FASTWAN_REPO) / "snapshots" / add_commit(FASTWAN_REPO)
    link = snapshot / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(link.resolve().read_bytes())
    data[-1] ^= 0xFF  # another VAE, consistently stored (its blob named by its own hash)
    blob = link.resolve().with_name(hashlib.sha256(data).hexdigest())
    blob.write_bytes(bytes(data))
    link.unlink()
    link.symlink_to(os.path.relpath(blob, link.parent))
    assert run_builder(*cli(tmp_path / "models", cache, tmp_path)) != 0
    assert "its vae/ is not Wan-AI/Wan2.1-T2V-1.3B-Diffusers's" in capsys.readouterr().err
    assert not (tmp_path / "models" / "wan-turbo").exists()


def test_same_size_corruption_is_found_by_verify(built: Path, hub_cache: Path, tmp_path: Path) -> None:
    models = copy_models(built, tmp_path / "models")
    weights = models / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-4] + bytes(b ^ 0xFF for b in good[-4:]))
    options = BuildOptions(models, [CacheSource(hub_cache)])
    assert build(["sdxl"], options) == {"sdxl": "skipped"}  # the quick check compares sizes only
    options.verify = True
    assert build(["sdxl"], options) == {"sdxl": "built"}
    assert weights.read_bytes() == good


def test_streaming_conversion_matches_torch(tmp_path: Path) -> None:
    """Chunked fp32 -> bf16 conversion equals torch's own cast; int tensors are kept."""
    tensors = {
        "big": torch.randn(3, CHUNK // 4 + 5),  # crosses a chunk boundary
        "ids": torch.arange(7, dtype=torch.int64),
        "empty": torch.zeros(0),
    }
    save_file(tensors, tmp_path / "src.safetensors", metadata={"format": "pt"})
    snap = Snapshot("r", "0" * 40, tmp_path, {}, CacheSource(tmp_path))
    step = Step("src.safetensors", "out.safetensors", "bfloat16", "weights")
    entry, verified = transfer(step, snap, tmp_path)
    out = load_file(tmp_path / "out.safetensors")
    assert torch.equal(out["big"], tensors["big"].to(torch.bfloat16))
    assert torch.equal(out["ids"], tensors["ids"]) and out["empty"].dtype == torch.bfloat16
    assert entry["size"] == (tmp_path / "out.safetensors").stat().st_size and not verified


def test_the_prompt_family_bakes_prompt_model_and_the_worker_loads_it(
    hub_cache: Path, tmp_path: Path, offline: None, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    args = ["--families", "prompt", "--models-dir", str(models), "--hub-cache", str(hub_cache)]
    assert run_builder(*args, "--download-cache", str(tmp_path / "dl")) == 0
    llm = models / "prompt"
    names = sorted(p.name for p in llm.iterdir() if not p.name.startswith("."))
    assert names == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]  # not the README
    assert dtypes(llm / "model.safetensors") == {"BF16"}
    manifest = json.loads((llm / MANIFEST).read_text())
    assert list(manifest["sources"]) == [PROMPT_REPO]
    for rel, info in manifest["files"].items():
        assert file_sha256(llm / rel) == info["sha256"]

    settings = Settings(
        models_dir=models,
        model_profile="full",
        worker_models=["wan", "prompt"],
        device="cpu",
        local_storage_dir=tmp_path,
    )
    family = PromptFamily.load(settings)
    assert family.model.dtype == torch.float32 and family.rewrite("Rewrite.", "a cat").tokens > 0

    # Another PROMPT_MODEL rebuilds prompt/ from that repo.
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("PROMPT_MODEL", fake_hub.SMALL_PROMPT_REPO)
    try:
        assert run_builder(*args, "--download-cache", str(tmp_path / "dl")) == 0
    finally:
        monkeypatch.undo()
    assert "prompt built" in capsys.readouterr().out.splitlines()[-1]
    assert list(json.loads((llm / MANIFEST).read_text())["sources"]) == [fake_hub.SMALL_PROMPT_REPO]


def test_a_worker_without_baked_prompt_weights_says_what_to_bake(tmp_path: Path) -> None:
    settings = Settings(
        models_dir=tmp_path,
        model_profile="full",
        worker_models=["wan", "prompt"],
        device="cpu",
        local_storage_dir=tmp_path,
    )
    with pytest.raises(StartupError) as refused:
        PromptFamily.load(settings)
    assert str(refused.value).startswith(f"model weights missing: {tmp_path / 'prompt'} has no config.json.")
    assert "baked into prompt/ by the builder (families prompt, PROMPT_MODEL)" in str(refused.value)
