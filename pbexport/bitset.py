"""Bit packing and lossless per-tensor coding of binary Piggyback masks (torch-free).

Codec choice, from tools/measure_codecs.py (bits/param over i.i.d. entropy H of the density, 2.4M elems):
  density     0.7    0.88   0.95   0.99   0.999  | structured (rows/kernels), vs per-tensor H
  zstd -19    1.007  1.035  1.065  1.30   1.64   | 0.20-0.69   zlib -9 always worse than zstd -19
  lzma raw    1.016  1.028  1.067  1.21   1.34   | 0.19-0.65   (LZMA2 lc=0, 5-20x slower to decode)
  rice        1.008  1.020  1.010  1.004  1.008  | 1.04-1.09
zstd and LZMA model bytes, not bits: at density 0.95 they only just meet 1.05*H + 0.01 and at 0.99
they miss it (0.097-0.105 bits/param vs a bound of 0.094). Golomb-Rice coding of the run lengths of
the minority value stays within 3% of H from 147k elements up (4% at 4.6k). Structure (rows or
kernels switched off) is what zstd exploits, so each tensor keeps the smallest of raw / rice /
zstd -19; LZMA's further 1-3% on structured masks was not worth a third codec.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from pbexport.errors import PbexportError

# Element i of the C-order flattened mask is bit (i % 8) of byte i // 8: (byte >> (i % 8)) & 1.
BIT_ORDER = "little"

# Decoders for these names must never change meaning: the name is all a stored tensor records.
#   raw  - pack_bits output as is
#   rice - Golomb-Rice coded run lengths of the minority value (format in _rice_encode)
#   zstd - one standard zstd frame of the packed bits, with content size, no checksum
CODECS: tuple[str, ...] = ("raw", "rice", "zstd")
ZSTD_LEVEL = 19  # encode-side only; any level decodes the same way


def _shape_tuple(shape) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise PbexportError(f"mask shape must be a sequence of integers, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise PbexportError(f"mask shape has a negative dimension: {dims}")
    return dims


def _as_bool(mask) -> np.ndarray:
    """The mask as a bool array; 0/1 integer or float masks are accepted, anything else is not."""
    arr = np.asarray(mask)
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise PbexportError(f"mask must be a bool or 0/1 numeric array, got dtype {arr.dtype}")
    if not ((arr == 0) | (arr == 1)).all():
        raise PbexportError("mask has values other than 0 and 1")
    return arr != 0


def pack_bits(mask: np.ndarray) -> np.ndarray:
    """Pack a bool (or 0/1) array of any shape into uint8[ceil(n/8)], C order, padding bits 0."""
    return np.packbits(_as_bool(mask).reshape(-1), bitorder=BIT_ORDER)


def unpack_bits(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of pack_bits; rejects a wrong length or nonzero padding bits (signs of corruption)."""
    dims = _shape_tuple(shape)
    n = math.prod(dims)
    if isinstance(packed, (bytes, bytearray, memoryview)):
        packed = np.frombuffer(packed, dtype=np.uint8)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise PbexportError(
            f"packed mask must be a 1-D uint8 array, got {packed.dtype} with shape {packed.shape}"
        )
    need = (n + 7) // 8
    if packed.size != need:
        raise PbexportError(f"packed mask has {packed.size} bytes, expected {need} for shape {dims}")
    if n % 8 and packed[-1] >> (n % 8):
        raise PbexportError(f"packed mask has nonzero padding bits after element {n} for shape {dims}")
    return np.unpackbits(packed, count=n, bitorder=BIT_ORDER).view(bool).reshape(dims)


def binary_entropy(p: float) -> float:
    """H(p) in bits; 0 at p in {0, 1}."""
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise PbexportError(f"probability must be in [0, 1], got {p}")
    if p in (0.0, 1.0):
        return 0.0
    return -(p * math.log2(p) + (1.0 - p) * math.log2(1.0 - p))


def mask_entropy_bits(mask: np.ndarray) -> float:
    """Total i.i.d. Shannon entropy of the tensor in bits: n * H(density); the storage yardstick."""
    arr = _as_bool(mask)
    if arr.size == 0:
        return 0.0
    return arr.size * binary_entropy(np.count_nonzero(arr) / arr.size)


