"""Tests for pbexport.bitset: exact round trips, the pinned bit order, storage bounds, corruption."""

from __future__ import annotations

import hashlib
import math
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbexport.bitset import (
    BIT_ORDER,
    CODECS,
    EncodedMask,
    binary_entropy,
    decode_mask,
    encode_mask,
    mask_entropy_bits,
    pack_bits,
    unpack_bits,
)
from pbexport.errors import PbexportError

MAX_ELEMS = 50_000


@st.composite
def shapes(draw) -> tuple[int, ...]:
    """0-4 dims, sizes 0 and 1 included, at most MAX_ELEMS elements."""
    ndim = draw(st.integers(0, 4))
    dims, budget = [], MAX_ELEMS
    for _ in range(ndim):
        d = draw(st.integers(1, max(1, min(budget, 400))))
        dims.append(d)
        budget //= d
    if dims and draw(st.integers(0, 9)) == 0:
        dims[draw(st.integers(0, ndim - 1))] = 0  # an empty tensor now and then
    return tuple(dims)


@st.composite
def masks(draw) -> np.ndarray:
    """Random masks: i.i.d. at any density (extremes included) or with per-row densities."""
    shape = draw(shapes())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    density = draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.001, 0.999]), st.floats(0.0, 1.0)))
    if draw(st.booleans()) and len(shape) >= 2 and shape[0] > 0:
        rows = rng.random(shape[0]).reshape((shape[0],) + (1,) * (len(shape) - 1))
        return rng.random(shape) < rows * density
    return rng.random(shape) < density


