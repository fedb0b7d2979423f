"""The runpod SDK, imported without the CPU probe it runs at import time.

When ``runpod.serverless.utils.rp_debugger`` is imported, it calls ``get_cpu_info()`` of
py-cpuinfo (a dependency of runpod), only for the processor's name in ``--rp_debugger`` output.
That call starts a second Python interpreter on every cold start (its cost: docs/PERFORMANCE.md).
While runpod is imported here, the name is read from /proc/cpuinfo instead; py-cpuinfo is
restored afterwards. The worker imports runpod only through this module.
"""

from __future__ import annotations

import platform

import cpuinfo


def _processor_name() -> dict[str, str]:
    """What rp_debugger reads of ``get_cpu_info()``: the processor's name (``brand_raw``)."""
    try:
        with open("/proc/cpuinfo") as lines:
            for line in lines:
                if line.startswith("model name"):
                    return {"brand_raw": line.split(":", 1)[1].strip()}
    except OSError:
        pass
    return {"brand_raw": platform.processor() or "unknown"}


_probe = cpuinfo.get_cpu_info
cpuinfo.get_cpu_info = _processor_name
try:
    import runpod
    from runpod.serverless.utils import rp_ssrf
finally:
    cpuinfo.get_cpu_info = _probe

__all__ = ["rp_ssrf", "runpod"]
