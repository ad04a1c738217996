"""Acceptance run of the ONNX export on real data: every mode verified on 256 real test images per task.

For each backbone (cifar_resnet20 with the pretrained CIFAR-10 weights from ../shared/data, resnet18
with random weights at 32x32): train three tasks with the default recipe on a subset (GTSRB with
per-task BN, MNIST with the backbone's BN, GTSRB classifier-only), pack them, export baked, shared
and multitask, and verify each task on 256 test images of its own dataset (|diff| <= atol + rtol x max |logit|,
100% top-1 agreement, onnx.checker on every file). Prints one table per backbone and mode.

    python tools/accept_export.py                     # needs ../shared/data (or PBEXPORT_SHARED_DATA)
    python tools/accept_export.py --train-samples 500 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from pbexport.bundle import bundle_info, load_bundle, pack_runs  # noqa: E402
from pbexport.export import main_export, verify_export  # noqa: E402
from pbexport.report import format_table  # noqa: E402
from pbexport.training import TrainConfig, train  # noqa: E402

SHARED = Path(os.environ.get("PBEXPORT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TASKS = [("gtsrb", "gtsrb32.npz", "piggyback", True), ("mnist", "mnist28.npz", "piggyback", False),
         ("gtsrb-head", "gtsrb32.npz", "classifier", False)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(SHARED))
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--out", default="bench-out/accept_export.json")
    args = p.parse_args(argv)
    data_dir = Path(args.data_dir)
    weights = data_dir / "resnet_cifar10" / "resnet20-12fca82f.th"
    if not weights.exists():
        print(f"real data not found in {data_dir}", file=sys.stderr)
        return 2
    results, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for arch, w in (("cifar_resnet20", weights), ("resnet18", None)):
            root = Path(tmp) / arch
            t0 = time.time()
            runs = []
            for task, data, method, bn in TASKS:
                cfg = TrainConfig(backbone=arch, data=str(data_dir / data), task=task, weights=str(w) if w else None,
                                  method=method, train_bn=bn, epochs=args.epochs, max_train_samples=args.train_samples,
                                  input_size=32)
                metrics = train(cfg, root / "runs" / task, progress=False)
                runs.append(root / "runs" / task)
                print(f"{arch} {task}: test accuracy {metrics['test_accuracy']:.3f}, mask density "
                      f"{metrics['mask_density']}", flush=True)
            pack_runs(runs, root / "bundle")
            info = bundle_info(load_bundle(root / "bundle"))
            rows = []
            for mode in ("baked", "shared", "multitask"):
                out = root / mode
                main_export(root / "bundle", out, mode=mode, verify=False)
                for task, data, _, _ in TASKS:
                    report = verify_export(root / "bundle", out, tasks=[task], data=str(data_dir / data),
                                           samples=args.samples, atol=args.atol,
                                           rtol=args.rtol)
                    rows += [[arch, c.task, c.mode, data, info["tasks"][task]["density"], c.samples,
                              f"{c.max_diff:.2e}" if c.max_diff is not None else None,
                              f"{100 * c.top1:.1f}%" if c.top1 is not None else None, "ok" if c.ok else "FAIL"]
                             for c in report.checks]
                    good = report.ok and all(c.samples == args.samples and c.top1 == 1.0 for c in report.checks)
                    ok &= good
                    results.append({"backbone": arch, "mode": mode, "task": task, "data": data,
                                    "density": info["tasks"][task]["density"], **report.to_dict()})
            print(format_table(["backbone", "task", "mode", "data", "mask density", "samples", "max |diff|",
                                "top-1 agree", "result"], rows, floatfmt=".3f"))
            print(f"{arch}: {time.time() - t0:.0f} s\n", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'ALL PASSED' if ok else 'FAILURES'}: {len(results)} (backbone, mode, task) checks -> {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
