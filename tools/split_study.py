"""How new a validation split's images are to the model, against the test set's (no training, seconds).

The validation split picks each run's epoch and the default's per-task BN lr, standing in for test. It can
only do that if its images are as new to the model as test's. GTSRB's training images come in tracks of
near-identical frames of one sign, stored one after another: a random split holds out frames whose
neighbours it trains on. For each dataset, validation split (``--val-split``) and seed, this counts the
validation images, and the test images, with a near copy among the images the run trains on (same class,
cosine similarity of 16x16 thumbnails above --threshold):

    python tools/split_study.py                    # GTSRB and MNIST from ../shared/data
    python tools/split_study.py --datasets my.npz  # any dataset pbexport reads
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from bench_accuracy import DATASETS, dataset_key
from benchlib import SPLIT_HEADERS, split_rows
from pbexport.data import VAL_SPLITS, ImageSet, load_data, split_validation, to_model_input
from pbexport.errors import PbexportError
from pbexport.fileio import atomic_write_json
from pbexport.report import format_table

THUMBNAIL = 16  # small enough that frames of one track match despite a pixel or two of motion
CHUNK = 1024  # query images per similarity product: memory stays bounded on large classes


def thumbnails(images: np.ndarray) -> np.ndarray:
    """Unit-norm, mean-centred 16x16 RGB thumbnails: cosine similarity is then a dot product that ignores
    overall brightness."""
    x = to_model_input(torch.as_tensor(images), THUMBNAIL).flatten(1).numpy()
    x = x - x.mean(axis=1, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)


def nearest_similarity(query: np.ndarray, query_labels: np.ndarray, reference: np.ndarray,
                       reference_labels: np.ndarray) -> np.ndarray:
    """Each query thumbnail's highest similarity to a reference thumbnail of its own class (-1 if none)."""
    best = np.full(len(query), -1.0, dtype=np.float32)
    for c in np.unique(query_labels):
        ref = reference[reference_labels == c]
        if len(ref) == 0:
            continue
        members = np.flatnonzero(query_labels == c)
        for start in range(0, len(members), CHUNK):
            idx = members[start:start + CHUNK]
            best[idx] = (query[idx] @ ref.T).max(axis=1)
    return best


def study(train: ImageSet, test: ImageSet, fraction: float, seeds: int, threshold: float) -> dict:
    """Per split and seed, the share of validation images and of test images with a near copy among the
    images the run trains on."""
    thumbs, test_thumbs = thumbnails(train.images), thumbnails(test.images)
    # split image indices exactly as training does: the split depends on labels, order and seed only
    index = ImageSet(np.arange(len(train)), train.labels)
    shares = {}
    for how in VAL_SPLITS:
        shares[how] = {"validation": [], "test": []}
        for seed in range(seeds):
            keep, val = split_validation(index, fraction, seed, how)
            for name, query, labels in (("validation", thumbs[val.images], val.labels),
                                        ("test", test_thumbs, test.labels)):
                sim = nearest_similarity(query, labels, thumbs[keep.images], keep.labels)
                shares[how][name].append(float(np.mean(sim > threshold)))
    return shares


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), metavar="DATA",
                    help=f"{' '.join(DATASETS)} (../shared/data) or any dataset path")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of each split")
    ap.add_argument("--threshold", type=float, default=0.95, help="cosine similarity of a near copy")
    ap.add_argument("--out", type=Path, default=Path("bench-out/splits.json"))
    args = ap.parse_args(argv)
    result = {"val_fraction": args.val_fraction, "seeds": args.seeds, "threshold": args.threshold,
              "thumbnail": THUMBNAIL, "datasets": {}}
    for spec in args.datasets:
        try:
            data = load_data(str(DATASETS.get(spec, spec)), THUMBNAIL)
            r = study(data.train, data.test, args.val_fraction, args.seeds, args.threshold)
        except PbexportError as e:
            print(e, file=sys.stderr)
            return 2
        result["datasets"][dataset_key(spec)] = r
    print(format_table(SPLIT_HEADERS, split_rows(result["datasets"]), ".1f"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