def iid(n: int, density: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(n) < density


# --- packing -------------------------------------------------------------------------------------


def test_bit_order_golden():
    # Element i is bit (i % 8) of byte i // 8, elements in C order: flat ones at 0 | 8, 9, 11 | 17, 19.
    mask = np.array(
        [[1, 0, 0, 0, 0, 0, 0, 0, 1, 1], [0, 1, 0, 0, 0, 0, 0, 1, 0, 1]],
        dtype=bool,
    )
    packed = pack_bits(mask)
    assert BIT_ORDER == "little"
    assert packed.dtype == np.uint8
    assert packed.tobytes() == bytes([0x01, 0x0B, 0x0A])
    assert np.array_equal(unpack_bits(packed, mask.shape), mask)


def test_pack_bits_accepts_0_1_numbers_and_pads_with_zero():
    assert pack_bits(np.ones(3, dtype=np.int64)).tobytes() == b"\x07"
    assert pack_bits(np.array([0.0, 1.0])).tobytes() == b"\x02"
    assert pack_bits(np.zeros((0, 5), dtype=bool)).size == 0
    assert pack_bits(np.array(True)).tobytes() == b"\x01"


def test_pack_bits_rejects_non_binary_values():
    with pytest.raises(PbexportError, match="^mask has values other than 0 and 1$"):
        pack_bits(np.array([0, 1, 2]))
    with pytest.raises(PbexportError, match="^mask must be a bool or 0/1 numeric array, got dtype <U1$"):
        pack_bits(np.array(["a"]))


def test_unpack_bits_rejects_wrong_length_and_padding():
    with pytest.raises(
        PbexportError, match=re.escape("packed mask has 1 bytes, expected 2 for shape (3, 4)")
    ):
        unpack_bits(np.zeros(1, np.uint8), (3, 4))
    with pytest.raises(
        PbexportError,
        match=re.escape("packed mask has nonzero padding bits after element 12 for shape (3, 4)"),
    ):
        unpack_bits(np.array([0, 0x10], np.uint8), (3, 4))
    with pytest.raises(PbexportError, match="^packed mask must be a 1-D uint8 array"):
        unpack_bits(np.zeros(2, np.int32), (3, 4))
    with pytest.raises(PbexportError, match=re.escape("mask shape has a negative dimension: (-1, 4)")):
        unpack_bits(np.zeros(2, np.uint8), (-1, 4))


@settings(max_examples=200, deadline=None)
@given(masks())
def test_pack_unpack_round_trip(mask):
    packed = pack_bits(mask)
    assert packed.size == math.ceil(mask.size / 8)
    back = unpack_bits(packed, mask.shape)
    assert back.dtype == bool and back.shape == mask.shape
    assert np.array_equal(back, mask)
    assert np.array_equal(unpack_bits(packed.tobytes(), mask.shape), mask)  # bytes accepted too


# --- entropy -------------------------------------------------------------------------------------


def test_binary_entropy():
    assert binary_entropy(0.0) == 0.0 and binary_entropy(1.0) == 0.0
    assert binary_entropy(0.5) == 1.0
    assert binary_entropy(0.11) == pytest.approx(0.4999, abs=1e-4)
    assert binary_entropy(0.3) == pytest.approx(binary_entropy(0.7))
    with pytest.raises(PbexportError, match=r"^probability must be in \[0, 1\], got 1.5$"):
        binary_entropy(1.5)


def test_mask_entropy_bits():
    assert mask_entropy_bits(np.array([True, False] * 4)) == 8.0
    assert mask_entropy_bits(np.ones((3, 3), bool)) == 0.0
    assert mask_entropy_bits(np.zeros(0, bool)) == 0.0
    assert mask_entropy_bits(np.array([1, 0, 0, 0])) == pytest.approx(4 * binary_entropy(0.25))


# --- encode / decode -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(masks())
def test_encode_decode_round_trip(mask):
    enc = encode_mask(mask)
    assert enc.codec in CODECS
    assert enc.shape == mask.shape
    assert enc.ones == int(mask.sum())
    assert enc.sha256 == hashlib.sha256(pack_bits(mask).tobytes()).hexdigest()
    assert enc.stored_bits == 8 * len(enc.payload) <= 8 * math.ceil(mask.size / 8)  # never worse than raw
    back = decode_mask(enc.codec, enc.payload, enc.shape, enc.sha256, enc.ones)
    assert back.dtype == bool and back.shape == mask.shape
    assert np.array_equal(back, mask)


@pytest.mark.parametrize("density", [0.5, 0.55, 0.7, 0.88, 0.95, 0.99, 0.999, 0.05, 0.01])
def test_stored_bits_within_entropy_bound(density):
    n = 200_000
    mask = iid(n, density, seed=int(density * 1000))
    enc = encode_mask(mask)
    h = mask_entropy_bits(mask) / n
    bits_per_param = enc.stored_bits / n
    assert bits_per_param <= 1.05 * h + 0.01, (enc.codec, bits_per_param, h)
    assert bits_per_param <= 1.01


def test_task_total_within_entropy_bound():
    # A task's masks: tensors of mixed sizes and densities, including structured ones; the bound is on
    # the sum: stored bits / params <= 1.05 * (sum n_i H(p_i)) / (sum n_i) + 0.01.
    rng = np.random.default_rng(7)
    rows = rng.random((256, 1, 1, 1)) < 0.8  # whole output filters switched off
    tensors = [
        iid(432, 0.9, 1).reshape(16, 3, 3, 3),
        iid(36_864, 0.97, 2).reshape(64, 64, 3, 3),
        iid(147_456, 0.93, 3).reshape(128, 128, 3, 3),
        rows & (rng.random((256, 128, 3, 3)) < 0.95),
        np.ones((512, 256), bool),
        iid(512_000, 0.6, 4).reshape(1000, 512),
    ]
    n = sum(t.size for t in tensors)
    stored = sum(encode_mask(t).stored_bits for t in tensors)
    h = sum(mask_entropy_bits(t) for t in tensors) / n
    assert stored / n <= 1.05 * h + 0.01
    assert stored / n <= 1.01


def test_codec_choice():
    assert encode_mask(iid(10_000, 0.5)).codec == "raw"  # nothing beats incompressible bits
    assert encode_mask(iid(10_000, 0.97)).codec == "rice"
    assert encode_mask(np.repeat(iid(1000, 0.5), 64)).codec == "zstd"  # long runs: LZ matches win
    const = encode_mask(np.zeros((64, 64, 3, 3), bool))
    assert const.codec == "rice" and const.stored_bits == 16


def test_encoded_mask_is_frozen():
    enc = encode_mask(iid(100, 0.9))
    assert isinstance(enc, EncodedMask)
    with pytest.raises(AttributeError):
        enc.codec = "raw"  # type: ignore[misc]


def test_decode_is_deterministic_from_recorded_fields_only():
    mask = iid(5000, 0.9).reshape(50, 100)
    enc = encode_mask(mask)
    for _ in range(2):
        assert np.array_equal(
            decode_mask(enc.codec, bytearray(enc.payload), list(enc.shape), enc.sha256), mask
        )


# --- corruption ----------------------------------------------------------------------------------


def encoded(codec: str) -> tuple[np.ndarray, EncodedMask]:
    """A mask that encode_mask stores with `codec`."""
    mask = {
        "raw": iid(4000, 0.5),
        "rice": iid(4000, 0.97),
        "zstd": np.repeat(iid(200, 0.5), 20),
    }[codec].reshape(40, 100)
    enc = encode_mask(mask)
    assert enc.codec == codec
    return mask, enc


def flip(payload: bytes, i: int, bits: int = 0x10) -> bytes:
    return payload[:i] + bytes([payload[i] ^ bits]) + payload[i + 1 :]


def decode(enc: EncodedMask, **change):
    fields = dict(codec=enc.codec, payload=enc.payload, shape=enc.shape, sha256=enc.sha256, ones=enc.ones)
    fields.update(change)
    return decode_mask(**fields)


def test_flipped_byte_raw():
    _, enc = encoded("raw")
    with pytest.raises(
        PbexportError, match="^mask checksum mismatch: decoded bits have sha256 [0-9a-f]{64}, "
    ):
        decode(enc, payload=flip(enc.payload, 100))


def test_flipped_byte_rice():
    _, enc = encoded("rice")
    with pytest.raises(PbexportError, match="^mask checksum mismatch: "):
        decode(enc, payload=flip(enc.payload, 10))  # a remainder bit: a different, valid mask
    with pytest.raises(PbexportError, match=r"^rice payload has reserved header bits set \(0x"):
        decode(enc, payload=flip(enc.payload, 0, 0x20))
    with pytest.raises(PbexportError, match=r"^rice payload has \d+ unary codes, expected \d+$"):
        decode(enc, payload=flip(enc.payload, len(enc.payload) - 3, 0x01))


def test_flipped_byte_zstd():
    _, enc = encoded("zstd")
    with pytest.raises(PbexportError, match="^zstd payload does not decompress: "):
        decode(enc, payload=flip(enc.payload, len(enc.payload) - 3, 0xFF))
    with pytest.raises(PbexportError, match="^zstd payload is not a zstd frame$"):
        decode(enc, payload=flip(enc.payload, 0))  # the magic number


@pytest.mark.parametrize("codec", ["raw", "rice", "zstd"])
def test_every_single_byte_flip_is_caught(codec):
    # Never a silently wrong mask, never an exception other than PbexportError. (A few zstd bits do not
    # affect the output, so the right mask may still come back.)
    mask, enc = encoded(codec)
    errors = 0
    for i in range(0, len(enc.payload), max(1, len(enc.payload) // 64)):
        for bits in (0x01, 0x80, 0xFF):
            try:
                back = decode(enc, payload=flip(enc.payload, i, bits))
            except PbexportError:
                errors += 1
            else:
                assert np.array_equal(back, mask), (i, bits)
    assert errors >= 0.9 * 3 * math.ceil(len(enc.payload) / max(1, len(enc.payload) // 64))


def test_truncated_payload():
    _, raw = encoded("raw")
    with pytest.raises(
        PbexportError, match=re.escape("packed mask has 499 bytes, expected 500 for shape (40, 100)")
    ):
        decode(raw, payload=raw.payload[:-1])
    _, rice = encoded("rice")
    with pytest.raises(PbexportError, match=r"^rice payload has \d+ unary codes, expected \d+$"):
        decode(rice, payload=rice.payload[:-1])
    with pytest.raises(PbexportError, match=r"^rice payload is truncated: 3 bytes, remainders need \d+$"):
        decode(rice, payload=rice.payload[:3])
    with pytest.raises(PbexportError, match="^rice payload is empty$"):
        decode(rice, payload=b"")
    _, zstd = encoded("zstd")
    with pytest.raises(PbexportError, match="^zstd payload does not decompress: "):
        decode(zstd, payload=zstd.payload[:-1])


def test_trailing_bytes():
    _, rice = encoded("rice")
    with pytest.raises(PbexportError, match="^rice payload has trailing bytes after the last code$"):
        decode(rice, payload=rice.payload + b"\x00")
    _, zstd = encoded("zstd")
    with pytest.raises(PbexportError, match="^zstd payload does not decompress: .*unused data"):
        decode(zstd, payload=zstd.payload + b"\x00")


def test_wrong_sha256():
    _, enc = encoded("rice")
    with pytest.raises(
        PbexportError, match=f"^mask checksum mismatch: decoded bits have sha256 {enc.sha256}, "
    ):
        decode(enc, sha256="0" * 64)


def test_unknown_codec():
    _, enc = encoded("raw")
    with pytest.raises(PbexportError, match=re.escape("unknown mask codec 'lz4' (known: raw, rice, zstd)")):
        decode(enc, codec="lz4")


def test_wrong_shape():
    _, raw = encoded("raw")
    with pytest.raises(
        PbexportError, match=re.escape("packed mask has 500 bytes, expected 505 for shape (40, 101)")
    ):
        decode(raw, shape=(40, 101))
    _, zstd = encoded("zstd")
    with pytest.raises(PbexportError, match="^zstd payload declares 500 bytes, expected 400$"):
        decode(zstd, shape=(32, 100))
    _, rice = encoded("rice")
    with pytest.raises(
        PbexportError, match=r"^rice payload codes element \d+, past the mask's 1000 elements$"
    ):
        decode(rice, shape=(10, 100))
    with pytest.raises(PbexportError, match="^mask shape must be a sequence of integers, got 'ab'$"):
        decode(rice, shape="ab")


def test_wrong_ones_count():
    _, enc = encoded("rice")
    with pytest.raises(PbexportError, match=f"^mask has {enc.ones} ones, expected {enc.ones + 1}$"):
        decode(enc, ones=enc.ones + 1)


def test_payload_must_be_bytes():
    with pytest.raises(PbexportError, match="^mask payload must be bytes, got str$"):
        decode_mask("raw", "\x00", (8,), "0" * 64)


def test_rice_count_larger_than_mask():
    # Header: k = 0, coded value 1; LEB128 count 5 in a 4-element mask.
    with pytest.raises(PbexportError, match="^rice payload codes 5 elements, more than the mask's 4$"):
        decode_mask("rice", bytes([0x80, 0x05, 0xFF]), (4,), "0" * 64)
    with pytest.raises(PbexportError, match="^rice payload has a truncated or overlong element count$"):
        decode_mask("rice", bytes([0x80, 0x85]), (4,), "0" * 64)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(CODECS), st.binary(max_size=40), st.integers(0, 300))
def test_arbitrary_payload_gives_pbexport_error(codec, payload, n):
    # Garbage must fail cleanly (the all-zero checksum cannot match), never with another exception.
    with pytest.raises(PbexportError):
        decode_mask(codec, payload, (n,), "0" * 64)


def test_rice_run_past_the_end():
    # k = 0, value 1, one element after a run of 5 (unary 000001) in a 4-element mask.
    with pytest.raises(PbexportError, match="^rice payload codes a run longer than the mask's 4 elements$"):
        decode_mask("rice", bytes([0x80, 0x01, 0x20]), (4,), "0" * 64)
    # k = 31: one run of 2**31 (remainder 0, quotient 1).
    with pytest.raises(PbexportError, match="^rice payload codes a run longer than the mask's 4 elements$"):
        decode_mask("rice", bytes([0x9F, 0x01, 0, 0, 0, 0, 0x02]), (4,), "0" * 64)
    # Two runs that fit singly but not together: positions 2 and 5 in 4 elements.
    with pytest.raises(PbexportError, match="^rice payload codes element 5, past the mask's 4 elements$"):
        decode_mask("rice", bytes([0x80, 0x02, 0b00100100]), (4,), "0" * 64)


def test_module_imports_without_torch():
    code = "import sys, pbexport.bitset; sys.exit('torch' in sys.modules or 'zstandard' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
