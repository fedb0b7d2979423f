#!/usr/bin/env bash
# make image-test: build the real Dockerfile (no weights) and run the image as it ships.
#   1. a Docker daemon: the running one, else Debian's docker.io installed and started here
#      (--iptables=false --bridge=none), stopped at the end by its pid;
#   2. the base image python:3.11-slim-bookworm: present, else pulled, else (no registry) a TEST
#      STAND-IN of the same Debian release built with debootstrap and Debian's Python 3.11, tagged
#      with that name; it never ships;
#   3. docker build --network host --build-arg BAKE_MODELS=none (the Dockerfile unchanged);
#   4. the image as its own non-root user, --network none, MODEL_PROFILE=tiny, through its entry
#      point (handler.py --test_input): an SDXL job and a video_fast job store their files, a bad
#      payload fails with its error and stores nothing;
#   5. an unwritable MODELS_DIR stops the start with one line; an unwritable COMPILE_CACHE_DIR is
#      named in one warning and the job still completes.
# Fails, saying why, where Docker cannot run; never skips.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE_TEST_TAG:-runpod-worker:image-test}
BASE=python:3.11-slim-bookworm
WORK=$(mktemp -d /tmp/image-test.XXXXXX)
STARTED_PID=""
say() { echo "== image-test: $*" >&2; }
fail() { echo "image-test: FAILED: $*" >&2; exit 1; }
cleanup() {
  if [ -n "$STARTED_PID" ]; then
    say "stopping the Docker daemon it started (pid $STARTED_PID)"
    kill "$STARTED_PID" 2>/dev/null && wait "$STARTED_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# The client: one with BuildKit (docker.io's 20.10 has it built in; newer clients need buildx).
client() {
  if command -v docker >/dev/null && docker buildx version >/dev/null 2>&1; then echo docker
  elif [ -x /usr/bin/docker ]; then echo /usr/bin/docker
  else echo docker; fi
}

# 1. The daemon.
DOCKER=$(client)
if ! "$DOCKER" info >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || fail "no Docker daemon answers, and starting one needs root (uid $(id -u))"
  if ! command -v dockerd >/dev/null; then
    say "installing Debian's docker.io"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q docker.io >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q docker.io >/dev/null; } \
      || fail "could not install docker.io with apt-get"
  fi
  DOCKER=$(client)
  say "starting dockerd --iptables=false --bridge=none"
  dockerd --iptables=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
  STARTED_PID=$!
  for _ in $(seq 60); do
    "$DOCKER" info >/dev/null 2>&1 && break
    kill -0 "$STARTED_PID" 2>/dev/null || fail "dockerd exited (no kernel support?): $(tail -3 "$WORK/dockerd.log")"
    sleep 1
  done
  "$DOCKER" info >/dev/null 2>&1 || fail "dockerd did not answer within 60 s: $(tail -3 "$WORK/dockerd.log")"
fi

# 2. The base image.
if ! "$DOCKER" image inspect "$BASE" >/dev/null 2>&1 && ! timeout 300 "$DOCKER" pull -q "$BASE" >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || fail "$BASE cannot be pulled, and building a stand-in needs root"
  say "no registry: building a TEST STAND-IN for $BASE with debootstrap (Debian bookworm, Python 3.11)"
  command -v debootstrap >/dev/null || apt-get install -y -q debootstrap >/dev/null || fail "could not install debootstrap"
  # The machine's own Debian mirror (a deb or URIs: line; comments and disabled files left out).
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -E '^(URIs:|deb) ' | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -1 | tr -d ' ' || true)
  root="$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates bookworm "$root" \
    "${mirror:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log" 2>&1 || fail "debootstrap: $(tail -3 "$WORK/debootstrap.log")"
  ln -sf python3 "$root/usr/bin/python" && ln -sf pip3 "$root/usr/bin/pip"
  rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED  # pip installs system-wide, as in the official image
  # This machine's extra certificate authorities (an egress proxy's), so pip in the build reaches PyPI.
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$root" update-ca-certificates >/dev/null
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | "$DOCKER" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$BASE" >/dev/null
fi

# 3. The image, without weights.
say "docker build --network host --build-arg BAKE_MODELS=none -t $IMAGE ."
DOCKER_BUILDKIT=1 "$DOCKER" build --network host --build-arg BAKE_MODELS=none -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
  || fail "docker build: $(tail -20 "$WORK/build.log")"

# 4-5. Jobs through the image's entry point, as its own user, without network.
mkdir -p "$WORK/out" "$WORK/models"
chmod 777 "$WORK/out" "$WORK/models"
run() {  # run NAME WORKER_MODELS PAYLOAD [docker run options]: stdout, stderr and rc in $WORK/NAME.*
  local name=$1 families=$2 payload=$3
  shift 3
  set +e
  "$DOCKER" run --rm --network none -e MODEL_PROFILE=tiny -e WORKER_MODELS="$families" \
    -e LOCAL_STORAGE_DIR=/out -v "$WORK/out:/out" "$@" "$IMAGE" \
    python -u handler.py --test_input "$payload" >"$WORK/$name.out" 2>"$WORK/$name.err"
  echo $? >"$WORK/$name.rc"
  set -e
}
models=(-e MODELS_DIR=/models-rw -v "$WORK/models:/models-rw")
job() {  # job ID TYPE CONFIG
  echo "{\"input\": {\"id\": \"$1\", \"type\": \"$2\", \"prompt\": \"a paper boat\", \"user_id\": \"image-test\", \"config\": $3}}"
}
say "an SDXL job"
run sdxl sdxl "$(job sdxl-1 sdxl_image_fast '{"width": 512, "height": 512, "num_inference_steps": 2, "seed": 1}')" "${models[@]}"
say "a video_fast job"
run video wan "$(job video-1 video_fast '{"width": 256, "height": 256, "num_frames": 5, "num_inference_steps": 2, "seed": 1}')" "${models[@]}"
say "a bad payload"
run bad sdxl "$(job bad-1 sdxl_image_fast '{"width": 100, "height": 512}')" "${models[@]}"
say "MODEL_PROFILE=tiny with the image's own, unwritable MODELS_DIR"
run models_ro sdxl "$(job ro-1 sdxl_image_fast '{"width": 512, "height": 512, "num_inference_steps": 1}')"
say "an unwritable COMPILE_CACHE_DIR"
run cache_ro sdxl "$(job cache-1 sdxl_image_fast '{"width": 512, "height": 512, "num_inference_steps": 1}')" \
  "${models[@]}" -e COMPILE_CACHE_DIR=/usr/share/compile-cache

say "checking"
python3 tests/image_check.py "$WORK" || fail "see above; logs were in $WORK"
say "passed"
