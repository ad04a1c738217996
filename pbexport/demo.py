"""`pbexport demo`: the whole story on built-in synthetic data, a few minutes on 2 CPU cores.

1. pretrain a small backbone (cifar_resnet20) from scratch on the synthetic base task;
2. freeze it and, for every new synthetic task, learn a Piggyback mask + head, next to the
   classifier-only baseline on the same budget;
3. check the base task is untouched and print one table.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

from .errors import PbexportError
from .report import format_table

BACKBONE = "cifar_resnet20"
MARKER = ".pbexport-demo"


def _prepare(out: Path) -> None:
    """Create ``out``, replacing an earlier demo directory but never anything else."""
    if out.exists():
        if not (out / MARKER).exists():
            raise PbexportError("exists and is not a pbexport demo directory; choose another --out", str(out))
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("created by `pbexport demo`; replaced by the next demo run\n")


def run_demo(out: str | Path, epochs: int = 3, base_epochs: int = 4, methods=("classifier", "piggyback"),
             progress: bool = True) -> list[dict]:
    from .data import load_data
    from .runs import load_run
    from .synthetic import BASE_TASK, new_task_names
    from .train import TrainConfig, evaluate, train

    out = Path(out)
    _prepare(out)
    rows = []

    def step(msg: str) -> None:
        if progress:
            click.echo(msg, err=True)

    started = time.perf_counter()
    step(f"[1] pretraining {BACKBONE} on synthetic:{BASE_TASK} ({base_epochs} epochs)")
    base_dir = out / "runs" / BASE_TASK
    base_metrics = train(TrainConfig(backbone=BACKBONE, data=f"synthetic:{BASE_TASK}", task=BASE_TASK,
                                     method="finetune", epochs=base_epochs), base_dir, progress=progress)
    rows.append({"task": BASE_TASK, "method": "pretrain", "test_accuracy": base_metrics["test_accuracy"],
                 "mask_density": None})
    base_model = load_run(base_dir)
    base_data = load_data(f"synthetic:{BASE_TASK}")

    for task in new_task_names():
        for method in methods:
            step(f"[2] {task}: {method} ({epochs} epochs)")
            metrics = train(TrainConfig(backbone=BACKBONE, weights=str(base_dir), data=f"synthetic:{task}",
                                        task=task, method=method, epochs=epochs),
                            out / "runs" / f"{task}-{method}", progress=progress)
            rows.append({"task": task, "method": method, "test_accuracy": metrics["test_accuracy"],
                         "mask_density": metrics["mask_density"]})

    # Piggyback never touches the backbone: the base task scores exactly as before.
    after = evaluate(load_run(base_dir).model, base_data.test)
    if after != evaluate(base_model.model, base_data.test):
        raise PbexportError("base task accuracy changed after adding tasks (this is a bug)")
    click.echo(format_table(["task", "method", "test accuracy", "mask density"],
                            [[r["task"], r["method"], r["test_accuracy"], r["mask_density"]] for r in rows]))
    click.echo(f"base task after adding {len(new_task_names())} tasks: {after:.4f} (unchanged); "
               f"total {time.perf_counter() - started:.0f} s; runs in {out / 'runs'}")
    return rows
