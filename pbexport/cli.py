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


class LrOrAuto(click.ParamType):
    """A learning rate, or ``auto`` (chosen on the validation split)."""

    name = "LR|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, float) or value == "auto":
            return value
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'auto'", param, ctx)


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
            if exc.name in ("torch", "torchvision", "safetensors", "tqdm", "zstandard", "onnx", "onnxscript",
                            "matplotlib"):
                _fail(f"this command needs the training extra ({exc.name} is missing): "
                      'pip install "pbexport[train]"')
            if exc.name in ("onnxruntime", "PIL", "numpy"):  # base dependencies (the runtime's)
                _fail(f"{exc.name} is missing: pip install pbexport (or onnxruntime-gpu for CUDA)")
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
@click.option("--lr-mask", type=float, default=3e-4, show_default=True, help="Adam lr of the mask scores.")
@click.option("--lr-head", type=float, default=None,
              help="Adam lr of the new head. Default: 1e-2 for piggyback, 1e-3 for classifier and finetune.")
@click.option("--lr-bn", type=LrOrAuto(), default=None,
              help="Adam lr of the per-task BN (piggyback, classifier --train-bn), or auto: train the task at "
                   "BN lr 1e-2 and 3e-3 (same seed; twice the training) and keep the run that scores best on "
                   "the validation split. Default: auto for piggyback, the head lr otherwise.")
@click.option("--lr-backbone", type=float, default=1e-3, show_default=True, help="Adam lr of all weights (finetune).")
@click.option("--mask-decay", type=float, default=0.0, show_default=True,
              help="Pull switched-off mask scores back toward keep: fewer flips, fewer stored bits.")
@click.option("--mask-eps", type=float, default=1e-8, show_default=True,
              help="Adam's epsilon for the mask scores. Larger (1e-5): scores whose gradients are weaker than "
                   "it move slower, so fewer weights are switched off and the mask stores in fewer bits.")
@click.option("--train-bn/--no-train-bn", default=None,
              help="Learn per-task BatchNorm (affine + statistics). Default: on for piggyback, off for classifier.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Share of train held out to pick the best epoch (never the test split).")
@click.option("--val-split", type=click.Choice(["random", "contiguous"]), default="random", show_default=True,
              help="Which images of each class validation holds out: random ones, or one run of consecutive "
                   "images in file order (near-duplicates stored together, such as video frames or GTSRB's "
                   "tracks, then stay on one side of the split).")
@click.option("--average-epochs", type=int, default=None, metavar="N",
              help="Keep the mean of the last N epochs' task states (mask scores, head, BN; every weight for "
                   "finetune) instead of the epoch that scores best on validation.")
@click.option("--warmup-epochs", type=int, default=0, show_default=True, metavar="N",
              help="Train only the new head (and per-task BN) for the first N epochs; the mask scores "
                   "(piggyback) or backbone weights (finetune) start after, on a cosine over the epochs left.")
@click.option("--augment", type=click.Choice(["none", "crop", "crop+flip"]), default="crop", show_default=True,
              help="Training-time augmentation. crop: random shifts by up to 1/8 of the size; crop+flip: also "
                   "horizontal flips.")
