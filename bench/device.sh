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
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader || true
exec python3 -m bench.run "$@"
