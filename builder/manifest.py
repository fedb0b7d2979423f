"""The manifest each finished model directory holds, and the check that lets a later run skip it.

``.builder-manifest.json`` records the recipe (the spec and revisions it was built from), the sources
and commits used, every file's size and sha256, and the links. A model is complete when the recipe
matches and every file has its recorded size (and, with ``deep``, its recorded sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from builder.hashed_io import file_sha256
from builder.layout import ModelSpec

BUILDER_VERSION = 1
MANIFEST = ".builder-manifest.json"


def recipe_id(spec: ModelSpec, revisions: dict[str, str]) -> str:
    """Identifies what a model directory is built from: a change means a rebuild."""
    data = {
        "builder": BUILDER_VERSION,
        "spec": asdict(spec),
        "revisions": {part.repo: revisions.get(part.repo, "main") for part in spec.parts},
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def new_manifest(spec: ModelSpec, recipe: str) -> dict[str, Any]:
    """An empty manifest for ``spec``, filled in as its parts are written."""
    return {
        "builder": BUILDER_VERSION,
        "model": spec.name,
        "recipe": recipe,
        "sources": {},
        "files": {},
        "links": {},
    }


def write_manifest(model_dir: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` into ``model_dir``."""
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


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
