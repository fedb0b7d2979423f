"""The compile cache across worker starts (CPU, tiny models, real inductor): a second worker
with an empty inductor directory takes every Wan graph from the saved cache and loads the SDXL
UNet and VAE packages instead of compiling them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, TEST_MODELS_DIR

# One worker start in a fresh process; prints its start-up phases and inductor's cache counters.
START = """
import json, sys
from pathlib import Path
from src import families
from src.sdxl import aot_package
from src.settings import Settings
from src.wan import family as wan
from src.worker import start_worker
from torch._dynamo.utils import counters

aot_package.INDUCTOR_CONFIGS["aot_inductor.compile_wrapper_opt_level"] = "O0"  # a quicker C++ build
wan.COMPILED_SHAPES = ((64, 64, 9),)  # small shapes: the same graphs' structure, compiled in seconds
settings = Settings(
    models_dir=Path(sys.argv[1]), model_profile="tiny", worker_models=["sdxl", "wan"], device="cpu",
    local_storage_dir=Path(sys.argv[2]) / "out", compile="on", compile_cache_dir=Path(sys.argv[2]) / "cache",
)
start_worker(settings)
print(json.dumps({"startup": families.STARTUP, "inductor": dict(counters["inductor"])}))
"""


def _start(tmp_path: Path, run: int) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{run}")}
    done = subprocess.run(
        [sys.executable, "-c", START, str(TEST_MODELS_DIR), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_worker_reuses_every_compiled_graph(tmp_path: Path) -> None:
    first = _start(tmp_path, 1)
    assert first["startup"]["compile_cache"] == "saved"
    assert "warm_up_sdxl_aot_compile_s" in first["startup"]
    assert "warm_up_sdxl_vae_aot_compile_s" in first["startup"]
    compiled = first["inductor"]["fxgraph_cache_miss"]
    assert compiled >= 3  # T2V blocks, VACE blocks, the VACE control blocks

    second = _start(tmp_path, 2)
    assert second["startup"]["compile_cache"] == "loaded"
    assert "warm_up_sdxl_aot_compile_s" not in second["startup"]  # the packages load
    assert "warm_up_sdxl_vae_aot_compile_s" not in second["startup"]
    assert "warm_up_sdxl_vae_aot_load_s" in second["startup"]
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert second["inductor"]["fxgraph_cache_hit"] == compiled
