"""Bake the worker's weights into MODELS_DIR, in the diffusers layout the worker loads.

Run by the Dockerfile (``--families $WORKER_MODELS``), usable on a network volume too::

    python builder/download_models.py --families sdxl,wan --models-dir /models

What it writes (see src/models.py for what the worker reads):

- ``sdxl/``: ``stabilityai/stable-diffusion-xl-base-1.0`` (UNet and both CLIP encoders in fp16, taken
  from the repo's fp16 variant files when present), with ``madebyollin/sdxl-vae-fp16-fix`` as ``vae/``
  (``force_upcast: false``: the fixed VAE runs in fp16).
- ``wan-t2v/``: ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` complete; the UMT5 text encoder (published in fp32,
  22.7 GB) and the transformer stored in bf16, the VAE in fp32.
- ``wan-vace/``: ``Wan-AI/Wan2.1-VACE-1.3B-diffusers``: ``model_index.json``, ``scheduler/`` and the
  transformer (bf16). The worker shares T2V's text encoder, tokenizer and VAE, so ``text_encoder``,
  ``tokenizer`` and ``vae`` are relative symlinks to ``../wan-t2v/`` instead of an 11 GB copy.
- ``wan-turbo/``: ``FastVideo/FastWan2.1-T2V-1.3B-Diffusers``'s transformer (bf16) and scheduler, for
  ``video_turbo``; its text encoder, tokenizer and VAE must be T2V's files (checked), and are links.
- ``prompt/`` (family ``prompt``, not built by default): the LLM of prompt enhancement,
  ``--prompt-model`` (``$PROMPT_MODEL``, default ``Qwen/Qwen2.5-7B-Instruct``, Apache-2.0; any
  transformers causal LM with a chat template, e.g. ``Qwen/Qwen2.5-3B-Instruct`` for smaller GPUs):
  its config, generation config, tokenizer files and chat template, weights in bf16.

Sources, tried in order for every repo: hub caches given with ``--hub-cache`` (any directory laid out
as the Hugging Face hub cache: RunPod's cached models at ``/runpod-volume/huggingface-cache/hub``, used
by default when it exists, or a cache kept on a network volume), then the download cache
(``--download-cache``, default ``HF_HUB_CACHE``), then the hub itself (skipped with ``--offline`` or
``HF_HUB_OFFLINE=1``). Every file is checked while it is copied: against the hub's metadata (size,
LFS sha256 or git blob sha1) when online, against the name of its cache blob (blobs are named by
sha256 for LFS files, by git sha1 for the others) or the cache's tree listing otherwise. A corrupt
download is dropped and fetched again; a corrupt cache file makes the builder move on to the next
source, and to fail naming the file when none is left. Every hub request has a timeout (``--timeout``,
30 s); timeouts and other transient network errors are retried with exponential backoff, at most
``--retries`` (5) times, then the build fails naming the repository.

Each finished model directory holds ``.builder-manifest.json`` (sources, commits, every file's size
and sha256). A later run skips a model whose manifest matches the recipe and whose files have the
recorded sizes (``--verify`` also re-hashes them); anything else is rebuilt in a staging directory
and swapped in whole, so an interrupted run never leaves a half-written model behind.

The hub token comes from ``--token-file``, ``HF_TOKEN_FILE``, the BuildKit secret
``/run/secrets/hf_token`` or ``HF_TOKEN``, in that order; it is never written anywhere.

This module is the command line; the work is done by the modules beside it: ``layout`` (what goes
where), ``sources`` (caches and the hub), ``transfer``, ``hashed_io`` and ``dtype_conversion`` (one
file copied, checked and converted), ``manifest`` (the skip check) and ``build`` (retries, staging).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if not __package__:  # run as `python builder/download_models.py`: builder/ is sys.path[0]
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # import the package as builder.*

from builder.build import BuildOptions, build
from builder.errors import BuildError
from builder.layout import PROMPT_REPO
from builder.sources import CacheSource, HubSource, Source

log = logging.getLogger("download_models")

FAMILIES = ("sdxl", "wan", "prompt")
RUNPOD_CACHE = Path("/runpod-volume/huggingface-cache/hub")
SECRET_TOKEN_FILE = Path("/run/secrets/hf_token")


def read_token(token_file: str | None) -> str | None:
    """The hub token: --token-file, HF_TOKEN_FILE, the BuildKit secret, then HF_TOKEN."""
    for candidate in (token_file, os.environ.get("HF_TOKEN_FILE")):
        if candidate:
            return Path(candidate).read_text().strip() or None
    if SECRET_TOKEN_FILE.is_file():
        return SECRET_TOKEN_FILE.read_text().strip() or None
    return os.environ.get("HF_TOKEN") or None


def truthy(value: str | None) -> bool:
    """Whether an environment value means on (1, on, yes, true)."""
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline_from_env() -> bool:
    """HF_HUB_OFFLINE, as huggingface_hub reads it."""
    return truthy(os.environ.get("HF_HUB_OFFLINE"))


def default_download_cache() -> Path:
    """HF_HUB_CACHE, or huggingface_hub's default cache."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def parse_families(value: str) -> list[str]:
    """``--families``: a comma-separated subset of FAMILIES, or ``all``."""
    names = [part.strip().lower() for part in value.split(",") if part.strip()]
    if names == ["all"]:
        return list(FAMILIES)
    unknown = [name for name in names if name not in FAMILIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"families are a comma-separated subset of {', '.join(FAMILIES)}")
    return list(dict.fromkeys(names))


