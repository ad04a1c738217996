"""int8 quantization of baked piggyback tasks on real data: size, accuracy and latency, float vs int8.

For each dataset: train a piggyback task with pbexport's default recipe (TrainConfig's defaults)
on a short budget, pack the tasks into one bundle, export each task baked, quantize it with
`pbexport.quantize.quantize_model` (static int8 QDQ, per-channel weights, MinMax calibration on the
train split) and compare float and int8 on the whole test split (up to --eval-samples images): bytes,
size ratio, top-1 accuracy, accuracy drop, top-1 agreement. Latency: both graphs run in interleaved
rounds (each --inner times back to back per round, its median counted), so machine noise hits both
alike; reported as median ms and the median over rounds of int8 time / float time.

Goals (issue 6): int8 >= 3x smaller, top-1 drop <= 1 point on every dataset; latency quoted.

    python tools/bench_int8.py                                   # cifar_resnet56, GTSRB + MNIST, 2 epochs x 5000 images
    python tools/bench_int8.py --epochs 10 --max-train-samples 0 # the full training budget
    python tools/bench_int8.py --backbone cifar_resnet20 --datasets gtsrb --clock wall --threads 2

Runs are kept under --workdir/runs (named by backbone, dataset, budget and seed) and reused when
complete, continued when interrupted; bundle, exports and int8 models are rebuilt every time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from pbexport import load_bundle, pack_runs  # noqa: E402
from pbexport.export import main_export  # noqa: E402
from pbexport.quantize import quantize_model  # noqa: E402
from pbexport.report import format_table  # noqa: E402
from pbexport.training import TrainConfig, train_or_reuse  # noqa: E402

SHARED = Path(os.environ.get("PBEXPORT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
WEIGHTS = {"cifar_resnet20": "resnet_cifar10/resnet20-12fca82f.th",
           "cifar_resnet56": "resnet_cifar10/resnet56-4bfd9763.th"}
DATASETS = {"gtsrb": "gtsrb32.npz", "mnist": "mnist28.npz"}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
GOAL_SIZE_RATIO = 3.0  # int8 at least 3x smaller
GOAL_MAX_DROP = 1.0  # top-1 points


def dataset_path(name: str) -> Path:
    return SHARED / DATASETS[name] if name in DATASETS else Path(name)


def latency(float_path: Path, int8_path: Path, batch: int, size: int, rounds: int, inner: int, threads: int,
            clock) -> dict:
    import onnxruntime as ort

    def session(path: Path):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    sessions = {"float": session(float_path), "int8": session(int8_path)}
    x = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
    for s in sessions.values():  # warm-up
        for _ in range(3):
            s.run(None, {"image": x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            samples = []
            for _ in range(inner):
                t = clock()
                s.run(None, {"image": x})
                samples.append(clock() - t)
            times[k].append(float(np.median(samples)))
    f, q = np.array(times["float"]), np.array(times["int8"])
    return {"batch": batch, "float_ms": 1e3 * float(np.median(f)), "int8_ms": 1e3 * float(np.median(q)),
            "int8_over_float": float(np.median(q / f)), "rounds": rounds, "inner": inner}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="cifar_resnet56", choices=sorted(WEIGHTS))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS),
                   help="gtsrb, mnist (from shared/data) or paths to .npz files / ImageFolder dirs")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-train-samples", type=int, default=5000, help="0: the whole train split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-samples", type=int, default=256, help="train images for MinMax calibration")
    p.add_argument("--eval-samples", type=int, default=3000, help="test images compared (at most the test split)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for the latency figures")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                   help="cpu: process CPU time (with --threads 1, barely skewed by other work); wall: elapsed")
    p.add_argument("--rounds", type=int, default=30, help="interleaved latency rounds at batch 1 (batch 32: a third)")
    p.add_argument("--inner", type=int, default=5, help="runs per graph per round")
    p.add_argument("--workdir", type=Path, default=Path("bench-out/int8"))
    p.add_argument("--out", type=Path, default=Path("bench-out/int8.json"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    weights = SHARED / WEIGHTS[args.backbone]
    missing = [str(x) for x in [weights, *(dataset_path(d) for d in args.datasets)] if not x.exists()]
    if missing:
        print(f"error: real data not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    started = time.time()
    budget = f"e{args.epochs}-n{args.max_train_samples or 'all'}-s{args.seed}"
    runs, metrics, tasks = [], {}, []
    for d in args.datasets:
        task = d if d in DATASETS else Path(d).stem
        cfg = TrainConfig(backbone=args.backbone, weights=str(weights), data=str(dataset_path(d)), task=task,
                                   epochs=args.epochs, max_train_samples=args.max_train_samples or None,
                                   seed=args.seed)
        run_dir = args.workdir / "runs" / args.backbone / f"{task}-{budget}"
        print(f"[{time.time() - started:5.0f}s] training {args.backbone} on {task} ({budget}) -> {run_dir}", flush=True)
        metrics[task] = train_or_reuse(cfg, run_dir, progress=not args.quiet)
        runs.append(run_dir)
        tasks.append((task, d))

    bundle = args.workdir / f"bundle-{args.backbone}"
    shutil.rmtree(bundle, ignore_errors=True)
    pack_runs(runs, bundle)
    info = load_bundle(bundle).info()
    baked = args.workdir / f"baked-{args.backbone}"
    shutil.rmtree(baked, ignore_errors=True)
    print(f"[{time.time() - started:5.0f}s] exporting baked -> {baked}", flush=True)
    main_export(bundle, baked, mode="baked", verify=False)

    rows = []
    for task, d in tasks:
        float_path = baked / f"{task}.onnx"
        int8_path = args.workdir / f"int8-{args.backbone}" / f"{task}.int8.onnx"
        print(f"[{time.time() - started:5.0f}s] quantizing {float_path} -> {int8_path}", flush=True)
        rep = quantize_model(float_path, int8_path, str(dataset_path(d)), per_channel=True,
                             calib_samples=args.calib_samples, eval_samples=args.eval_samples, force=True,
                             seed=args.seed)
        size = info["backbone"]["input_spec"]["size"]
        lat = {b: latency(float_path, int8_path, b, size, r, args.inner, args.threads, CLOCKS[args.clock])
               for b, r in ((1, args.rounds), (32, max(3, args.rounds // 3)))}
        drop = 100 * (rep.float_accuracy - rep.int8_accuracy)
        rows.append({"task": task, "data": str(dataset_path(d)), "run": str(runs[len(rows)]),
                     "pytorch_test_accuracy": metrics[task]["test_accuracy"],
                     "mask_density": metrics[task]["mask_density"],
                     "float_bytes": rep.float_bytes, "int8_bytes": rep.int8_bytes, "size_ratio": rep.size_ratio,
                     "samples": rep.samples, "float_accuracy": rep.float_accuracy, "int8_accuracy": rep.int8_accuracy,
                     "accuracy_drop_points": drop, "top1_agreement": rep.top1_agreement, "latency": lat,
                     "quantize_report": rep.to_dict(),
                     "size_met": rep.size_ratio >= GOAL_SIZE_RATIO, "drop_met": drop <= GOAL_MAX_DROP})

    print(f"\n{args.backbone}, {budget}, static int8 QDQ per-channel; latency: onnxruntime {args.threads} thread(s), "
          f"{args.clock} clock, medians of interleaved rounds")
    print(format_table(
        ["task", "float B", "int8 B", "smaller", "test imgs", "float top-1 %", "int8 top-1 %", "drop pts",
         "agree %", "b1 float ms", "b1 int8 ms", "b1 int8/float", "b32 float ms", "b32 int8 ms", "b32 int8/float"],
        [[r["task"], r["float_bytes"], r["int8_bytes"], r["size_ratio"], r["samples"], 100 * r["float_accuracy"],
          100 * r["int8_accuracy"], r["accuracy_drop_points"], 100 * r["top1_agreement"], r["latency"][1]["float_ms"],
          r["latency"][1]["int8_ms"], r["latency"][1]["int8_over_float"], r["latency"][32]["float_ms"],
          r["latency"][32]["int8_ms"], r["latency"][32]["int8_over_float"]] for r in rows], floatfmt=".2f"))
    for r in rows:
        print(f"goal {r['task']}: >= {GOAL_SIZE_RATIO:g}x smaller: {r['size_ratio']:.2f}x "
              f"{'met' if r['size_met'] else 'MISSED'}; top-1 drop <= {GOAL_MAX_DROP:g} point: "
              f"{r['accuracy_drop_points']:+.2f} {'met' if r['drop_met'] else 'MISSED'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "backbone": args.backbone, "epochs": args.epochs, "max_train_samples": args.max_train_samples or None,
        "seed": args.seed, "calib_samples": args.calib_samples, "eval_samples": args.eval_samples,
        "lr_mask": cfg.lr_mask, "lr_head": cfg.lr_head, "lr_bn": cfg.lr_bn, "augment": cfg.augment,  # as trained
        "per_channel": True,
        "threads": args.threads, "clock": args.clock, "rounds": args.rounds, "inner": args.inner,
        "bundle": str(bundle), "loadavg": os.getloadavg(), "seconds": time.time() - started, "rows": rows,
    }, indent=2) + "\n")
    print(f"results -> {args.out} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
