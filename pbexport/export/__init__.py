"""ONNX export of a bundle's tasks in three deployment modes, each verified against PyTorch.

    baked      BUNDLE --task T -o T.onnx     standalone graph, W * mask folded in (``--all -o DIR``)
    shared     BUNDLE --shared -o DIR        DIR/backbone.onnx.data + DIR/<task>.onnx (packed masks)
    multitask  BUNDLE --multitask -o DIR     DIR/model.onnx(.data) + DIR/unpack.onnx + DIR/body.onnx
                                             + DIR/adapters/<task>.onnx_adapter + DIR/tasks.json
                                             (``--nchwc-block``: on x86 NCHWc kernels)

One input contract for every file: input ``image``, float32 NCHW RGB in [0, 1] at the exported
input size (dynamic batch unless ``batch``), normalized inside the graph; first output ``logits``
[N, classes]; ``metadata_props`` record task, class names (JSON), input size, mean/std, mode and
pbexport version. The CLI (`pbexport onnx`, `pbexport verify`) calls :func:`main_export` and
:func:`verify_export` by keyword.

Everything is read (and checksum-checked) before anything is written; files are built in a
temporary sibling of the output, verified there, and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PbexportError
from .graph import DEFAULT_OPSET, TaskData
from .verify import DEFAULT_ATOL, DEFAULT_RTOL, Reference, VerifyReport, find_artifacts, verify_artifacts

MODES = ("baked", "shared", "multitask")

__all__ = ["MODES", "DEFAULT_OPSET", "DEFAULT_ATOL", "DEFAULT_RTOL", "ExportResult", "main_export", "verify_export"]


@dataclass
class ExportResult:
    mode: str
    output: Path
    files: list[Path] = field(default_factory=list)  # every file written, under output
    report: VerifyReport | None = None

    @property
    def ok(self) -> bool:
        return self.report is None or self.report.ok


def _open_bundle(bundle):
    if isinstance(bundle, (str, os.PathLike)):
        from ..bundle import load_bundle

        return load_bundle(bundle)
    return bundle


def _select(bundle, tasks: list[str] | None) -> list[str]:
    if tasks is None:
        if not bundle.tasks:
            raise PbexportError("bundle has no tasks to export", str(getattr(bundle, "path", "")) or None)
        return list(bundle.tasks)
    if not tasks:
        raise PbexportError("no task given")
    for t in tasks:
        if t not in bundle.tasks:
            have = ", ".join(bundle.tasks) if bundle.tasks else "none"
            raise PbexportError(f"unknown task {t!r} (bundle has: {have})")
    if len(set(tasks)) != len(tasks):
        raise PbexportError("a task is given twice")
    return list(tasks)


def _read_task(bundle, name: str) -> TaskData:
    info = bundle.task_info(name)
    masks = bundle.task_masks(name) if info["method"] == "piggyback" else {}
    return TaskData(name, info, masks, bundle.task_tensors(name))


def main_export(bundle, output, *, mode: str = "baked", tasks: list[str] | None = None,
                opset: int = DEFAULT_OPSET, batch: int | None = None, input_size: int | None = None,
                verify: bool = True, data: str | None = None, samples: int | None = None,
                atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, force: bool = False,
                nchwc_block: int | None = None) -> ExportResult:
    """Export ``tasks`` (None: all) of ``bundle`` (a path or a loaded Bundle) to ``output``.

    Args:
        mode: ``baked`` (one standalone graph per task: ``output`` is that file when it ends in
            ``.onnx``, else a directory of ``<task>.onnx``), ``shared`` or ``multitask`` (directories).
        opset: ONNX opset of the graphs.
        batch: fixed batch size; None gives a dynamic batch axis.
        input_size: export at this input size instead of the bundle's (CNNs with global pooling).
        verify: compare every file with the PyTorch task model (see :func:`verify_export`).
        data, samples, atol, rtol: what verification runs on and how close it must be
            (|onnx - torch| <= atol + rtol * the sample's largest |logit|).
        force: replace an existing ``output``.
        nchwc_block: multitask only: put the graph's convolutions on onnxruntime's blocked x86 CPU kernels
            for this block size (16 on AVX512, 8 on AVX2; see :mod:`pbexport.export.nchwc`); the graph then
            runs only on a CPU with that block size.

    Returns an :class:`ExportResult`; a failed verification is in ``result.report``, not raised.
    """
    if mode not in MODES:
        raise PbexportError(f"unknown export mode {mode!r}; choose from {', '.join(MODES)}")
    out = Path(output)
    if (out.exists() or out.is_symlink()) and not force:
        raise PbexportError("output exists (use --force to replace it)", str(out))
    _check_tolerance(atol, rtol)
    if nchwc_block is not None:
        from .nchwc import check_block

        if mode != "multitask":
            raise PbexportError(f"--nchwc-block applies to the multitask mode, not {mode}")
        check_block(nchwc_block)
    bundle = _open_bundle(bundle)
    names = _select(bundle, tasks)
    single_file = mode == "baked" and out.suffix == ".onnx"
    if single_file and len(names) != 1:
        raise PbexportError(f"a .onnx file holds one task, not {len(names)}: give one --task, or a directory "
                            "to -o", str(out))
    if out.exists() and out.is_dir() == single_file:
        raise PbexportError(f"output exists and is a {'directory' if out.is_dir() else 'file'}; --force replaces "
                            f"only a {'file' if single_file else 'directory'} here", str(out))
    task_data = [_read_task(bundle, n) for n in names]  # checksums fail here, before anything is written
    backbone = bundle.backbone()
    reference = Reference(bundle, data, samples) if verify else None
    from .graph import export_base

    base = export_base(backbone, list(bundle.masked_names), opset=opset, batch=batch, input_size=input_size)
    if any(t.info["train_bn"] for t in task_data):
        base.require([f"{m}.{k}" for m in base.eps for k in ("weight", "bias", "running_mean", "running_var")])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would become the output directory's mode
    try:
        target = tmp / out.name if single_file else tmp
        extra = {"nchwc_block": nchwc_block} if mode == "multitask" else {}
        files = _WRITERS[mode](base, task_data, target, **extra)
        report = None
        if verify:
            report = verify_artifacts(bundle, find_artifacts(target, names), reference, atol, rtol)
            report = _relabel(report, target, out)
        _commit(tmp, out, single_file)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(mode, out, [out / f.relative_to(target) if not single_file else out for f in files], report)


def verify_export(bundle, path, *, tasks: list[str] | None = None, data: str | None = None,
                  samples: int | None = None, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> VerifyReport:
    """Check an exported file or directory (any mode) against the bundle's PyTorch task models."""
    _check_tolerance(atol, rtol)
    bundle = _open_bundle(bundle)
    if tasks:
        _select(bundle, tasks)
    artifacts = find_artifacts(path, tasks)
    return verify_artifacts(bundle, artifacts, Reference(bundle, data, samples), atol, rtol)


def _check_tolerance(atol: float, rtol: float) -> None:
    for flag, value in (("--atol", atol), ("--rtol", rtol)):
        if not value >= 0:  # NaN too
            raise PbexportError(f"{flag} must be a number >= 0, got {value}")


# --------------------------------------------------------------------------- writers
def _write_baked(base, tasks: list[TaskData], target: Path) -> list[Path]:
    from .baked import baked_model

    files = []
    for t in tasks:
        path = target / f"{t.name}.onnx" if target.is_dir() else target
        _save(baked_model(base, t), path)
        files.append(path)
    return files


def _write_shared(base, tasks: list[TaskData], target: Path) -> list[Path]:
    from .shared import DATA_FILE, shared_layout, shared_model, write_backbone_data

    layout = shared_layout(base)
    write_backbone_data(target / DATA_FILE, base, layout)
    files = [target / DATA_FILE]
    for t in tasks:
        _save(shared_model(base, layout, t), target / f"{t.name}.onnx", allow_external=False)
        files.append(target / f"{t.name}.onnx")
    return files


def _write_multitask(base, tasks: list[TaskData], target: Path, nchwc_block: int | None = None) -> list[Path]:
    import json

    import onnx

    from .multitask import (
        ADAPTER_DIR,
        ADAPTER_SUFFIX,
        BODY_FILE,
        INDEX_FILE,
        MODEL_FILE,
        UNPACK_FILE,
        adapter_tensors,
        index,
        multitask_graph,
        split_weights,
        write_adapter,
    )

    mg = multitask_graph(base, any(t.info["train_bn"] for t in tasks), [t.name for t in tasks], nchwc_block)
    data = f"{MODEL_FILE}.data"  # the weights once, for model.onnx and the unpack graph cut from it
    target.mkdir(parents=True, exist_ok=True)
    onnx.save_model(mg.model, str(target / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)  # saving turns the big initializers into references
    unpack, body, weights = split_weights(mg.model)
    _save(unpack, target / UNPACK_FILE, allow_external=False)
    _save(body, target / BODY_FILE, allow_external=False)
    (target / ADAPTER_DIR).mkdir()
    files = [target / MODEL_FILE, target / data, target / UNPACK_FILE, target / BODY_FILE]
    adapters = {}
    for t in tasks:
        adapters[t.name] = adapter_tensors(mg, base, t)
        path = target / ADAPTER_DIR / f"{t.name}{ADAPTER_SUFFIX}"
        write_adapter(path, adapters[t.name])
        files.append(path)
    (target / INDEX_FILE).write_text(json.dumps(index(base, tasks, adapters, weights), indent=2) + "\n")
    files.append(target / INDEX_FILE)
    return files


_WRITERS = {"baked": _write_baked, "shared": _write_shared, "multitask": _write_multitask}

_PROTOBUF_LIMIT = 2**31 - 2**26  # protobuf's 2 GiB limit, with room for the graph itself


def _save(model, path: Path, allow_external: bool = True) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    big = allow_external and model.ByteSize() > _PROTOBUF_LIMIT
    onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=f"{path.name}.data" if big else None)


def _relabel(report: VerifyReport, target: Path, out: Path) -> VerifyReport:
    """Report the final paths, not the temporary ones."""
    for c in report.checks:
        p = Path(c.path)
        c.path = str(out) if p == target else str(out / p.relative_to(target))
    return report


def _commit(tmp: Path, out: Path, single_file: bool) -> None:
    """Move the finished export into place; an existing output (--force) is replaced, never merged."""
    from ..fileio import fsync_dir

    for f in [p for p in tmp.rglob("*") if p.is_file()]:
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    if single_file:  # T.onnx, and T.onnx.data when the model is past protobuf's 2 GiB
        for f in sorted(tmp.iterdir(), key=lambda p: p == tmp / out.name):  # the .onnx last
            os.replace(f, out.parent / f.name)
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        old = None
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)
