"""Measure candidate lossless codecs on packed Piggyback masks (bits/param vs Shannon entropy).

Used to choose the codec set in pbexport/bitset.py. Prints one row per (mask, codec):
stored bits per parameter, the ratio to the i.i.d. entropy H of the tensor's density, whether it
meets the acceptance bound (<= 1.05*H + 0.01 and <= 1.01), and encode/decode times.

    python3 tools/measure_codecs.py                  # default sizes and densities
    python3 tools/measure_codecs.py --sizes 432 100000 --densities 0.99 0.999
"""

from __future__ import annotations

import argparse
import lzma
import math
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from pbexport import bitset  # noqa: E402


def entropy(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def pack(mask: np.ndarray) -> bytes:
    return np.packbits(mask.reshape(-1).astype(bool), bitorder="little").tobytes()


def _zstd(level: int, magicless: bool = False):
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        format=zstandard.FORMAT_ZSTD1_MAGICLESS if magicless else zstandard.FORMAT_ZSTD1,
        write_checksum=0,
        write_content_size=0,
        write_dict_id=0,
    )
    cctx = zstandard.ZstdCompressor(compression_params=params)
    dctx = zstandard.ZstdDecompressor(
        format=zstandard.FORMAT_ZSTD1_MAGICLESS if magicless else zstandard.FORMAT_ZSTD1
    )
    return cctx.compress, lambda b, n: dctx.decompress(b, max_output_size=n)


def _lzma_raw(filter_id: int, **opts):
    filters = [{"id": filter_id, "preset": 9 | lzma.PRESET_EXTREME, **opts}]

    def enc(b: bytes) -> bytes:
        return lzma.compress(b, format=lzma.FORMAT_RAW, filters=filters)

    def dec(b: bytes, n: int) -> bytes:
        return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters).decompress(b, max_length=n)

    return enc, dec


def _lzma_fmt(fmt: int):
    def enc(b: bytes) -> bytes:
        return lzma.compress(b, format=fmt, preset=9 | lzma.PRESET_EXTREME)

    return enc, lambda b, n: lzma.decompress(b)


def candidates() -> dict:
    c = {
        "raw": (lambda b: b, lambda b, n: b),
        "zlib9": (lambda b: zlib.compress(b, 9), lambda b, n: zlib.decompress(b)),
        "deflate9": (
            lambda b: (lambda o: o.compress(b) + o.flush())(zlib.compressobj(9, zlib.DEFLATED, -15)),
            lambda b, n: zlib.decompress(b, -15),
        ),
    }
    for lvl in (3, 9, 19, 22):
        c[f"zstd{lvl}"] = _zstd(lvl)
    c["zstd19-nomagic"] = _zstd(19, magicless=True)
    c["xz9e"] = _lzma_fmt(lzma.FORMAT_XZ)
    c["alone9e"] = _lzma_fmt(lzma.FORMAT_ALONE)
    c["lzma2raw-lc3"] = _lzma_raw(lzma.FILTER_LZMA2)
    c["lzma2raw-lc0"] = _lzma_raw(lzma.FILTER_LZMA2, lc=0, lp=0, pb=0)
    c["lzma1raw-lc0"] = _lzma_raw(lzma.FILTER_LZMA1, lc=0, lp=0, pb=0)
    return c


def measure_rice(flat: np.ndarray) -> tuple[int, float, float]:
    """Payload bytes, encode and decode seconds of the shipped rice codec."""
    t0 = time.perf_counter()
    out = bitset._rice_encode(flat, int(np.count_nonzero(flat)))
    t1 = time.perf_counter()
    back = bitset._rice_decode(out, flat.size)
    t2 = time.perf_counter()
    if not np.array_equal(back, flat):
        raise SystemExit("rice failed to round-trip")
    return len(out), t1 - t0, t2 - t1


def iid_masks(sizes, densities, rng):
    for n in sizes:
        for d in densities:
            yield f"iid n={n} d={d}", rng.random(n) < d


