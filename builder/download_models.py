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

Sources, tried in order for every repo: hub caches given with ``--hub-cache`` (any directory laid out
as the Hugging Face hub cache: RunPod's cached models at ``/runpod-volume/huggingface-cache/hub``, used
by default when it exists, or a cache kept on a network volume), then the download cache
(``--download-cache``, default ``HF_HUB_CACHE``), then the hub itself (skipped with ``--offline`` or
``HF_HUB_OFFLINE=1``). Every file is checked while it is copied: against the hub's metadata (size,
LFS sha256 or git blob sha1) when online, against the name of its cache blob (blobs are named by
sha256 for LFS files, by git sha1 for the others) or the cache's tree listing otherwise. A corrupt
download is dropped and fetched again; a corrupt cache file makes the builder move on to the next
source, and to fail naming the file when none is left. Transient network errors are retried with
exponential backoff.

Each finished model directory holds ``.builder-manifest.json`` (sources, commits, every file's size
and sha256). A later run skips a model whose manifest matches the recipe and whose files have the
recorded sizes (``--verify`` also re-hashes them); anything else is rebuilt in a staging directory
and swapped in whole, so an interrupted run never leaves a half-written model behind.

The hub token comes from ``--token-file``, ``HF_TOKEN_FILE``, the BuildKit secret
``/run/secrets/hf_token`` or ``HF_TOKEN``, in that order; it is never written anywhere.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("download_models")

BUILDER_VERSION = 1
MANIFEST = ".builder-manifest.json"
FAMILIES = ("sdxl", "wan")
RUNPOD_CACHE = Path("/runpod-volume/huggingface-cache/hub")
SECRET_TOKEN_FILE = Path("/run/secrets/hf_token")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
CHUNK = 16 * 1024 * 1024

SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_VAE_REPO = "madebyollin/sdxl-vae-fp16-fix"
WAN_T2V_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
WAN_VACE_REPO = "Wan-AI/Wan2.1-VACE-1.3B-diffusers"


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Files:
    """Plain files copied as they are: every repo file matching ``patterns``; ``required`` must exist."""

    patterns: tuple[str, ...]
    required: tuple[str, ...] = ()


@dataclass(frozen=True)
class Weights:
    """One component's safetensors weights (single file or index + shards) and its ``config.json``.

    ``dtype``: floating tensors are stored in this dtype (converted tensor by tensor when needed).
    ``variant``: a single file ``<stem>.<variant>.safetensors`` preferred to the plain one (e.g. SDXL's
    fp16 files); it is stored under the plain name, which is what ``from_pretrained`` loads.
    """

    folder: str
    stem: str
    dtype: str
    variant: str | None = None


@dataclass(frozen=True)
class Part:
    """What one hub repo contributes to a model directory (under ``dest``)."""

    repo: str
    items: tuple[Files | Weights, ...]
    dest: str = ""
    config_updates: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """One directory under MODELS_DIR."""

    name: str
    family: str
    parts: tuple[Part, ...]
    links: tuple[tuple[str, str], ...] = ()  # (path in this dir, relative symlink target)


SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="sdxl",
        family="sdxl",
        parts=(
            Part(
                SDXL_REPO,
                (
                    Files(
                        ("model_index.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*"),
                        required=(
                            "model_index.json",
                            "scheduler/scheduler_config.json",
                            "tokenizer/tokenizer_config.json",
                            "tokenizer_2/tokenizer_config.json",
                        ),
                    ),
                    Weights("unet", "diffusion_pytorch_model", "float16", variant="fp16"),
                    Weights("text_encoder", "model", "float16", variant="fp16"),
                    Weights("text_encoder_2", "model", "float16", variant="fp16"),
                ),
            ),
            Part(
                SDXL_VAE_REPO,
                (Weights("", "diffusion_pytorch_model", "float16"),),
                dest="vae",
                config_updates=(("config.json", (("force_upcast", False),)),),
            ),
        ),
    ),
    ModelSpec(
        name="wan-t2v",
        family="wan",
        parts=(
            Part(
                WAN_T2V_REPO,
                (
                    Files(
                        ("model_index.json", "scheduler/*", "tokenizer/*"),
                        required=(
                            "model_index.json",
                            "scheduler/scheduler_config.json",
                            "tokenizer/tokenizer_config.json",
                        ),
                    ),
                    Weights("text_encoder", "model", "bfloat16"),
                    Weights("transformer", "diffusion_pytorch_model", "bfloat16"),
                    Weights("vae", "diffusion_pytorch_model", "float32"),
                ),
            ),
        ),
    ),
    ModelSpec(
        name="wan-vace",
        family="wan",
        parts=(
            Part(
                WAN_VACE_REPO,
                (
                    Files(
                        ("model_index.json", "scheduler/*"),
                        required=("model_index.json", "scheduler/scheduler_config.json"),
                    ),
                    Weights("transformer", "diffusion_pytorch_model", "bfloat16"),
                ),
            ),
        ),
        links=(
            ("text_encoder", "../wan-t2v/text_encoder"),
            ("tokenizer", "../wan-t2v/tokenizer"),
            ("vae", "../wan-t2v/vae"),
        ),
    ),
)


