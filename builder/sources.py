"""Where repo files come from: hub caches on disk (read only) and the hub itself (into a download cache).

A source lists a repo at one commit with what each file should be (size, LFS sha256 or git blob sha1),
so that every file can be checked as it is copied (see hashed_io.py).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from builder.errors import UnavailableError

COMMIT_RE = re.compile(r"[0-9a-f]{40}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")


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
        """The commit ``revision`` names in this cache (a commit, a ref, or the only snapshot)."""
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
        """What the name of a snapshot file's blob says about it (its sha256 or git sha1)."""
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

    def __init__(self, cache_dir: Path, token: str | None, api: Any = None, timeout_s: float = 30.0) -> None:
        """``timeout_s``: connecting and each wait for data, per request (a silent server fails the
        request, which the builder retries a bounded number of times)."""
        from huggingface_hub import HfApi

        self.cache_dir = Path(cache_dir)
        self.token = token
        self.api = api or HfApi(token=token)
        self.timeout_s = timeout_s

    def snapshot(self, repo: str, revision: str) -> Snapshot:
        info = self.api.model_info(
            repo, revision=revision, files_metadata=True, token=self.token, timeout=self.timeout_s
        )
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
            etag_timeout=self.timeout_s,
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