@dataclass(frozen=True)
class EncodedMask:
    codec: str  # one of CODECS
    payload: bytes  # what is stored on disk
    shape: tuple[int, ...]
    ones: int  # number of True entries
    sha256: str  # hex sha256 of the packed bits (or its first >= 16 hex digits), checked after decoding

    @property
    def stored_bits(self) -> int:
        return 8 * len(self.payload)


def encode_mask(mask: np.ndarray) -> EncodedMask:
    """Code one mask tensor with whichever codec gives the smallest payload (raw on ties)."""
    arr = _as_bool(mask)
    flat = arr.reshape(-1)
    packed = np.packbits(flat, bitorder=BIT_ORDER).tobytes()
    ones = int(np.count_nonzero(flat))
    candidates = [("raw", packed), ("rice", _rice_encode(flat, ones)), ("zstd", _zstd_encode(packed))]
    codec, payload = min(candidates, key=lambda c: len(c[1]))  # min keeps the first on ties
    enc = EncodedMask(codec, payload, tuple(arr.shape), ones, hashlib.sha256(packed).hexdigest())
    # Check the round trip now rather than discover a codec bug on the device.
    if not np.array_equal(decode_mask(codec, payload, enc.shape, enc.sha256, ones), arr):
        raise RuntimeError(f"internal error: {codec} round trip of a mask of shape {enc.shape} failed")
    return enc


CHECKSUM_MIN_HEX = 16  # a stored checksum may be the sha256 cut to its first 16 (or more) hex digits


