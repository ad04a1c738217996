"""How strong are the mask scores' gradients when training starts? The scale `--mask-eps` is compared with.

Adam moves a score by about lr * g / (rms(g) + eps) a step: eps slows the scores whose gradient rms is
below it and leaves the others at full speed, so which eps does what depends on the backbone's gradient
scale. For each backbone and dataset this takes the default recipe's fresh task model (all scores at their
initial value, per-task BN in training mode), accumulates the score gradients of the first --batches training
batches (batch 64, crop augmentation, seeded) and prints the quantiles of their per-score rms, and the share
of scores above each eps asked (no optimizer step is taken; seconds on 2 cores):

    python tools/score_gradients.py                      # cifar_resnet20 and cifar_resnet56, GTSRB and MNIST
    python tools/score_gradients.py --eps 1e-5 3e-6
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F

from bench_accuracy import DATASETS, WEIGHTS, dataset_key
from pbexport import masking
from pbexport.backbones import load_backbone
from pbexport.data import batches, load_data
from pbexport.errors import PbexportError
from pbexport.fileio import atomic_write_json
from pbexport.report import format_table
from pbexport.taskmodel import build_task_model

QUANTILES = (0.25, 0.5, 0.75, 0.9)


def score_gradient_rms(backbone: str, data: str, batches_seen: int, seed: int = 0) -> np.ndarray:
    """Per-score rms of the loss gradient over the first ``batches_seen`` batches, as one flat array."""
    bb = load_backbone(backbone, WEIGHTS.get(backbone))
    task = load_data(str(DATASETS.get(data, data)), bb.spec.size)
    model = build_task_model(bb, task.num_classes, "piggyback", True, seed).train()
    scores = masking.mask_scores(model.net)
    squares = {name: torch.zeros_like(s) for name, s in scores.items()}
    generator = torch.Generator().manual_seed(seed)
    seen = 0
    for x, y in batches(task.train, 64, bb.spec.size, shuffle=True, augmentation="crop", generator=generator):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for name, s in scores.items():
            squares[name] += s.grad ** 2
        seen += 1
        if seen == batches_seen:
            break
    return torch.cat([(sq / seen).sqrt().flatten() for sq in squares.values()]).numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["cifar_resnet20", "cifar_resnet56"])
    parser.add_argument("--datasets", nargs="+", default=["gtsrb", "mnist"])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--eps", nargs="+", type=float, default=[1e-5, 3e-6])
    parser.add_argument("--out", default="bench-out/score-gradients.json")
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.error(f"--batches must be at least 1, got {args.batches}")
    rows, results = [], []
    for backbone in args.backbones:
        for data in args.datasets:
            rms = score_gradient_rms(backbone, data, args.batches)
            quantiles = [float(q) for q in np.quantile(rms, QUANTILES)]
            above = [float((rms > eps).mean()) for eps in args.eps]
            results.append({"backbone": backbone, "dataset": dataset_key(data), "quantiles": quantiles,
                            "share_above": dict(zip(map(str, args.eps), above, strict=True))})
            rows.append([backbone, dataset_key(data), *(f"{q:.2e}" for q in quantiles), *above])
    print(format_table(["backbone", "dataset", *(f"rms q{int(100 * q)}" for q in QUANTILES),
                        *(f"share > {eps:g}" for eps in args.eps)], rows, floatfmt=".3f"))
    atomic_write_json(args.out, {"batches": args.batches, "batch_size": 64, "quantiles": list(QUANTILES),
                                 "eps": args.eps, "results": results})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PbexportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
