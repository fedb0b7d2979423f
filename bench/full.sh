#!/usr/bin/env bash
# The whole benchmark in one go, for a GPU machine whose commands are cut at 10 minutes: run it
# in a new session so that it outlives the call that started it, and wait for it in later calls:
#   setsid nohup bash bench/full.sh /tmp/bench-out > /tmp/bench-full.log 2>&1 < /dev/null &
#   until [ -f /tmp/bench-out/done ]; do sleep 5; done   # in each later call, for up to 9 minutes
# Stages, each a bench/device.sh run whose results land in its own folder under the first argument:
#   first:  the true-size models built, then a worker with an empty compile cache (it compiles
#           and checks every package), one job;
#   cached: a fresh worker with every package present (cold start), then every job, the LoRA
#           and turbo jobs included;
#   plain:  plain diffusers on the same models, the SDXL jobs (PLAIN_JOBS to change);
#   start1..2: two more cold starts with every package present.
set -euo pipefail
out=${1:-/tmp/bench-out}
models=/tmp/bm
sdxl=sdxl_high_1,sdxl_high_1_lora,sdxl_high_3,sdxl_fast_1
wan=video_turbo,video_fast,video_fast_lora,video_high,video_fast_ref
mkdir -p "$out"
rm -f "$out/done"
stage() { echo "== $(date +%T) $1"; }
stage first
bash bench/device.sh --models $models --out "$out/first" --phases build,worker --jobs sdxl_fast_1 --repeats 1
stage cached
bash bench/device.sh --models $models --out "$out/cached" --phases cached --cached-jobs $sdxl,$wan --repeats 5
stage plain
bash bench/device.sh --models $models --out "$out/plain" --phases plain --jobs "${PLAIN_JOBS:-sdxl_high_1,sdxl_high_3,sdxl_fast_1}"
for i in 1 2; do
  stage "start$i"
  bash bench/device.sh --models $models --out "$out/start$i" --phases cached --cached-jobs sdxl_fast_1 --repeats 1
done
stage done
touch "$out/done"
