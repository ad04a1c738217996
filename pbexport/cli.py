"""`pbexport` command line: parses options and calls the library. Torch is imported per command,
so commands for devices work on an install without it.

Every PbexportError becomes ``error: <message>`` on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from . import __version__
from .errors import PbexportError


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: click's usage errors become one line and exit 2, like ours."""
    try:
        code = cli.main(args=argv, prog_name="pbexport", standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted")
    except click.ClickException as exc:
        _fail(exc.format_message().replace("\n", " "))
    sys.exit(code or 0)


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PbexportError as exc:
            _fail(str(exc))
        except ModuleNotFoundError as exc:
            if exc.name in ("torch", "torchvision", "safetensors", "tqdm", "zstandard"):
                _fail(f"this command needs the training extra ({exc.name} is missing): "
                      'pip install "pbexport[train]"')
            raise
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pbexport")
def cli() -> None:
    """Many task models from one frozen backbone (Piggyback masks), shipped with ONNX Runtime.

    Typical use: `pbexport train ...` per task, then evaluate with `pbexport eval RUN_DIR`.
    """


@cli.command("backbones")
@handle_errors
def backbones_cmd() -> None:
    """List every backbone name `--backbone` accepts."""
    from .backbones import list_backbones

    for name in list_backbones():
        click.echo(name)


@cli.command("train")
@click.option("--backbone", required=True, help="cifar_resnet20/32/44/56 or a torchvision model name.")
@click.option("--weights", type=click.Path(), default=None,
              help="State dict (.pth/.pt/.th/.safetensors) or a finetune run directory. "
                   "Omitted: random init.")
@click.option("--data", required=True, help="ImageFolder dir (train/ + test/ or val/), a .npz, or synthetic:NAME.")
@click.option("--task", required=True, help="Name of the new task.")
@click.option("--out", "out", required=True, type=click.Path(), help="Run directory to create.")
@click.option("--method", type=click.Choice(["piggyback", "classifier", "finetune"]), default="piggyback",
              show_default=True, help="piggyback: masks + head; classifier: head only; finetune: all weights.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr-mask", type=float, default=1e-3, show_default=True, help="Adam lr of the mask scores.")
@click.option("--lr-head", type=float, default=1e-3, show_default=True, help="Adam lr of the head (and per-task BN).")
@click.option("--lr-backbone", type=float, default=1e-3, show_default=True, help="Adam lr of all weights (finetune).")
@click.option("--train-bn/--no-train-bn", default=None,
              help="Learn per-task BatchNorm (affine + statistics). Default: on for piggyback, off for classifier.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Share of train held out to pick the best epoch (never the test split).")
@click.option("--augment", type=click.Choice(["none", "crop", "crop+flip"]), default="crop", show_default=True)
@click.option("--input-size", type=int, default=None, help="Override the backbone's input size.")
@click.option("--max-train-samples", type=int, default=None, help="Use a seeded subset of train.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its last checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def train_cmd(out, resume, quiet, **options) -> None:
    """Learn a task on a frozen backbone (or a baseline) into run directory --out."""
    from .train import TrainConfig, train

    cfg = TrainConfig(**options)
    metrics = train(cfg, out, resume=resume, progress=not quiet)
    density = metrics["mask_density"]
    click.echo(f"{cfg.task} ({cfg.method}): test accuracy {metrics['test_accuracy']:.4f} "
               f"(best epoch {metrics['best_epoch']}"
               + (f", mask density {density:.3f}" if density is not None else "") + f") -> {out}")


@cli.command("eval")
@click.argument("run_dir", type=click.Path())
@click.option("--data", required=True, help="Dataset whose test split is evaluated.")
@click.option("--weights", type=click.Path(), default=None, help="Backbone weights, if they moved since training.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handle_errors
def eval_cmd(run_dir, data, weights, as_json) -> None:
    """Test accuracy of a trained run on --data."""
    from .data import load_data
    from .runs import load_run
    from .train import evaluate

    run = load_run(run_dir, weights)
    task_data = load_data(data, run.backbone.spec.size)
    if task_data.num_classes != len(run.class_names):
        raise PbexportError(f"dataset has {task_data.num_classes} classes, the run's task has "
                            f"{len(run.class_names)}", data)
    acc = evaluate(run.model, task_data.test)
    if as_json:
        click.echo(json.dumps({"task": run.task, "test_accuracy": acc, "images": len(task_data.test)}))
    else:
        click.echo(f"{run.task}: test accuracy {acc:.4f} on {len(task_data.test)} images")


@cli.command("demo")
@click.option("--out", "out", type=click.Path(), default="demo-out", show_default=True,
              help="Working directory (replaced).")
@click.option("--epochs", type=int, default=3, show_default=True, help="Epochs per new task.")
@handle_errors
def demo_cmd(out, epochs) -> None:
    """Whole chain on built-in synthetic data: pretrain a backbone, learn masks, compare baselines."""
    from .demo import run_demo

    run_demo(out, epochs=epochs)
