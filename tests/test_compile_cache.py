"""Compiled packages across worker starts (CPU, tiny models, real AOTInductor): the first worker
compiles, checks and saves them; a second, with an empty inductor directory, loads every one (the
SDXL UNet and VAE decode, the three Wan block kinds), compiles nothing and checks nothing again."""

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
from src import aot_package
from src.settings import Settings
from src.wan import family as wan
from src.worker import start_worker
from torch._dynamo.utils import counters

aot_package.INDUCTOR_CONFIGS["aot_inductor.compile_wrapper_opt_level"] = "O0"  # a quicker C++ build
wan.TUNED_FOR = (64, 64, 9)  # a small size to check at: the same graphs, checked in milliseconds
settings = Settings(
    models_dir=Path(sys.argv[1]), model_profile="tiny", worker_models=["sdxl", "wan"], device="cpu",
    local_storage_dir=Path(sys.argv[2]) / "out", compile="on", compile_cache_dir=Path(sys.argv[2]) / "cache",
)
worker = start_worker(settings)
print(json.dumps({"startup": worker.startup, "inductor": dict(counters["inductor"])}))
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


def test_second_worker_loads_every_package_and_compiles_nothing(tmp_path: Path) -> None:
    first = _start(tmp_path, 1)
    for phase in ("sdxl_aot", "sdxl_vae_aot", "wan_blocks_aot"):
        assert f"warm_up_{phase}_compile_s" in first["startup"]
    assert first["inductor"]["extern_calls"] > 0  # inductor lowered the graphs
    packages = sorted(path.name for path in (tmp_path / "cache").glob("*.pt2"))
    assert [name.rsplit("-", 1)[0] for name in packages] == [
        "sdxl-unet",
        "sdxl-vae-decode",
        "wan-WanTransformerBlock",
        "wan-WanVACETransformerBlock",
        "wan-WanVACETransformerBlock",
    ]

    records = sorted(path.name for path in (tmp_path / "cache").glob("*.checked.json"))
    assert records == [name.replace(".pt2", ".checked.json") for name in packages]  # each one agreed

    second = _start(tmp_path, 2)
    for phase in ("sdxl_aot", "sdxl_vae_aot", "wan_blocks_aot"):
        assert f"warm_up_{phase}_compile_s" not in second["startup"]
        assert f"warm_up_{phase}_load_s" in second["startup"]
        assert f"warm_up_{phase}_check_s" not in second["startup"]  # checked once, by the first
    assert not second["inductor"]  # inductor lowered nothing
    assert set(second["startup"]["fast_paths"].values()) == {"serving"}
    assert len(second["startup"]["fast_paths"]) == 5
    assert sorted(path.name for path in (tmp_path / "cache").glob("*.pt2")) == packages
