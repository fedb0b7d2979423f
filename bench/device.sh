#!/usr/bin/env bash
# The benchmark's one command on a GPU machine without network access:
#   bash bench/device.sh [bench.run arguments]
# Python there has torch and transformers; the other packages travel in .whl/ (see
# docs/PERFORMANCE.md): site312.tar.xz (diffusers, pydantic, runpod and its imports, ...) and
# the ffmpeg binary of imageio-ffmpeg, xz-compressed to fit the 64 MiB transfer limit.
set -euo pipefail
SITE=/tmp/site
FFMPEG=ffmpeg-linux-x86_64-v9.0.2
if [ -f .whl/site312.tar.xz ] && [ ! -x "$SITE/imageio_ffmpeg/binaries/$FFMPEG" ]; then
  mkdir -p "$SITE"
  tar -xJf .whl/site312.tar.xz -C "$SITE"
  xz -dc -T0 ".whl/$FFMPEG.xz" > "$SITE/imageio_ffmpeg/binaries/$FFMPEG"
  chmod +x "$SITE/imageio_ffmpeg/binaries/$FFMPEG"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Bytecode for every importable module, as pip writes it at install time and the worker's image
# ships it (Dockerfile). The machine's Python has none for torch and sympy and may not write any
# (PYTHONDONTWRITEBYTECODE), so every process would compile the sources it imports again (6.95 s
# in compile() of one import profile; docs/PERFORMANCE.md). Written under PYTHONPYCACHEPREFIX,
# leaving the machine's install untouched; once per machine (later calls add this checkout's).
export PYTHONPYCACHEPREFIX=/tmp/pycache
if [ ! -f "$PYTHONPYCACHEPREFIX/.complete" ]; then
  python3 -c 'import sys; print("\n".join(p for p in sys.path if p and not p.endswith(".zip")))' \
    | xargs python3 -m compileall -qq -j 0 > /dev/null || true
  touch "$PYTHONPYCACHEPREFIX/.complete"
fi
python3 -m compileall -qq -j 0 src bench handler.py > /dev/null || true
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader || true
exec python3 -m bench.run "$@"
