"""Read and write model weights as safetensors, with numpy only.

The format is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw data. Writing sorts tensor
names and fixes the JSON layout, so the same arrays always give the same
bytes. The header's metadata carries the model configuration and a SHA-256 of
the data, so a damaged file is caught at load rather than producing nonsense.
Loading maps the file read-only: the pages are shared and loading is quick.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
_NAMES = {np.dtype(v).str: k for k, v in _DTYPES.items()}
#: The JSON header of a real model is a few KiB; refuse absurd lengths early.
MAX_HEADER_BYTES = 16 * 1024 * 1024


class WeightsFormatError(ValueError):
    """The file is not a complete, intact safetensors file."""


def save_weights(
    path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]
) -> None:
    """Write ``tensors`` and string ``metadata`` to ``path`` deterministically."""
    header: dict[str, object] = {}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        dtype = _NAMES.get(array.dtype.newbyteorder("<").str)
        if dtype is None:
            raise ValueError(f"{name}: unsupported dtype {array.dtype}")
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    body = b"".join(chunks)
    meta = dict(metadata)
    meta["sha256"] = hashlib.sha256(body).hexdigest()
    header["__metadata__"] = dict(sorted(meta.items()))
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # align the data for zero-copy views
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + body)


def load_weights(
    path: Path, *, verify: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors (read-only views of a memory map) and metadata in ``path``.

    Raises ``WeightsFormatError`` saying what is wrong with the file, and
    ``OSError`` when it cannot be read.
    """
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    if raw.size < 8:
        raise WeightsFormatError("too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", raw[:8].tobytes())
    if header_len > min(MAX_HEADER_BYTES, raw.size - 8):
        raise WeightsFormatError(
            "header length is larger than the file (truncated or not safetensors)"
        )
    try:
        header = json.loads(raw[8 : 8 + header_len].tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightsFormatError("header is not JSON (not a safetensors file)") from None
    if not isinstance(header, dict):
        raise WeightsFormatError("header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    body = raw[8 + header_len :]
    tensors: dict[str, np.ndarray] = {}
    end = 0
    for name, info in header.items():
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
            start, stop = (int(x) for x in info["data_offsets"])
            shape = tuple(int(x) for x in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise WeightsFormatError(f"tensor {name!r}: malformed header entry") from None
        if stop > body.size or stop - start != dtype.itemsize * int(np.prod(shape)):
            raise WeightsFormatError(f"tensor {name!r}: data missing (file truncated?)")
        tensors[name] = body[start:stop].view(dtype).reshape(shape)
        end = max(end, stop)
    if end != body.size:
        raise WeightsFormatError("data section has unexpected trailing bytes")
    if verify and "sha256" in metadata:
        digest = hashlib.sha256(body.data).hexdigest()
        if digest != metadata["sha256"]:
            raise WeightsFormatError("checksum mismatch (file damaged)")
    return tensors, dict(metadata)