@click.option("--input-size", type=int, default=None, help="Override the backbone's input size.")
@click.option("--max-train-samples", type=int, default=None, help="Use a seeded subset of train.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its last checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def train_cmd(out, resume, quiet, **options) -> None:
    """Learn a task on a frozen backbone (or a baseline) into run directory --out."""
    from .training import TrainConfig, train

    cfg = TrainConfig(**options)
    metrics = train(cfg, out, resume=resume, progress=not quiet)
    for t in metrics.get("lr_bn_candidates", []):
        chosen = " <- kept" if t["lr_bn"] == metrics["lr_bn"] else ""
        click.echo(f"  BN lr {t['lr_bn']:g}: validation accuracy {t['val_accuracy']:.4f}, "
                   f"loss {t['val_loss']:.4f}{chosen}")
    density, averaged = metrics["mask_density"], metrics.get("averaged_epochs")
    kept = f"mean of epochs {averaged[0]}-{averaged[-1]}" if averaged else f"best epoch {metrics['best_epoch']}"
    click.echo(f"{cfg.task} ({cfg.method}): test accuracy {metrics['test_accuracy']:.4f} ({kept}"
               + (f", mask density {density:.3f}" if density is not None else "") + f") -> {out}")


@cli.command("eval")
@click.argument("run_dir", type=click.Path())
@click.option("--data", required=True, help="Dataset whose test split is evaluated.")
@click.option("--weights", type=click.Path(), default=None, help="Backbone weights, if they moved since training.")
@click.option("--task", default=None, help="The task to evaluate when RUN_DIR is a bundle.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handle_errors
def eval_cmd(run_dir, data, weights, task, as_json) -> None:
    """Test accuracy of a trained run (or of a bundle's --task) on --data."""
    from .data import load_data
    from .training import evaluate

    run = _eval_target(run_dir, task, weights)
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
              help="Working directory (an earlier demo directory there is replaced).")
@click.option("--epochs", type=int, default=3, show_default=True, help="Epochs per new task.")
@handle_errors
def demo_cmd(out, epochs) -> None:
    """Whole chain on built-in synthetic data, no download: pretrain a backbone, learn masks next to the
    classifier-only baseline, pack, export in all three ONNX modes, and run them with onnxruntime."""
    from .demo import run_demo

    run_demo(out, epochs=epochs)


# --------------------------------------------------------------------------- on the device (predict)
@cli.command("predict")
@click.argument("model", type=click.Path())
@click.argument("images", metavar="IMAGE_OR_DIR...", nargs=-1, required=True, type=click.Path())
@click.option("--task", default=None, help="Task to run (may be left out when MODEL holds one task).")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="Best classes to show.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image (JSON lines) instead of a table.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="onnxruntime execution provider (auto: CUDA when installed, else CPU).")
@click.option("--feed", type=click.Choice(["adapter", "inputs", "weights"]), default="adapter", show_default=True,
              help="Multitask: how the task's tensors reach the graph; weights: unpack them once, then run the "
                   "graph after the weights (fastest for many images of one task).")
@handle_errors
def predict_cmd(model, images, task, top_k, as_json, provider, feed) -> None:
    """Classify images with an exported MODEL (needs onnxruntime, numpy and Pillow only; no torch).

    MODEL: a task's .onnx (or its int8 .onnx or .ort), a directory of task graphs (baked or shared),
    or a multitask directory, as written by `pbexport onnx`. IMAGE_OR_DIR: image files (anything
    Pillow reads; gray becomes RGB) or .npy arrays (NCHW or CHW, float in [0, 1] or uint8, at the
    input size); a directory stands for its image and .npy files (sorted, not recursive).
    Preprocessing comes from MODEL's metadata.

    Exit code 0 when every input was predicted. An input that cannot be read is reported on stderr as
    `error: FILE: problem`, the others are still predicted, and the exit code is 2; any other error
    (MODEL, task) stops at once with one such line and exit code 2.
    """
    from pathlib import Path

    from .report import format_table
    from .runtime import list_inputs, open_model

    engine = open_model(model, providers=provider, feed=feed)
    task = engine.resolve_task(task)
    files, failed = [], 0
    for item in images:
        p = Path(item)
        if p.is_dir():
            found = list_inputs(p)
            if not found:
                click.echo(f"error: {p}: no image or .npy files in this directory", err=True)
                failed += 1
            files += found
        else:
            files.append(p)
    rows = []
    for i in range(0, len(files), engine.batch_size):  # bounded memory for large directories
        for r in engine.predict(files[i:i + engine.batch_size], task, top_k=top_k, errors="keep"):
            if not hasattr(r, "top_k"):
                click.echo(f"error: {r.message}", err=True)
                failed += 1
            elif as_json:
                click.echo(json.dumps(r.to_dict()))
            else:
                rows.append([r.source, r.name, r.probability]
                            + ([", ".join(f"{c.name} {c.probability:.3f}" for c in r.top_k)] if top_k > 1 else []))
    if rows:
        click.echo(format_table(["image", f"{task} class", "probability"] + ([f"top {top_k}"] if top_k > 1 else []),
                                rows))
    if failed:
        sys.exit(2)


# --------------------------------------------------------------------------- bundles (pack, info, remove)
def _eval_target(path, task, weights):
    """What `eval` scores: a run directory, or a bundle's --task (same attributes as a TrainedRun)."""
    from pathlib import Path

    if not (Path(path) / "manifest.json").exists():
        if task is not None:
            raise PbexportError("--task applies to bundles; this is not one (no manifest.json)", str(path))
        from .runs import load_run

        return load_run(path, weights)
    from types import SimpleNamespace

    from .bundle import load_bundle

    bundle = load_bundle(path)
    if task is None:
        raise PbexportError(f"choose the task to evaluate with --task (bundle has: {', '.join(bundle.tasks)})",
                            str(path))
    if weights is not None:
        raise PbexportError("--weights applies to run directories; a bundle carries its backbone", str(path))
    model = bundle.task_model(task)
    return SimpleNamespace(task=task, class_names=bundle.task_info(task)["class_names"],
                           backbone=bundle.backbone(), model=model)


def _fmt_bits(value) -> str:
    return "-" if value is None else f"{value:.4f}"


@cli.command("pack")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", "bundle", required=True, type=click.Path(),
              help="Bundle directory: created, or extended with the runs' tasks.")