def specs_for(families: Iterable[str]) -> list[ModelSpec]:
    """The model directories the given families need, in build order."""
    wanted = set(families)
    return [spec for spec in SPECS if spec.family in wanted]


def recipe_id(spec: ModelSpec, revisions: dict[str, str]) -> str:
    """Identifies what a model directory is built from: a change means a rebuild."""
    data = {
        "builder": BUILDER_VERSION,
        "spec": asdict(spec),
        "revisions": {part.repo: revisions.get(part.repo, "main") for part in spec.parts},
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- errors


class BuildError(RuntimeError):
    """The build cannot finish; the message says what is missing or broken."""


class UnavailableError(Exception):
    """A source does not have (all of) a repo's files."""


class CorruptFileError(Exception):
    """A source file does not match its expected size or hash."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


def is_transient(err: BaseException) -> bool:
    """Network trouble worth retrying: connection errors, timeouts, 408/429/5xx answers."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OfflineModeIsEnabled):
            return False
        if isinstance(current, HfHubHTTPError):
            status = getattr(current.response, "status_code", None)
            return status in (408, 429) or (status is not None and status >= 500)
        if isinstance(current, httpx.TransportError | ConnectionError | TimeoutError):
            return True
        current = current.__cause__ or current.__context__
    return False


# --------------------------------------------------------------------------- sources


@dataclass
class FileMeta:
    """What a file should be, as far as the source knows."""

    size: int | None = None
    sha256: str | None = None
    git_sha1: str | None = None


@dataclass
class Snapshot:
    """A repo at one commit, in some source: its file listing and where the files are."""

    repo: str
    commit: str
    root: Path
    files: dict[str, FileMeta]
    source: Source


class Source(Protocol):
    """Where repo files come from."""

    label: str
    refetchable: bool

    def snapshot(self, repo: str, revision: str) -> Snapshot:
        """The repo's listing at ``revision``; raise UnavailableError if this source lacks it."""

    def fetch(self, snap: Snapshot, paths: list[str]) -> None:
        """Make ``paths`` readable under ``snap.root``; raise UnavailableError if they cannot be."""

    def discard(self, snap: Snapshot, path: str) -> None:
        """Drop a corrupt file so the next ``fetch`` gets it anew (when ``refetchable``)."""


def repo_folder(repo: str) -> str:
    """The hub cache's folder name for a model repo."""
    return "models--" + repo.replace("/", "--")


class CacheSource:
    """A directory laid out as the Hugging Face hub cache (read only).

    ``models--org--name/refs/<revision>`` holds the commit, ``snapshots/<commit>/<path>`` the files
    (symlinks to ``blobs/<etag>``: sha256 for LFS files, git sha1 for the others), and
    ``trees/<commit>.json``, when present, the hub's listing with sizes and hashes.
    """

    refetchable = False

    def __init__(self, cache_dir: Path, label: str | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.label = label or f"hub cache {cache_dir}"

    def snapshot(self, repo: str, revision: str) -> Snapshot:
        storage = self.cache_dir / repo_folder(repo)
        if not storage.is_dir():
            raise UnavailableError("not cached")
        commit = self._commit(storage, revision)
        root = storage / "snapshots" / commit
        if not root.is_dir():
            raise UnavailableError(f"no snapshot for commit {commit}")
        tree = self._tree(storage, commit)
        files: dict[str, FileMeta] = {}
        for path in sorted(root.rglob("*")):
            if not path.is_file():  # directories, and symlinks whose blob is missing
                continue
            rel = path.relative_to(root).as_posix()
            files[rel] = tree.get(rel) or self._meta_from_blob(path)
        return Snapshot(repo, commit, root, files, self)

    def fetch(self, snap: Snapshot, paths: list[str]) -> None:
        missing = [path for path in paths if not (snap.root / path).is_file()]
        if missing:
            raise UnavailableError(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))

    def discard(self, snap: Snapshot, path: str) -> None:
        """Never deletes from a cache it does not own."""

    @staticmethod
    def _commit(storage: Path, revision: str) -> str:
        if COMMIT_RE.fullmatch(revision):
            return revision
        ref = storage / "refs" / revision
        if ref.is_file():
            return ref.read_text().strip()
        snapshots = sorted(p.name for p in (storage / "snapshots").glob("*") if p.is_dir())
        if revision == "main" and len(snapshots) == 1:
            return snapshots[0]  # a cache copied without refs/: its only snapshot
        raise UnavailableError(f"no ref {revision!r}")

    @staticmethod
    def _tree(storage: Path, commit: str) -> dict[str, FileMeta]:
        """The hub listing huggingface_hub caches under ``trees/<commit>.json`` (if any)."""
        try:
            data = json.loads((storage / "trees" / f"{commit}.json").read_text())
            return {
                path: FileMeta(
                    size=info.get("size"),
                    sha256=info.get("lfs_sha256"),
                    git_sha1=None if info.get("lfs_sha256") else info.get("blob_id"),
                )
                for path, info in data["files"].items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    @staticmethod
    def _meta_from_blob(path: Path) -> FileMeta:
        if not path.is_symlink():
            return FileMeta()
        etag = Path(os.readlink(path)).name
        if SHA256_RE.fullmatch(etag):
            return FileMeta(sha256=etag)
        if COMMIT_RE.fullmatch(etag):
            return FileMeta(git_sha1=etag)
        return FileMeta()


class HubSource:
    """The Hugging Face hub: listing with file metadata, then ``snapshot_download`` into a cache."""

    refetchable = True
    label = "huggingface.co"

    def __init__(self, cache_dir: Path, token: str | None, api: Any = None) -> None:
        from huggingface_hub import HfApi

        self.cache_dir = Path(cache_dir)
        self.token = token
        self.api = api or HfApi(token=token)

    def snapshot(self, repo: str, revision: str) -> Snapshot:
        info = self.api.model_info(repo, revision=revision, files_metadata=True, token=self.token)
        files: dict[str, FileMeta] = {}
        for sibling in info.siblings or []:
            lfs = sibling.lfs
            files[sibling.rfilename] = FileMeta(
                size=sibling.size,
                sha256=lfs["sha256"] if lfs else None,
                git_sha1=None if lfs else sibling.blob_id,
            )
        root = self.cache_dir / repo_folder(repo) / "snapshots" / info.sha
        return Snapshot(repo, info.sha, root, files, self)

    def fetch(self, snap: Snapshot, paths: list[str]) -> None:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            snap.repo,
            revision=snap.commit,
            allow_patterns=[glob_escape(path) for path in paths],
            cache_dir=self.cache_dir,
            token=self.token,
        )
        snap.root = Path(folder)

    def discard(self, snap: Snapshot, path: str) -> None:
        target = snap.root / path
        blob = target.resolve()
        for doomed in (target, blob):
            doomed.unlink(missing_ok=True)


def glob_escape(path: str) -> str:
    """``path`` as an fnmatch pattern that matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", path)


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Step:
    """One output file: copied (or converted) from ``src`` in the snapshot to ``out`` in the model dir."""

    src: str
    out: str
    dtype: str | None = None  # safetensors: store floating tensors in this dtype
    role: str = "file"  # file | weights | index
    updates: tuple[tuple[str, Any], ...] = ()  # JSON keys to set


def plan_part(part: Part, files: dict[str, FileMeta]) -> list[Step]:
    """The steps that build ``part`` from a repo listing; raise UnavailableError if files are missing."""
    steps: list[Step] = []
    updates = dict(part.config_updates)
    dest = f"{part.dest}/" if part.dest else ""
    for item in part.items:
        if isinstance(item, Files):
            missing = [path for path in item.required if path not in files]
            if missing:
                raise UnavailableError(f"missing {', '.join(missing)}")
            chosen = [p for p in files if any(fnmatch.fnmatchcase(p, pat) for pat in item.patterns)]
            steps += [Step(p, dest + p, updates=updates.get(p, ())) for p in sorted(chosen)]
        else:
            steps += _plan_weights(item, files, dest, updates)
    return steps


def _plan_weights(item: Weights, files: dict[str, FileMeta], dest: str, updates: dict) -> list[Step]:
    base = f"{item.folder}/" if item.folder else ""
    config = f"{base}config.json"
    if config not in files:
        raise UnavailableError(f"missing {config}")
    steps = [Step(config, dest + config, updates=updates.get(config, ()))]
    single = f"{base}{item.stem}.safetensors"
    if item.variant and f"{base}{item.stem}.{item.variant}.safetensors" in files:
        src = f"{base}{item.stem}.{item.variant}.safetensors"
        return [*steps, Step(src, dest + single, item.dtype, "weights")]
    if single in files:
        return [*steps, Step(single, dest + single, item.dtype, "weights")]
    index = f"{single}.index.json"
    shard = re.compile(re.escape(f"{base}{item.stem}") + r"-\d+-of-\d+\.safetensors")
    shards = sorted(p for p in files if shard.fullmatch(p))
    if index in files and shards:
        steps += [Step(p, dest + p, item.dtype, "weights") for p in shards]
        return [*steps, Step(index, dest + index, item.dtype, "index")]
    raise UnavailableError(f"no safetensors weights in {item.folder or 'the repo root'}/")


# --------------------------------------------------------------------------- file transfer

ST_FLOATS = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
ST_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


class _Verifier:
    """Hashes a source file as it is read and checks it against its FileMeta at the end."""

    def __init__(self, rel: str, path: Path, meta: FileMeta) -> None:
        self.rel, self.meta = rel, meta
        self.size = path.stat().st_size
        if meta.size is not None and meta.size != self.size:
            raise CorruptFileError(rel, f"size {self.size} bytes, expected {meta.size}")
        self.sha256 = hashlib.sha256() if meta.sha256 else None
        self.sha1 = None
        if meta.git_sha1:
            self.sha1 = hashlib.sha1(usedforsecurity=False)
            self.sha1.update(f"blob {self.size}\0".encode())

    def update(self, data: bytes | memoryview) -> None:
        if self.sha256:
            self.sha256.update(data)
        if self.sha1:
            self.sha1.update(data)

    def check(self) -> bool:
        """Raise CorruptFileError on a mismatch; False when nothing could be verified."""
        if self.sha256 and (got := self.sha256.hexdigest()) != self.meta.sha256:
            raise CorruptFileError(self.rel, f"sha256 {got}, expected {self.meta.sha256}")
        if self.sha1 and (got := self.sha1.hexdigest()) != self.meta.git_sha1:
            raise CorruptFileError(self.rel, f"git sha1 {got}, expected {self.meta.git_sha1}")
        return bool(self.sha256 or self.sha1 or self.meta.size is not None)


class _Writer:
    """Writes an output file through a temporary name, hashing what is written."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.tmp = path.with_name(f".{path.name}.part")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish/abort
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self.sha256.update(data)
        self.size += len(data)

    def finish(self) -> dict[str, Any]:
        self.file.close()
        os.chmod(self.tmp, 0o644)
        self.tmp.replace(self.path)
        return {"size": self.size, "sha256": self.sha256.hexdigest()}

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _read_header(f: Any, verifier: _Verifier, rel: str) -> dict[str, Any]:
    raw = f.read(8)
    if len(raw) < 8:
        raise CorruptFileError(rel, "not a safetensors file (too short)")
    length = int.from_bytes(raw, "little")
    if length > 100 * 1024 * 1024 or 8 + length > verifier.size:
        raise CorruptFileError(rel, "not a safetensors file (bad header length)")
    header_bytes = f.read(length)
    verifier.update(raw)
    verifier.update(header_bytes)
    try:
        return json.loads(header_bytes)
    except ValueError:
        raise CorruptFileError(rel, "not a safetensors file (bad header)") from None


def transfer(step: Step, snap: Snapshot, out_root: Path) -> tuple[dict[str, Any], bool]:
    """Copy, convert or patch one file; return its manifest entry and whether the source was verified."""
    src = snap.root / step.src
    meta = snap.files.get(step.src, FileMeta())
    verifier = _Verifier(step.src, src, meta)
    writer = _Writer(out_root / step.out)
    try:
        with open(src, "rb") as f:
            if step.role == "weights":
                _copy_weights(f, verifier, writer, step)
            elif step.updates or step.role == "index":
                data = f.read()
                verifier.update(data)
                writer.write(_patched_json(step, data, out_root))
            else:
                while chunk := f.read(CHUNK):
                    verifier.update(chunk)
                    writer.write(chunk)
        verified = verifier.check()
    except BaseException:
        writer.abort()
        raise
    return writer.finish(), verified


def _patched_json(step: Step, data: bytes, out_root: Path) -> bytes:
    try:
        content = json.loads(data)
    except ValueError:
        raise CorruptFileError(step.src, "not valid JSON") from None
    content.update(dict(step.updates))
    if step.role == "index":
        # shards were written before the index: record their real tensor bytes
        shards = sorted(set(content.get("weight_map", {}).values()))
        folder = (out_root / step.out).parent
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CorruptFileError(step.src, f"lists shards that are not in the repo: {', '.join(missing)}")
        total = sum(_tensor_bytes(folder / s) for s in shards)
        content.setdefault("metadata", {})["total_size"] = total
    return (json.dumps(content, indent=2) + "\n").encode()


def _tensor_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def _copy_weights(f: Any, verifier: _Verifier, writer: _Writer, step: Step) -> None:
    """Stream a safetensors file, storing floating tensors as ``step.dtype`` (a chunk at a time)."""
    import torch

    header = _read_header(f, verifier, step.src)
    metadata = header.pop("__metadata__", None) or {}
    metadata.setdefault("format", "pt")
    target = ST_NAMES[step.dtype] if step.dtype else None
    tensors = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    out_header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, info in tensors:
        start, end = info["data_offsets"]
        dtype = info["dtype"]
        out_dtype = target if target and dtype in ST_FLOATS else dtype
        size = end - start
        if out_dtype != dtype:
            size = size // ST_FLOATS[dtype] * ST_FLOATS[out_dtype]
        out_header[name] = {
            "dtype": out_dtype,
            "shape": info["shape"],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(out_header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    writer.write(len(encoded).to_bytes(8, "little"))
    writer.write(encoded)

    torch_dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    position = 0
    for _name, info in tensors:
        start, end = info["data_offsets"]
        if start < position:
            raise CorruptFileError(step.src, "overlapping tensors")
        if start > position:  # a gap: hash it, do not copy it
            verifier.update(f.read(start - position))
        dtype = info["dtype"]
        out_dtype = target if target and dtype in ST_FLOATS else dtype
        step_bytes = CHUNK - CHUNK % ST_FLOATS.get(dtype, 1)
        remaining = end - start
        while remaining:
            chunk = f.read(min(step_bytes, remaining))
            if not chunk:
                raise CorruptFileError(step.src, "truncated tensor data")
            verifier.update(chunk)
            remaining -= len(chunk)
            if out_dtype == dtype:
                writer.write(chunk)
            else:
                values = torch.frombuffer(bytearray(chunk), dtype=torch_dtypes[dtype])
                writer.write(values.to(torch_dtypes[out_dtype]).view(torch.uint8).numpy().tobytes())
        position = end
    while rest := f.read(CHUNK):  # trailing bytes (none in a valid file) still count for the hash
        verifier.update(rest)


# --------------------------------------------------------------------------- building


@dataclass
class BuildOptions:
    models_dir: Path
    sources: list[Source]
    revisions: dict[str, str] = field(default_factory=dict)
    verify: bool = False
    force: bool = False
    retries: int = 5
    backoff_s: float = 2.0
    sleep: Callable[[float], None] = time.sleep
    delete_downloads: Path | None = None  # a download cache to clean after each model


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_complete(model_dir: Path, recipe: str, deep: bool) -> str | None:
    """None when ``model_dir`` is a finished build of ``recipe``; else why it is not."""
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return "not built yet" if not model_dir.exists() else "no manifest (not built by this builder)"
    except (OSError, ValueError):
        return "unreadable manifest"
    if manifest.get("recipe") != recipe:
        return "built from another recipe or revision"
    for rel, info in manifest.get("files", {}).items():
        path = model_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != info["size"]:
            return f"{rel} has {path.stat().st_size} bytes, expected {info['size']}"
        if deep and file_sha256(path) != info["sha256"]:
            return f"{rel} does not match its recorded sha256"
    for rel, target in manifest.get("links", {}).items():
        link = model_dir / rel
        if not link.is_symlink() or os.readlink(link) != target or not link.exists():
            return f"{rel} is not a working link to {target}"
    return None


def build(families: Iterable[str], options: BuildOptions) -> dict[str, str]:
    """Build every model directory the families need; return name -> 'built' or 'skipped'."""
    options.models_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, str] = {}
    for spec in specs_for(families):
        recipe = recipe_id(spec, options.revisions)
        target = options.models_dir / spec.name
        reason = "rebuild forced" if options.force else check_complete(target, recipe, options.verify)
        if reason is None:
            log.info("%s: complete in %s, skipped", spec.name, target)
            results[spec.name] = "skipped"
            continue
        if reason.startswith("no manifest"):
            log.warning("%s: %s exists without a manifest and will be replaced", spec.name, target)
        log.info("%s: building (%s)", spec.name, reason)
        started = time.monotonic()
        _build_model(spec, recipe, target, options)
        log.info("%s: built in %.1f s", spec.name, time.monotonic() - started)
        results[spec.name] = "built"
        if options.delete_downloads is not None:
            for part in spec.parts:
                shutil.rmtree(options.delete_downloads / repo_folder(part.repo), ignore_errors=True)
    return results


def _build_model(spec: ModelSpec, recipe: str, target: Path, options: BuildOptions) -> None:
    staging = target.with_name(f".staging-{spec.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    manifest: dict[str, Any] = {
        "builder": BUILDER_VERSION,
        "model": spec.name,
        "recipe": recipe,
        "sources": {},
        "files": {},
        "links": {},
    }
    try:
        for part in spec.parts:
            revision = options.revisions.get(part.repo, "main")
            snap, files = _build_part(part, revision, staging, options)
            manifest["sources"][part.repo] = {
                "revision": revision,
                "commit": snap.commit,
                "from": snap.source.label,
            }
            manifest["files"].update(files)
        for rel, link_target in spec.links:
            (staging / rel).symlink_to(link_target, target_is_directory=True)
            manifest["links"][rel] = link_target
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.chmod(staging, 0o755)
        old = target.with_name(f".old-{spec.name}")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists() or target.is_symlink():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _build_part(
    part: Part, revision: str, staging: Path, options: BuildOptions
) -> tuple[Snapshot, dict[str, Any]]:
    """Write one repo's share of a model, trying each source in turn (with retries)."""
    problems: list[str] = []
    for source in options.sources:
        attempt = 0
        while True:
            attempt += 1
            written: list[Path] = []
            try:
                snap = source.snapshot(part.repo, revision)
                steps = plan_part(part, snap.files)
                source.fetch(snap, [step.src for step in steps])
                files: dict[str, Any] = {}
                unverified = []
                for step in steps:
                    written.append(staging / step.out)
                    files[step.out], verified = transfer(step, snap, staging)
                    if not verified:
                        unverified.append(step.src)
                if unverified:
                    log.warning(
                        "%s: %s has no size/hash to check %d file(s) against (%s)",
                        part.repo,
                        source.label,
                        len(unverified),
                        ", ".join(unverified[:3]),
                    )
                log.info("%s@%s: %d files from %s", part.repo, snap.commit[:12], len(steps), source.label)
                return snap, files
            except UnavailableError as err:
                problems.append(f"{source.label}: {err}")
                break
            except CorruptFileError as err:
                _remove(written)
                log.warning("%s: %s: corrupt file %s", part.repo, source.label, err)
                if not source.refetchable or attempt >= options.retries:
                    problems.append(f"{source.label}: corrupt file {err}")
                    break
                source.discard(snap, err.path)
            except Exception as err:
                _remove(written)
                if not is_transient(err):
                    problems.append(f"{source.label}: {type(err).__name__}: {err}{auth_hint(err)}")
                    break
                if attempt >= options.retries:
                    problems.append(f"{source.label}: gave up after {attempt} attempts: {err}")
                    break
                delay = min(options.backoff_s * 2 ** (attempt - 1), 60.0)
                log.warning(
                    "%s: %s: %s (attempt %d of %d), retrying in %.0f s",
                    part.repo,
                    source.label,
                    err,
                    attempt,
                    options.retries,
                    delay,
                )
                options.sleep(delay)
    raise BuildError(f"{part.repo}@{revision}: no source could provide it: " + "; ".join(problems))


def auth_hint(err: BaseException) -> str:
    """What to do about a refused hub request."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        return " (pass a Hugging Face token: HF_TOKEN, or the build secret hf_token)"
    return ""


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- command line


def read_token(token_file: str | None) -> str | None:
    """The hub token: --token-file, HF_TOKEN_FILE, the BuildKit secret, then HF_TOKEN."""
    for candidate in (token_file, os.environ.get("HF_TOKEN_FILE")):
        if candidate:
            return Path(candidate).read_text().strip() or None
    if SECRET_TOKEN_FILE.is_file():
        return SECRET_TOKEN_FILE.read_text().strip() or None
    return os.environ.get("HF_TOKEN") or None


def truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline_from_env() -> bool:
    return truthy(os.environ.get("HF_HUB_OFFLINE"))


def default_download_cache() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def parse_families(value: str) -> list[str]:
    names = [part.strip().lower() for part in value.split(",") if part.strip()]
    if names == ["all"]:
        return list(FAMILIES)
    unknown = [name for name in names if name not in FAMILIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"families are a comma-separated subset of {', '.join(FAMILIES)}")
    return list(dict.fromkeys(names))


def parse_revision(value: str) -> tuple[str, str]:
    repo, sep, revision = value.partition("=")
    if not sep or not repo or not revision:
        raise argparse.ArgumentTypeError("use REPO=REVISION, e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers=<commit>")
    return repo, revision


def make_sources(
    hub_caches: list[Path], download_cache: Path, offline: bool, token: str | None
) -> list[Source]:
    """Read-only hub caches first, then the download cache, then the hub (unless offline)."""
    caches = list(hub_caches) or ([RUNPOD_CACHE] if RUNPOD_CACHE.is_dir() else [])
    sources: list[Source] = [CacheSource(path) for path in caches]
    if all(path.resolve() != download_cache.resolve() for path in caches):
        sources.append(CacheSource(download_cache, f"download cache {download_cache}"))
    if not offline:
        sources.append(HubSource(download_cache, token))
    return sources


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--families",
        type=parse_families,
        default=parse_families(os.environ.get("WORKER_MODELS") or "sdxl,wan"),
        help="comma-separated: sdxl, wan or all (default: $WORKER_MODELS or sdxl,wan)",
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    download_cache = args.download_cache or default_download_cache()
    offline = args.offline or offline_from_env()
    sources = make_sources(
        args.hub_cache, download_cache, offline, None if offline else read_token(args.token_file)
    )
    options = BuildOptions(
        models_dir=args.models_dir,
        sources=sources,
        revisions=dict(args.revision),
        verify=args.verify,
        force=args.force,
        retries=max(1, args.retries),
        delete_downloads=download_cache if args.delete_downloads else None,
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
