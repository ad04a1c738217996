"""Pack runs into a fresh bundle one by one and print the storage figures of the Pack acceptance.

Per task: mask density, stored bits per masked parameter vs the masks' Shannon entropy (and the
bound 1.05 * H + 0.01), task file size split into masks, dense tensors (head + per-task BN) and
header. Then the bundle total against backbone + sum over tasks of (1-bit masks + dense tensors).

    python3 tools/measure_bundle.py runs/gtsrb runs/mnist runs/glyphs --out /tmp/measure.bundle
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from pbexport.bundle import BACKBONE_FILE, load_bundle, pack_runs  # noqa: E402
from pbexport.report import format_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to (re)create")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    backbone_writes = []
    for run in args.runs:
        pack_runs([run], args.out)
        stat = (args.out / BACKBONE_FILE).stat()
        backbone_writes.append((stat.st_ino, stat.st_mtime_ns))
    bundle = load_bundle(args.out)
    info = bundle.info()
    masked = info["backbone"]["masked_params"]
    rows, budget = [], info["backbone"]["size"]
    for name, t in info["tasks"].items():
        header = t["size"] - t["mask_bytes"] - t["param_bytes"]
        budget += math.ceil(masked / 8) + t["param_bytes"]
        bound = None if t["entropy_bits_per_param"] is None else 1.05 * t["entropy_bits_per_param"] + 0.01
        rows.append([name, t["method"], t["density"], t["stored_bits_per_param"], t["entropy_bits_per_param"], bound,
                     t["size"], t["mask_bytes"], t["param_bytes"], header, t["metrics"].get("test_accuracy")])
    print(format_table(["task", "method", "density", "stored bits/param", "entropy bits/param", "1.05H+0.01",
                        "file bytes", "masks", "head+BN", "header", "test acc"], rows))
    print(f"\nbackbone {info['backbone']['name']}: {info['backbone']['size']:,} bytes, {masked:,} masked params "
          f"(1 bit each = {math.ceil(masked / 8):,} bytes); written once: {len(set(backbone_writes)) == 1}")
    print(f"manifest {info['manifest_size']:,} bytes; bundle total {info['total_size']:,} bytes; "
          f"budget backbone + sum(1-bit masks + head/BN) = {budget:,} bytes -> "
          f"{'OK' if info['total_size'] <= budget else 'OVER'} ({budget - info['total_size']:,} bytes to spare)")


if __name__ == "__main__":
    main()