@click.option("--name", default=None, help="Task name in the bundle (one run only; default: the run's task).")
@click.option("--replace", is_flag=True, help="Overwrite tasks of the same name.")
@click.option("--weights", type=click.Path(), default=None,
              help="Backbone weights for a new bundle, if they moved since training.")
@handle_errors
def pack_cmd(run_dirs, bundle, name, replace, weights) -> None:
    """Pack piggyback/classifier runs into BUNDLE: one shared backbone, a small file per task."""
    from .bundle import bundle_info, load_bundle, pack_runs

    names = pack_runs(run_dirs, bundle, replace=replace, name=name, weights=weights)
    info = bundle_info(load_bundle(bundle))
    for task in names:
        t = info["tasks"][task]
        what = t["method"] + (" + per-task BN" if t["train_bn"] else "")
        masks = (f", masks {_fmt_bits(t['stored_bits_per_param'])} bits/param (entropy "
                 f"{_fmt_bits(t['entropy_bits_per_param'])}, density {t['density']:.4f})") if t["layers"] else ""
        click.echo(f"{task}: {what}, {t['num_classes']} classes, task file {t['size']:,} bytes{masks}")
    click.echo(f"{bundle}: {len(info['tasks'])} tasks on {info['backbone']['name']} "
               f"(backbone {info['backbone']['size']:,} bytes, stored once), {info['total_size']:,} bytes in all")