def structured_masks(rng):
    """Masks with row structure like trained Piggyback masks: per-output-filter densities vary."""
    for shape in ((64, 64, 3, 3), (512, 512, 3, 3), (1000, 2048)):
        rows = shape[0]
        per_row = rng.beta(8, 1.5, size=rows)  # mostly dense rows, a tail of sparse ones
        per_row[rng.random(rows) < 0.1] = 0.0  # some filters switched off entirely
        per_row[rng.random(rows) < 0.1] = 1.0  # some kept whole
        m = rng.random(shape) < per_row.reshape((rows,) + (1,) * (len(shape) - 1))
        yield f"rows {'x'.join(map(str, shape))}", m
    # Spatially correlated: 3x3 kernels kept/dropped as a block (density 0.9).
    m = np.repeat(rng.random((256, 256, 1)) < 0.9, 9, axis=2).reshape(256, 256, 3, 3)
    yield "kernels 256x256x3x3", m


def measure(name: str, mask: np.ndarray, codecs: dict, only: list[str] | None) -> list[tuple]:
    """One row per codec: (mask, codec, n, H, bits/param, ratio to H, meets bound, enc s, dec s)."""
    n = mask.size
    h = entropy(float(mask.mean())) if n else 0.0
    packed = pack(mask)
    results = []  # (codec, payload bytes, encode s, decode s)
    for cname, (enc, dec) in codecs.items():
        t0 = time.perf_counter()
        out = enc(packed)
        t1 = time.perf_counter()
        if dec(out, len(packed)) != packed:
            raise SystemExit(f"{cname} failed to round-trip on {name}")
        results.append((cname, len(out), t1 - t0, time.perf_counter() - t1))
    results.append(("rice", *measure_rice(mask.reshape(-1))))
    t0 = time.perf_counter()
    chosen = bitset.encode_mask(mask)  # what pbexport ships: the smallest of its codecs
    t1 = time.perf_counter()
    bitset.decode_mask(chosen.codec, chosen.payload, chosen.shape, chosen.sha256, chosen.ones)
    results.append((f"chosen:{chosen.codec}", len(chosen.payload), t1 - t0, time.perf_counter() - t1))

    rows = []
    for cname, nbytes, te, td in results:
        if only and cname.split(":")[0] not in only:
            continue
        bpp = 8 * nbytes / n
        ok = bpp <= 1.05 * h + 0.01 and bpp <= 1.01
        rows.append((name, cname, n, h, bpp, bpp / h if h else float("inf"), ok, te, td))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[432, 4608, 36864, 147456, 589824, 2359296])
    ap.add_argument(
        "--densities", type=float, nargs="+", default=[0.5, 0.55, 0.7, 0.88, 0.95, 0.99, 0.999, 1.0]
    )
    ap.add_argument("--codecs", nargs="*", help="only these candidate codecs")
    ap.add_argument("--no-structured", action="store_true")
    ap.add_argument("--best-only", action="store_true", help="print only what encode_mask chose")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    codecs = candidates()
    masks = list(iid_masks(args.sizes, args.densities, rng))
    if not args.no_structured:
        masks += list(structured_masks(rng))

    print(f"{'mask':28} {'codec':15} {'H':>7} {'bits/p':>8} {'/H':>7} {'ok':>3} {'enc ms':>8} {'dec ms':>8}")
    for name, mask in masks:
        rows = measure(name, mask, codecs, args.codecs)
        if args.best_only:
            rows = [r for r in rows if r[1].startswith("chosen")]
        for name_, cname, _n, h, bpp, ratio, ok, te, td in rows:
            print(
                f"{name_:28} {cname:15} {h:7.4f} {bpp:8.4f} {ratio:7.3f} {'y' if ok else 'N':>3}"
                f" {te * 1e3:8.1f} {td * 1e3:8.1f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
