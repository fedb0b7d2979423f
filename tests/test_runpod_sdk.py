"""The runpod SDK as the worker imports it: without py-cpuinfo's probe process, the processor's
name still in its debugger's output."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

# A fresh interpreter: every process started while the worker's modules import is recorded.
IMPORT = """
import json, subprocess
import cpuinfo
started = []
popen_init = subprocess.Popen.__init__
def recording(self, args, *rest, **kwargs):
    started.append(" ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args))
    popen_init(self, args, *rest, **kwargs)
subprocess.Popen.__init__ = recording
probe = cpuinfo.get_cpu_info
import handler
from runpod.serverless.utils import rp_debugger
print(json.dumps({"started": started, "processor": rp_debugger.PROCESSOR,
                  "restored": cpuinfo.get_cpu_info is probe}))
"""


def test_the_handler_imports_runpod_without_the_cpu_probe() -> None:
    done = subprocess.run(
        [sys.executable, "-c", IMPORT], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert not [command for command in seen["started"] if "cpuinfo" in command]
    assert seen["restored"]  # py-cpuinfo itself is left as it was
    with open("/proc/cpuinfo") as lines:
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    assert seen["processor"] == model
