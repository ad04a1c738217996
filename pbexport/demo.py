"""`pbexport demo`: the whole chain on built-in synthetic data, a few minutes on 2 CPU cores.

1. pretrain a small backbone (cifar_resnet20) from scratch on the synthetic base task;
2. freeze it and, for every new synthetic task, learn a Piggyback mask + head (the default recipe),
   next to the classifier-only baseline on the same budget;
3. pack the masks into one bundle (the backbone stored once);
4. export every task in the three ONNX modes (each file verified against PyTorch);
5. run them with the torch-free runtime and print one table.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import click
import numpy as np

from .errors import PbexportError
from .report import format_table

BACKBONE = "cifar_resnet20"
MARKER = ".pbexport-demo"
EXPORTS = {"baked": "onnx-baked", "shared": "onnx-shared", "multitask": "onnx-multitask"}


def _prepare(out: Path) -> None:
    """Create ``out``, replacing an earlier demo directory but never anything else."""
    if out.exists():
        if not (out / MARKER).exists():
            raise PbexportError("exists and is not a pbexport demo directory; choose another --out", str(out))
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("created by `pbexport demo`; replaced by the next demo run\n")


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _latency_ms(engine, task: str, x: np.ndarray, repeats: int = 30) -> float:
    engine.logits(x, task=task)  # creates the session / loads the task
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.logits(x, task=task)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def run_demo(out: str | Path, epochs: int = 3, base_epochs: int = 4, progress: bool = True) -> dict:
    from .bundle import load_bundle, pack_runs
    from .data import load_data, to_model_input
    from .export import main_export
    from .runtime import open_model
    from .synthetic import BASE_TASK, new_task_names
    from .training import TrainConfig, train

    out = Path(out)
    _prepare(out)
    started = time.perf_counter()

    def step(msg: str) -> None:
        if progress:
            click.echo(f"[{time.perf_counter() - started:5.0f}s] {msg}", err=True)

    step(f"pretraining {BACKBONE} on synthetic:{BASE_TASK} ({base_epochs} epochs, from scratch)")
    base_dir = out / "runs" / BASE_TASK
    base = train(TrainConfig(backbone=BACKBONE, data=f"synthetic:{BASE_TASK}", task=BASE_TASK, method="finetune",
                             epochs=base_epochs), base_dir, progress=progress)

    tasks = new_task_names()
    accuracy: dict[str, dict[str, float]] = {t: {} for t in tasks}
    for task in tasks:
        for method in ("classifier", "piggyback"):
            twice = ", twice: the per-task BN lr is chosen on validation" if method == "piggyback" else ""
            step(f"{task}: {method} ({epochs} epochs on the frozen backbone{twice})")
            metrics = train(TrainConfig(backbone=BACKBONE, weights=str(base_dir), data=f"synthetic:{task}",
                                        task=task, method=method, epochs=epochs),
                            out / "runs" / f"{task}-{method}", progress=progress)
            accuracy[task][method] = metrics["test_accuracy"]

    step("packing the masks into one bundle")
    bundle_dir = out / "bundle"
    pack_runs([out / "runs" / f"{t}-piggyback" for t in tasks], bundle_dir)
    info = load_bundle(bundle_dir).info()

    disk = {"bundle": info["total_size"]}
    for mode, name in EXPORTS.items():
        step(f"exporting every task, {mode} mode (verified against PyTorch)")
        result = main_export(bundle_dir, out / name, mode=mode)
        if not result.ok:
            raise PbexportError(f"{mode} export failed verification (this is a bug)", str(out / name))
        disk[mode] = _disk_bytes(out / name)

    step("running every task with onnxruntime (pbexport.runtime, no torch)")
    latency: dict[str, dict[str, float]] = {t: {} for t in tasks}
    for mode, name in EXPORTS.items():
        engine = open_model(out / name, threads=2, cache_size=len(tasks))
        for task in tasks:
            test = load_data(f"synthetic:{task}").test
            x = to_model_input(test.images, engine.input_spec(task).size).numpy()
            pred = engine.logits(x, task=task).argmax(1)
            accuracy[task][mode] = float((pred == test.labels).mean())
            latency[task][mode] = _latency_ms(engine, task, x[:1])
        engine.close()

    rows = []
    for task in tasks:
        t = info["tasks"][task]
        rows.append([task, accuracy[task]["classifier"], accuracy[task]["piggyback"],
                     *(accuracy[task][m] for m in EXPORTS), t["stored_bits_per_param"], t["size"],
                     *(latency[task][m] for m in EXPORTS)])
    click.echo(f"\nbackbone {BACKBONE} pretrained on synthetic:{BASE_TASK}: test accuracy {base['test_accuracy']:.4f}; "
               f"new tasks trained {epochs} epochs each\n")
    click.echo(format_table(
        ["task", "classifier-only", "piggyback (torch)", "baked (ort)", "shared (ort)", "multitask (ort)",
         "bits/param", "task bytes", "ms baked", "ms shared", "ms multitask"], rows))
    click.echo("\n" + format_table(
        ["artifact", "disk bytes"],
        [["bundle (backbone once + packed masks)", disk["bundle"]],
         *([f"onnx {m} ({len(tasks)} tasks)", disk[m]] for m in EXPORTS)]))
    click.echo(f"\naccuracy: test split; latency: batch 1, median, onnxruntime 2 threads; "
               f"total {time.perf_counter() - started:.0f} s; everything is in {out}")
    return {"accuracy": accuracy, "latency": latency, "disk": disk, "base_accuracy": base["test_accuracy"]}
