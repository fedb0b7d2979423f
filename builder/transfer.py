"""Writing one output file from a snapshot: copied, converted (safetensors weights) or patched (JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from builder.dtype_conversion import convert_weights, tensor_bytes
from builder.errors import CorruptFileError
from builder.hashed_io import CHUNK, HashingWriter, SourceVerifier
from builder.layout import Step
from builder.sources import FileMeta, Snapshot


def transfer(step: Step, snap: Snapshot, out_root: Path) -> tuple[dict[str, Any], bool]:
    """Copy, convert or patch one file; return its manifest entry and whether the source was verified."""
    src = snap.root / step.src
    meta = snap.files.get(step.src, FileMeta())
    verifier = SourceVerifier(step.src, src, meta)
    writer = HashingWriter(out_root / step.out)
    try:
        with open(src, "rb") as f:
            if step.role == "weights":
                convert_weights(f, verifier, writer, step.src, step.dtype)
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
    """A JSON file with ``step.updates`` set; an index also gets its shards' real ``total_size``."""
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
        total = sum(tensor_bytes(folder / s) for s in shards)
        content.setdefault("metadata", {})["total_size"] = total
    return (json.dumps(content, indent=2) + "\n").encode()