@cli.command("info")
@click.argument("bundle", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--plot", type=click.Path(), default=None, help="Draw per-layer mask density of every task to a PNG.")
@handle_errors
def info_cmd(bundle, as_json, plot) -> None:
    """Backbone, tasks, classes, sizes; mask density, stored bits and entropy per task and layer."""
    from .bundle import bundle_info, load_bundle, plot_densities
    from .report import format_table

    info = bundle_info(load_bundle(bundle))
    if plot is not None:
        plot_densities(info, plot)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    bb, spec = info["backbone"], info["backbone"]["input_spec"]
    click.echo(f"bundle {info['path']}: format {info['format_version']}, {len(info['tasks'])} tasks, "
               f"{info['total_size']:,} bytes")
    click.echo(f"backbone {bb['name']}: input {spec['size']}x{spec['size']}x{spec['channels']}, fingerprint "
               f"{bb['fingerprint'][:12]}, {bb['size']:,} bytes; {bb['masked_tensors']} masked tensors, "
               f"{bb['masked_params']:,} masked parameters")
    rows = [[name, t["method"], "yes" if t["train_bn"] else "no", t["num_classes"], t["size"], t["mask_bytes"],
             t["param_bytes"], t["density"], t["stored_bits_per_param"], t["entropy_bits_per_param"],
             t["metrics"].get("test_accuracy")] for name, t in info["tasks"].items()]
    if rows:
        click.echo("\n" + format_table(["task", "method", "task BN", "classes", "file bytes", "mask bytes",
                                        "head+BN bytes", "density", "stored bits/param", "entropy bits/param",
                                        "test acc"], rows))
    for name, t in info["tasks"].items():
        classes = ", ".join(t["class_names"][:12]) + (f", ... ({t['num_classes']} in all)"
                                                      if t["num_classes"] > 12 else "")
        click.echo(f"\n{name}: classes {classes}")
        if t["layers"]:
            click.echo(format_table(["layer", "params", "density", "codec", "stored bits/param",
                                     "entropy bits/param"],
                                    [[la["name"], la["params"], la["density"], la["codec"],
                                      la["stored_bits_per_param"], la["entropy_bits_per_param"]]
                                     for la in t["layers"]]))
    if plot is not None:
        click.echo(f"\nplot: {plot}")


@cli.command("remove")
@click.argument("bundle", type=click.Path())
@click.option("--task", required=True, help="The task to remove.")
@handle_errors
def remove_cmd(bundle, task) -> None:
    """Remove a task from BUNDLE (the backbone stays)."""
    from .bundle import load_bundle, remove_task

    remove_task(bundle, task)
    click.echo(f"removed task {task!r} from {bundle} ({len(load_bundle(bundle).tasks)} tasks left)")


# --------------------------------------------------------------------------- ONNX export (onnx, verify)
def _verify_options(fn):
    for option in reversed([
        click.option("--data", default=None,
                     help="Verify on this dataset's test images (as for `train`); default: random inputs."),
        click.option("--samples", type=int, default=None,
                     help="Inputs to verify on (default: 256 with --data, else 32)."),
        click.option("--atol", type=float, default=1e-4, show_default=True,
                     help="Allowed |onnx - torch| per logit: atol + rtol x the sample's largest |logit|."),
        click.option("--rtol", type=float, default=1e-5, show_default=True,
                     help="The relative part of that tolerance (float32 rounding grows with the logits)."),
        click.option("--strict/--no-strict", default=True, show_default=True,
                     help="Exit with code 1 when verification fails."),
    ]):
        fn = option(fn)
    return fn


def _print_report(report, strict: bool) -> None:
    click.echo(report.table())
    click.echo(report.summary())
    if not report.ok and strict:
        sys.exit(1)


@cli.command("onnx")
@click.argument("bundle", type=click.Path())
@click.option("--task", "tasks", multiple=True,
              help="Task to export (repeatable). Baked: with -o T.onnx, one standalone file.")
@click.option("--all", "all_tasks", is_flag=True,
              help="Every task of the bundle (the default for --shared/--multitask).")
@click.option("--shared", "mode", flag_value="shared",
              help="One backbone weights file + one small graph per task (packed masks, folded at load).")
@click.option("--multitask", "mode", flag_value="multitask",
              help="One graph; task tensors fed per run (onnxruntime adapters, or as inputs).")
@click.option("-o", "--out", required=True, type=click.Path(),
              help="Output: T.onnx (baked, one task) or a directory.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: 17).")
@click.option("--batch", type=int, default=None, help="Fixed batch size (default: a dynamic batch axis).")
@click.option("--input-size", type=int, default=None,
              help="Export at this input size instead of the bundle's (backbones that allow it).")
@click.option("--nchwc-block", type=click.Choice(["8", "16"]), default=None,
              callback=lambda ctx, param, v: None if v is None else int(v),
              help="--multitask for x86 CPUs: onnxruntime's blocked convolutions for this block size (16 on "
                   "AVX512, 8 on AVX2; `pbexport nchwc-block` says this CPU's). Faster batches; the graph runs "
                   "only where the block size matches.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check every file against the PyTorch task model.")
@_verify_options
@click.option("--force", is_flag=True, help="Replace an existing output.")
@handle_errors
def onnx_cmd(bundle, tasks, all_tasks, mode, out, strict, opset, **options) -> None:
    """Export BUNDLE's tasks to ONNX: baked (default), --shared or --multitask; verified unless --no-verify."""
    from .export import DEFAULT_OPSET, main_export

    mode = mode or "baked"
    if tasks and all_tasks:
        raise PbexportError("give --task or --all, not both")
    if mode == "baked" and not tasks and not all_tasks:
        raise PbexportError("choose what to export: --task T -o T.onnx, --all -o DIR, --shared -o DIR or "
                            "--multitask -o DIR")
    result = main_export(bundle, out, mode=mode, tasks=list(tasks) or None,
                         opset=DEFAULT_OPSET if opset is None else opset, **options)
    size = sum(f.stat().st_size for f in result.files)
    click.echo(f"{mode} export -> {out}: {len(result.files)} files, {size:,} bytes")
    if result.report is not None:
        _print_report(result.report, strict)


@cli.command("verify")
@click.argument("bundle", type=click.Path())
@click.option("--onnx", "path", required=True, type=click.Path(),
              help="An exported .onnx file, or a directory written by `pbexport onnx`.")
@click.option("--task", "tasks", multiple=True, help="Task to check (repeatable; default: every task found).")
@_verify_options
@handle_errors
def verify_cmd(bundle, path, tasks, strict, **options) -> None:
    """Check exported ONNX files (any mode) against BUNDLE's PyTorch task models."""
    from .export import verify_export

    _print_report(verify_export(bundle, path, tasks=list(tasks) or None, **options), strict)


@cli.command("quantize")
@click.argument("model", type=click.Path())
@click.option("-o", "--out", "out", required=True, type=click.Path(), help="Quantized .onnx to write.")
@click.option("--calib", required=True,
              help="Dataset (as for `train`): calibrates on its train split, compares on its test split.")
@click.option("--per-channel", is_flag=True, help="One scale per output channel of each weight.")
@click.option("--calib-samples", type=int, default=256, show_default=True)
@click.option("--eval-samples", type=int, default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@handle_errors
def quantize_cmd(model, out, calib, per_channel, calib_samples, eval_samples, as_json, force) -> None:
    """Static int8 quantization (QDQ) of a baked MODEL.onnx, then size, latency and accuracy vs float.

    Shared and multitask exports are refused: their weights are not constants in the graph.
    """
    from .quantize import quantize_model
    from .report import format_table

    r = quantize_model(model, out, calib, per_channel=per_channel, calib_samples=calib_samples,
                       eval_samples=eval_samples, force=force)
    if as_json:
        click.echo(json.dumps(r.to_dict()))
        return
    click.echo(format_table(
        ["model", "bytes", "test accuracy", "latency ms (batch 1)"],
        [["float", r.float_bytes, r.float_accuracy, r.float_latency_ms],
         ["int8", r.int8_bytes, r.int8_accuracy, r.int8_latency_ms]]))
    click.echo(f"{r.size_ratio:.2f}x smaller, accuracy {100 * (r.int8_accuracy - r.float_accuracy):+.2f} points, "
               f"top-1 agreement {100 * r.top1_agreement:.1f}% on {r.samples} test images -> {out}")


@cli.command("ort")
@click.argument("model", type=click.Path())
@click.option("-o", "--out", "out", type=click.Path(), default=None, help="Output (default: MODEL with .ort).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@handle_errors
def ort_cmd(model, out, force) -> None:
    """Convert a baked (or int8) MODEL.onnx to ORT format for onnxruntime-mobile, verified to match."""
    from .mobile import convert_to_ort

    r = convert_to_ort(model, out, force=force)
    click.echo(f"{r['ort']}: {r['ort_bytes']:,} bytes (onnx {r['onnx_bytes']:,}); same logits as the .onnx "
               f"(max |diff| {r['max_abs_diff']:.1e}, top-1 agreement {100 * r['top1_agreement']:.0f}%)")


@cli.command("nchwc-block")
@handle_errors
def nchwc_block_cmd() -> None:
    """Print this CPU's onnxruntime NCHWc block size: the `pbexport onnx --multitask --nchwc-block` for it.

    Run it on the device (it needs onnxruntime only). Exits 1 where onnxruntime has no NCHWc kernels."""
    from .runtime import nchwc_block_size

    block = nchwc_block_size()
    if block is None:
        click.echo("none: this onnxruntime has no NCHWc kernels here; export --multitask without --nchwc-block")
        sys.exit(1)
    click.echo(block)
