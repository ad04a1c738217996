"""A deterministic safetensors writer and a strict reader, with numpy only (torch-free).

The safetensors library serializes ``__metadata__`` from a hash map, in a different order in every
process, so its files cannot be pinned byte for byte. This writer emits the same container
(8-byte little-endian header length N, N bytes of JSON header, then the raw little-endian tensor
data, back to back) with the JSON keys sorted, no whitespace, ASCII only, padded with spaces so
the data starts at a multiple of 8. The safetensors library reads these files unchanged.

The reader checks everything a hostile file could get wrong (lengths, offsets that overlap,
leave gaps or run past the end, unknown dtypes, duplicate keys) and raises one-line
PbexportErrors naming the file. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from typing import BinaryIO

import numpy as np

from .errors import PbexportError

# safetensors dtype name -> little-endian numpy dtype. BF16 has no numpy dtype: it travels as raw
# 16-bit words (an int16 view) and only torch gives it meaning.
DTYPES: dict[str, str] = {
    "BOOL": "|b1", "U8": "|u1", "I8": "|i1", "U16": "<u2", "I16": "<i2", "F16": "<f2", "BF16": "<i2",
    "U32": "<u4", "I32": "<i4", "F32": "<f4", "U64": "<u8", "I64": "<i8", "F64": "<f8",
}
_BY_NUMPY = {np.dtype(v): k for k, v in DTYPES.items() if k != "BF16"}
MAX_HEADER = 100_000_000  # the safetensors library's own limit
ALIGN = 8


def dtype_name(arr: np.ndarray) -> str:
    try:
        return _BY_NUMPY[arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype]
    except KeyError:
        raise PbexportError(f"dtype {arr.dtype} cannot be stored in a safetensors file") from None


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def header_bytes(tensors: Iterable[tuple[str, np.ndarray, str]], metadata: dict[str, str] | None) -> bytes:
    """The length prefix and padded JSON header for ``(name, array, dtype name)`` in data order."""
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise PbexportError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, arr, dtype in tensors:
        if name == "__metadata__" or name in header:
            raise PbexportError(f"duplicate or reserved tensor name {name!r}")
        end = offset + arr.nbytes
        header[name] = {"dtype": dtype, "shape": [int(d) for d in arr.shape], "data_offsets": [offset, end]}
        offset = end
    text = _canonical(header).encode("ascii")
    text += b" " * (-(8 + len(text)) % ALIGN)
    return struct.pack("<Q", len(text)) + text


def _entries(tensors) -> list[tuple[str, np.ndarray, str]]:
    out = []
    for item in tensors:
        name, arr = item[0], np.asarray(item[1])
        dtype = item[2] if len(item) > 2 else dtype_name(arr)
        if dtype not in DTYPES:
            raise PbexportError(f"unknown safetensors dtype {dtype!r}")
        arr = np.ascontiguousarray(arr, dtype=np.dtype(DTYPES[dtype]))
        out.append((name, arr, dtype))
    return out


def dump(f: BinaryIO, tensors, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (``(name, array)`` or ``(name, array, dtype name)``, in this order) to ``f``."""
    entries = _entries(tensors)
    f.write(header_bytes(entries, metadata))
    for _, arr, _ in entries:
        f.write(arr.tobytes())


def dumps(tensors, metadata: dict[str, str] | None = None) -> bytes:
    entries = _entries(tensors)
    return header_bytes(entries, metadata) + b"".join(arr.tobytes() for _, arr, _ in entries)


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _bad(source: str, what: str) -> PbexportError:
    return PbexportError(f"not a valid safetensors file ({what})", source)


def read_header(data: bytes | memoryview, source: str) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries in data order, metadata, data start) of a safetensors file held in ``data``."""
    if len(data) < 8:
        raise _bad(source, f"{len(data)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > MAX_HEADER or 8 + n > len(data):
        raise _bad(source, f"header length {n} does not fit the {len(data)}-byte file; truncated?")
    raw = bytes(data[8:8 + n])
    if not raw.startswith(b"{"):
        raise _bad(source, "header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(source, f"header is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(header, dict):
        raise _bad(source, "header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(source, "__metadata__ must map strings to strings")
    entries = []
    for name, info in header.items():
        if not (isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}):
            raise _bad(source, f"tensor {name!r} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise _bad(source, f"tensor {name!r} has unknown dtype {dtype!r}")
        ints = (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
                and all(type(d) is int and d >= 0 for d in [*shape, *offsets]))
        if not ints:
            raise _bad(source, f"tensor {name!r} has a malformed shape or data_offsets")
        if offsets[1] - offsets[0] != math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize:
            raise _bad(source, f"tensor {name!r} has data_offsets {offsets} that do not fit shape {shape}")
        entries.append((name, info))
    entries.sort(key=lambda e: tuple(e[1]["data_offsets"]))
    pos = 0
    for name, info in entries:
        if info["data_offsets"][0] != pos:
            raise _bad(source, f"tensor {name!r} data does not start where the previous one ends")
        pos = info["data_offsets"][1]
    if 8 + n + pos != len(data):
        raise _bad(source, f"tensor data is {len(data) - 8 - n} bytes, header says {pos}; truncated?")
    return dict(entries), metadata, 8 + n


def loads(data: bytes, source: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors in data order, metadata); arrays are read-only views of ``data`` (BF16 as int16)."""
    entries, metadata, start = read_header(data, source)
    tensors = {}
    for name, info in entries.items():
        dtype = np.dtype(DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        arr = np.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin)
        if info["dtype"] == "BOOL" and arr.view(np.uint8).max(initial=0) > 1:
            raise _bad(source, f"BOOL tensor {name!r} holds values other than 0 and 1")
        tensors[name] = arr.reshape(info["shape"])
    return tensors, metadata
