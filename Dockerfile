# RunPod Serverless worker (SDXL, Wan 2.1, optionally the prompt LLM), weights baked in. Build with BuildKit:
#
#   docker build --platform linux/amd64 --secret id=hf_token,env=HF_TOKEN \
#     --build-arg WORKER_MODELS=sdxl,wan -t <registry>/<image>:<tag> .
#
# Layers go from the least to the most often changed: dependencies, then the weights (one layer
# per family), then the worker's code, so a code change rebuilds and pushes only a few kB.
# README.md, "Deploy on RunPod", has the whole procedure.

# Python 3.11, as the worker is developed and tested on. No CUDA base image is needed: the torch
# wheel from PyPI is the CUDA build and brings the CUDA runtime, cuDNN and NCCL as pip wheels; the
# host supplies only the NVIDIA driver (RunPod's container runtime mounts it).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HF_HUB_DISABLE_TELEMETRY=1

# The user the worker runs as (see USER below).
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin worker

WORKDIR /app

# 1. Dependencies, pinned in builder/requirements.txt (the file `make` installs too).
#    TORCH_INDEX_URL picks another CUDA build of the same torch version, e.g.
#    https://download.pytorch.org/whl/cu128 for hosts whose driver predates CUDA 13.
ARG TORCH_INDEX_URL=
COPY builder/requirements.txt builder/requirements.txt
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        -r builder/requirements.txt \
    && python -c "import sys, torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda); sys.exit(torch.version.cuda is None)"

# 2. Weights, written by the builder into MODELS_DIR (see builder/download_models.py), one layer per
#    family so that both are pushed and pulled in parallel. WORKER_MODELS chooses the families baked
#    and is also the worker's default at run time; BAKE_MODELS=none builds a slim image for weights
#    kept on a network volume (README, "Network volume").
#    The Hugging Face token is a BuildKit secret mounted at /run/secrets/hf_token for the RUNs that
#    download: never an ARG or ENV, so it is in no layer and not in the image history. The models
#    are public; the token only avoids anonymous rate limits.
#    Downloads go to a BuildKit cache mount, kept between builds and never part of the image; only
#    the converted weights (fp16 SDXL, bf16 Wan encoders) land in /models. DELETE_DOWNLOADS=1 empties
#    that cache after each model instead (less disk on CI runners, a full download every build).
ARG WORKER_MODELS=sdxl,wan
ARG BAKE_MODELS=${WORKER_MODELS}
ARG DELETE_DOWNLOADS=
ENV MODELS_DIR=/models \
    WORKER_MODELS=${WORKER_MODELS}
COPY builder/*.py builder/
RUN --mount=type=secret,id=hf_token,required=false \
    --mount=type=cache,target=/var/cache/hf-downloads,sharing=locked \
    case ",${BAKE_MODELS}," in \
      *,sdxl,*) python builder/download_models.py --families sdxl --download-cache /var/cache/hf-downloads ;; \
      *) echo "sdxl not in BAKE_MODELS=${BAKE_MODELS}: not baked" ;; \
    esac
RUN --mount=type=secret,id=hf_token,required=false \
    --mount=type=cache,target=/var/cache/hf-downloads,sharing=locked \
    case ",${BAKE_MODELS}," in \
      *,wan,*) python builder/download_models.py --families wan --download-cache /var/cache/hf-downloads ;; \
      *) echo "wan not in BAKE_MODELS=${BAKE_MODELS}: not baked" ;; \
    esac
# Prompt enhancement's LLM (WORKER_MODELS=sdxl,wan,prompt): PROMPT_MODEL, any transformers causal LM
# with a chat template (Qwen/Qwen2.5-3B-Instruct for smaller GPUs).
ARG PROMPT_MODEL=Qwen/Qwen2.5-7B-Instruct
RUN --mount=type=secret,id=hf_token,required=false \
    --mount=type=cache,target=/var/cache/hf-downloads,sharing=locked \
    case ",${BAKE_MODELS}," in \
      *,prompt,*) python builder/download_models.py --families prompt --prompt-model "${PROMPT_MODEL}" \
                    --download-cache /var/cache/hf-downloads ;; \
      *) echo "prompt not in BAKE_MODELS=${BAKE_MODELS}: not baked" ;; \
    esac

# 3. The worker's code, last: it changes most often.
COPY handler.py ./
COPY src/ src/
# Bytecode in the image, like pip's for site-packages: PYTHONDONTWRITEBYTECODE stops the worker
# writing it at run time, and compiling every module at each start costs seconds.
RUN python -m compileall -q handler.py src

# At run time nothing is downloaded: the worker loads MODELS_DIR only.
ENV HF_HUB_OFFLINE=1

# Non-root by default. The worker reads /app and /models (root-owned, world-readable) and writes
# only to /tmp (video encoding) and to the bucket, so it needs no write access to the image.
# RunPod runs USER as given. A network volume at /runpod-volume is usually root-owned: if you run
# the builder inside the container to fill a volume (README, "Network volume"), build with
# --build-arg RUN_AS=root.
ARG RUN_AS=worker
# The compile cache (COMPILE_CACHE_DIR, default MODELS_DIR/compile-cache) is written by the first
# worker that compiles; point COMPILE_CACHE_DIR at a network volume to share it across workers.
RUN mkdir -p "${MODELS_DIR}/compile-cache" && chown "${RUN_AS}" "${MODELS_DIR}/compile-cache"
USER ${RUN_AS}

CMD ["python", "-u", "handler.py"]