def parse_revision(value: str) -> tuple[str, str]:
    """``--revision REPO=REVISION``."""
    repo, sep, revision = value.partition("=")
    if not sep or not repo or not revision:
        raise argparse.ArgumentTypeError("use REPO=REVISION, e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers=<commit>")
    return repo, revision


def make_sources(
    hub_caches: list[Path], download_cache: Path, offline: bool, token: str | None, timeout_s: float = 30.0
) -> list[Source]:
    """Read-only hub caches first, then the download cache, then the hub (unless offline)."""
    caches = list(hub_caches) or ([RUNPOD_CACHE] if RUNPOD_CACHE.is_dir() else [])
    sources: list[Source] = [CacheSource(path) for path in caches]
    if all(path.resolve() != download_cache.resolve() for path in caches):
        sources.append(CacheSource(download_cache, f"download cache {download_cache}"))
    if not offline:
        sources.append(HubSource(download_cache, token, timeout_s=timeout_s))
    return sources


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with defaults from the environment."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--families",
        type=parse_families,
        default=parse_families(os.environ.get("WORKER_MODELS") or "sdxl,wan"),
        help="comma-separated: sdxl, wan, prompt or all (default: $WORKER_MODELS or sdxl,wan)",
    )
    parser.add_argument(
        "--prompt-model",
        default=os.environ.get("PROMPT_MODEL") or PROMPT_REPO,
        help=f"the prompt family's LLM, a hub repo (default: $PROMPT_MODEL or {PROMPT_REPO})",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=Path(os.environ.get("MODELS_DIR") or "/models"),
        help="where to write the model directories (default: $MODELS_DIR or /models)",
    )
    parser.add_argument(
        "--hub-cache",
        type=Path,
        action="append",
        default=[],
        help="a hub cache to read first (repeatable); default: RunPod's cached models "
        f"at {RUNPOD_CACHE} when present",
    )
    parser.add_argument(
        "--download-cache",
        type=Path,
        default=None,
        help="hub cache that downloads go to (default: $HF_HUB_CACHE)",
    )
    parser.add_argument(
        "--offline", action="store_true", help="never contact the hub (also HF_HUB_OFFLINE=1)"
    )
    parser.add_argument("--verify", action="store_true", help="re-hash finished models before skipping them")
    parser.add_argument("--force", action="store_true", help="rebuild even complete models")
    parser.add_argument(
        "--revision",
        type=parse_revision,
        action="append",
        default=[],
        metavar="REPO=REVISION",
        help="pin a repo to a branch, tag or commit (default: main)",
    )
    parser.add_argument("--retries", type=int, default=5, help="attempts per source on transient errors")
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to connect and to wait for data, per hub request (downloads: HF_HUB_DOWNLOAD_TIMEOUT)",
    )
    parser.add_argument("--token-file", default=None, help="file holding the hub token")
    parser.add_argument(
        "--delete-downloads",
        action="store_true",
        default=truthy(os.environ.get("DELETE_DOWNLOADS")),
        help="remove each repo from the download cache once its model is built, to save disk "
        "(default: $DELETE_DOWNLOADS)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the requested families; 0 on success, 1 when a model cannot be built."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    download_cache = args.download_cache or default_download_cache()
    offline = args.offline or offline_from_env()
    sources = make_sources(
        args.hub_cache,
        download_cache,
        offline,
        None if offline else read_token(args.token_file),
        args.timeout,
    )
    options = BuildOptions(
        models_dir=args.models_dir,
        sources=sources,
        revisions=dict(args.revision),
        verify=args.verify,
        force=args.force,
        retries=max(1, args.retries),
        delete_downloads=download_cache if args.delete_downloads else None,
        prompt_model=args.prompt_model,
    )
    log.info(
        "families %s into %s; sources: %s",
        ",".join(args.families),
        args.models_dir,
        ", ".join(source.label for source in sources),
    )
    try:
        results = build(args.families, options)
    except BuildError as err:
        print(f"download_models: error: {err}", file=sys.stderr)
        return 1
    print("download_models: " + ", ".join(f"{name} {state}" for name, state in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