def decode_mask(codec: str, payload: bytes, shape, sha256: str, ones: int | None = None) -> np.ndarray:
    """Decode one stored mask to a bool array of `shape`, verifying length, checksum and ones count.

    ``sha256``: the hex sha256 of the packed bits, or its first CHECKSUM_MIN_HEX or more hex digits.
    """
    dims = _shape_tuple(shape)
    n = math.prod(dims)
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise PbexportError(f"mask payload must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if codec == "raw":
        packed = payload
    elif codec == "rice":
        packed = np.packbits(_rice_decode(payload, n), bitorder=BIT_ORDER).tobytes()
    elif codec == "zstd":
        packed = _zstd_decode(payload, (n + 7) // 8)
    else:
        raise PbexportError(f"unknown mask codec {codec!r} (known: {', '.join(CODECS)})")
    mask = unpack_bits(np.frombuffer(packed, dtype=np.uint8), dims)
    want = str(sha256).lower()
    got = hashlib.sha256(packed).hexdigest()[: max(len(want), CHECKSUM_MIN_HEX)]
    if got != want:
        raise PbexportError(f"mask checksum mismatch: decoded bits have sha256 {got}, expected {sha256}")
    if ones is not None and (got_ones := int(np.count_nonzero(mask))) != ones:
        raise PbexportError(f"mask has {got_ones} ones, expected {ones}")
    return mask


# --- zstd -------------------------------------------------------------------------------------


def _zstandard():
    """Import zstandard lazily: a runtime whose masks are all raw or rice can do without it."""
    try:
        import zstandard
    except ImportError:
        raise PbexportError("zstd-coded masks need the zstandard package (pip install zstandard)") from None
    return zstandard


def _zstd_encode(packed: bytes) -> bytes:
    zstandard = _zstandard()

    # The content size in the frame lets the decoder size its buffer (and us reject a mismatch
    # before decompressing); the frame checksum is redundant with our sha256.
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False, write_dict_id=False)
    return cctx.compress(packed)


def _zstd_decode(payload: bytes, nbytes: int) -> bytes:
    zstandard = _zstandard()

    try:
        size = zstandard.frame_content_size(payload)
    except zstandard.ZstdError:
        raise PbexportError("zstd payload is not a zstd frame") from None
    if size != nbytes:
        raise PbexportError(f"zstd payload declares {size} bytes, expected {nbytes}")
    try:
        out = zstandard.ZstdDecompressor().decompress(payload, max_output_size=nbytes, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise PbexportError(f"zstd payload does not decompress: {e}") from None
    if len(out) != nbytes:
        raise PbexportError(f"zstd payload decompressed to {len(out)} bytes, expected {nbytes}")
    return out


# --- rice -------------------------------------------------------------------------------------
# Payload: 1 header byte (bits 0-4: Rice parameter k; bit 7: the coded value m; bits 5-6: 0),
# LEB128 count c of elements equal to m, then c k-bit remainders (LSB first, packed little-endian,
# padded with 0 to a byte), then the c unary quotients (q zeros then a one, packed the same way,
# ending with the byte that holds the last one). Element run gap g = number of non-m elements
# before each m element (since the previous one) = q * 2**k + r. Separate streams keep both
# directions vectorised. For i.i.d. masks the gaps are geometric, where Rice codes are near optimal.


def _rice_encode(flat: np.ndarray, ones: int) -> bytes:
    n = flat.size
    m = ones <= n - ones  # code the positions of the minority value
    gaps = np.diff(np.flatnonzero(flat == m), prepend=-1) - 1
    k = _best_rice_k(gaps, n)
    q = gaps >> k
    r = gaps & ((1 << k) - 1)
    unary = np.zeros(int(q.sum()) + gaps.size, dtype=bool)
    unary[np.cumsum(q + 1) - 1] = True
    rem = ((r[:, None] >> np.arange(k)) & 1).astype(bool).reshape(-1)
    header = bytes([k | (int(m) << 7)]) + _leb128(gaps.size)
    rem_bytes = np.packbits(rem, bitorder=BIT_ORDER).tobytes()
    return header + rem_bytes + np.packbits(unary, bitorder=BIT_ORDER).tobytes()


def _best_rice_k(gaps: np.ndarray, n: int) -> int:
    """The k that minimises the coded length c*k + sum(g >> k) (the c terminators are fixed)."""
    if gaps.size == 0:
        return 0
    kmax = min(31, n.bit_length())
    return min(range(kmax + 1), key=lambda k: gaps.size * k + int((gaps >> k).sum()))


def _rice_decode(payload: bytes, n: int) -> np.ndarray:
    if not payload:
        raise PbexportError("rice payload is empty")
    k, m = payload[0] & 0x1F, bool(payload[0] >> 7)
    if payload[0] & 0x60:
        raise PbexportError(f"rice payload has reserved header bits set (0x{payload[0]:02x})")
    c, pos = _read_leb128(payload, 1)
    if c > n:
        raise PbexportError(f"rice payload codes {c} elements, more than the mask's {n}")
    rem_end = pos + (c * k + 7) // 8
    if len(payload) < rem_end:
        raise PbexportError(f"rice payload is truncated: {len(payload)} bytes, remainders need {rem_end}")
    rem_bits = np.unpackbits(np.frombuffer(payload, np.uint8, rem_end - pos, pos), bitorder=BIT_ORDER)
    if rem_bits[c * k :].any():
        raise PbexportError("rice payload has nonzero padding bits after the remainders")
    r = (rem_bits[: c * k].reshape(c, k).astype(np.int64) << np.arange(k)).sum(axis=1)
    ends = np.flatnonzero(np.unpackbits(np.frombuffer(payload, np.uint8, offset=rem_end), bitorder=BIT_ORDER))
    if ends.size != c:
        raise PbexportError(f"rice payload has {ends.size} unary codes, expected {c}")
    if (len(payload) - rem_end) != (int(ends[-1]) // 8 + 1 if c else 0):
        raise PbexportError("rice payload has trailing bytes after the last code")
    q = np.diff(ends, prepend=-1) - 1
    if c and q.max() >= n:  # bounds q before the shift, and the runs before the cumsum: no overflow
        raise PbexportError(f"rice payload codes a run longer than the mask's {n} elements")
    gaps = (q << k) + r
    if c and gaps.max() >= n:
        raise PbexportError(f"rice payload codes a run longer than the mask's {n} elements")
    where = np.cumsum(gaps + 1) - 1
    if c and where[-1] >= n:
        raise PbexportError(f"rice payload codes element {where[-1]}, past the mask's {n} elements")
    flat = np.full(n, not m, dtype=bool)
    flat[where] = m
    return flat


def _leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_leb128(data: bytes, pos: int) -> tuple[int, int]:
    """Decode an unsigned LEB128 at pos; return (value, position after it)."""
    value = 0
    for i in range(10):  # 10 bytes hold any 64-bit count
        if pos + i >= len(data):
            break
        value |= (data[pos + i] & 0x7F) << (7 * i)
        if not data[pos + i] & 0x80:
            return value, pos + i + 1
    raise PbexportError("rice payload has a truncated or overlong element count")
