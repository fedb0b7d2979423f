#!/usr/bin/env bash
# Builds .whl/ (ignored, carried by the device tool) for bench/device.sh: the worker's packages
# that the GPU machine's Python 3.12 lacks (it has torch, transformers, accelerate, numpy, ...),
# at the versions this checkout's .venv pins, unpacked into one tree: .whl/site312.tar.xz; and
# imageio-ffmpeg's ffmpeg binary, xz-compressed apart (the wheel alone is over the 64 MiB limit).
#   make install && bash bench/wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# boto3 and botocore stay behind (13 MB compressed): the benchmark stores assets on local disk.
LACKING="aiohttp-retry annotated-types backoff bcrypt cffi compel cryptography diffusers fastapi ftfy
imageio-ffmpeg importlib-metadata inquirerpy invoke lazy-importer opentelemetry-api paramiko pfzy
prettytable prompt-toolkit pycparser pydantic pydantic-core pydantic-settings pynacl python-dotenv
runpod starlette tomli tomlkit tqdm-loggable typing-inspection watchdog wcwidth"
PLATFORMS=""
for n in 17 24 27 28 31 34 35; do PLATFORMS+=" --platform manylinux_2_${n}_x86_64"; done
PLATFORMS+=" --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pins=$(for name in $LACKING; do .venv/bin/pip show "$name" 2>/dev/null | awk -v n="$name" '/^Version:/ {print n "==" $2}'; done)
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $PLATFORMS --platform any -d "$work/wheels" $pins
mkdir -p "$work/site" .whl
for wheel in "$work"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$work/site"; done
ffmpeg=$(find "$work/site/imageio_ffmpeg/binaries" -name 'ffmpeg-*' -type f)
xz -T0 -9 -c "$ffmpeg" > ".whl/$(basename "$ffmpeg").xz"
rm "$ffmpeg"
XZ_OPT="-9 -T0" tar -C "$work/site" -cJf .whl/site312.tar.xz .
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
ls -l .whl
