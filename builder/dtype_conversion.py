"""The safetensors dtype conversion: a file streamed a chunk at a time, its floating tensors stored
in another dtype (fp32 to bf16 or fp16), the other tensors copied as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO

from builder.errors import CorruptFileError
from builder.hashed_io import CHUNK, HashingWriter, SourceVerifier

ST_FLOATS = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
ST_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _read_header(f: BinaryIO, verifier: SourceVerifier, rel: str) -> dict[str, Any]:
    """The JSON header of the safetensors file ``rel``, hashed as it is read."""
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


def tensor_bytes(path: Path) -> int:
    """How many bytes of tensor data a safetensors file holds (its header's offsets)."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def convert_weights(
    f: BinaryIO, verifier: SourceVerifier, writer: HashingWriter, rel: str, store_as: str | None
) -> None:
    """Stream the safetensors file ``rel``, storing floating tensors as ``store_as`` (a chunk at a time)."""
    import torch

    header = _read_header(f, verifier, rel)
    metadata = header.pop("__metadata__", None) or {}
    metadata.setdefault("format", "pt")
    target = ST_NAMES[store_as] if store_as else None
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
            raise CorruptFileError(rel, "overlapping tensors")
        if start > position:  # a gap: hash it, do not copy it
            verifier.update(f.read(start - position))
        dtype = info["dtype"]
        out_dtype = target if target and dtype in ST_FLOATS else dtype
        step_bytes = CHUNK - CHUNK % ST_FLOATS.get(dtype, 1)
        remaining = end - start
        while remaining:
            chunk = f.read(min(step_bytes, remaining))
            if not chunk:
                raise CorruptFileError(rel, "truncated tensor data")
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
