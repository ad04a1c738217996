"""Training throughput of piggyback vs the baselines, measured side by side.

For each backbone, every method's training step (forward, backward, Adam) is timed in interleaved
rounds so machine noise hits all methods alike; the table reports median images/s and the step-time
ratio to fine-tuning. Goal (issue 2): a piggyback step costs at most 1.3x a fine-tune step.

    python tools/bench_train.py                       # cifar_resnet20 @32 and resnet18 @112
    python tools/bench_train.py --backbones resnet18 --input-size 224 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pbexport.backbones import load_backbone
from pbexport.report import format_table
from pbexport.taskmodel import build_task_model
from pbexport.training import AUTO, TrainConfig, make_optimizer

VARIANTS = [("classifier", False), ("piggyback", False), ("piggyback", True), ("finetune", False)]
DEFAULT_SIZES = {"cifar_resnet20": 32, "resnet18": 112}


def _step_fn(backbone, method: str, train_bn: bool, batch_size: int, num_classes: int = 10):
    model = build_task_model(backbone, num_classes, method, train_bn).train()
    cfg = TrainConfig(backbone=backbone.name, data="-", task="bench", method=method, train_bn=train_bn)
    if cfg.lr_bn == AUTO:  # the default trains each BN-lr candidate in turn; a step costs the same at either
        cfg = cfg.bn_candidates()[0]
    optimizer = make_optimizer(model, cfg)
    x = torch.rand(batch_size, 3, backbone.spec.size, backbone.spec.size)
    y = torch.randint(0, num_classes, (batch_size,))

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def bench(name: str, size: int, batch_size: int, rounds: int, steps: int) -> list[dict]:
    backbone = load_backbone(name, input_size=size)
    fns = {v: _step_fn(backbone, *v, batch_size) for v in VARIANTS}
    times: dict = {v: [] for v in VARIANTS}
    for fn in fns.values():  # warm-up (allocator, oneDNN primitive cache)
        fn(), fn()
    for _ in range(rounds):
        for v, fn in fns.items():
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            times[v].append((time.perf_counter() - start) / steps)
    ft = statistics.median(times[("finetune", False)])
    rows = []
    for (method, train_bn), ts in times.items():
        med = statistics.median(ts)
        rows.append({"backbone": name, "input_size": size, "batch_size": batch_size, "method": method,
                     "train_bn": train_bn, "step_ms": 1000 * med, "images_per_second": batch_size / med,
                     "step_ratio_to_finetune": med / ft})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--input-size", type=int, default=None, help="Default: 32 for CIFAR ResNets, 112 otherwise.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="Steps per timed round.")
    parser.add_argument("--out", type=Path, default=Path("bench-out/train.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.backbones:
        size = args.input_size or DEFAULT_SIZES.get(name, 112)
        rows += bench(name, size, args.batch_size, args.rounds, args.steps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.rounds} rounds "
          f"x {args.steps} steps")
    print(format_table(["backbone", "size", "batch", "method", "per-task BN", "step ms", "images/s",
                        "step / finetune"],
                       [[r["backbone"], r["input_size"], r["batch_size"], r["method"], r["train_bn"], r["step_ms"],
                         r["images_per_second"], r["step_ratio_to_finetune"]] for r in rows], floatfmt=".2f"))
    for r in rows:
        if r["method"] == "piggyback":
            ok = "met" if r["step_ratio_to_finetune"] <= 1.3 else "MISSED"
            print(f"goal piggyback step <= 1.3x finetune ({r['backbone']}, per-task BN {r['train_bn']}): "
                  f"{r['step_ratio_to_finetune']:.2f}x {ok}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                    "rounds": args.rounds, "steps": args.steps}, indent=2) + "\n")


if __name__ == "__main__":
    main()
