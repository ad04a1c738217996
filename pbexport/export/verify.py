"""Parity check of exported artifacts against the PyTorch task model of the bundle.

For every (task, artifact): onnx.checker on the file; the metadata names this bundle's backbone and
the task's class count; onnxruntime runs it on the same inputs as the reference (``--data`` test
images, or seeded uniform random images); the first output is ``logits`` of shape [N, classes];
|onnx - torch| <= atol + rtol * max |torch logit| of the sample, for every logit; and the top-1 class
agrees on every sample (a sample whose two best reference logits are within that tolerance of each
other is a tie, not a disagreement). The relative term is there because float32 rounding grows with
the logits' scale: the same correct graph differs from PyTorch by more where the logits are larger,
and by a different amount on another CPU's kernels (resnet18 logits of about 15 differed by 1.006e-4
on an AMD EPYC and by less on an Intel Xeon); a wrong mask bit, BN or head moves logits by far more.
Every problem of every artifact is collected; shape problems are reported before tolerance problems.
A multitask export is checked three times: through onnxruntime's LoraAdapter, with its tensors fed as
inputs, and as the runtime's feed="weights" runs it (unpack.onnx, then body.onnx).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import PbexportError
from ..report import format_table
from ..runtime import weights_feed
from .graph import INPUT_NAME, OUTPUT_NAME
from .multitask import INDEX_FILE, INDEX_FORMAT

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-5  # numpy's allclose default; times the sample's largest |logit|
DATA_SAMPLES = 256
RANDOM_SAMPLES = 32
CHUNK = 64


@dataclass
class Check:
    task: str
    mode: str
    path: str
    problems: list[str] = field(default_factory=list)
    samples: int = 0
    shape: tuple[int, ...] | None = None
    max_diff: float | None = None
    top1: float | None = None  # fraction of samples whose top-1 class agrees

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class VerifyReport:
    checks: list[Check]
    atol: float
    inputs: str  # what the artifacts were run on
    rtol: float = DEFAULT_RTOL

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> list[str]:
        return [f"{c.task} ({c.mode}, {c.path}): {p}" for c in self.checks for p in c.problems]

    def table(self) -> str:
        rows = [[c.task, c.mode, c.path, "x".join(map(str, c.shape)) if c.shape else None,
                 None if c.max_diff is None else f"{c.max_diff:.2e}",
                 None if c.top1 is None else f"{100 * c.top1:.1f}%", "ok" if c.ok else "FAIL"] for c in self.checks]
        return format_table(["task", "mode", "file", "logits", "max |diff|", "top-1 agree", "result"], rows)

    def summary(self) -> str:
        bad = sum(not c.ok for c in self.checks)
        head = (f"verification on {self.inputs}, atol {self.atol:g}, rtol {self.rtol:g}: "
                + (f"{len(self.checks)} checks passed" if not bad else f"{bad} of {len(self.checks)} checks FAILED"))
        return "\n".join([head, *(f"  {f}" for f in self.failures())])

    def to_dict(self) -> dict:
        return {"ok": self.ok, "atol": self.atol, "rtol": self.rtol, "inputs": self.inputs,
                "checks": [{"task": c.task, "mode": c.mode, "path": c.path, "ok": c.ok, "problems": c.problems,
                            "samples": c.samples, "shape": list(c.shape) if c.shape else None,
                            "max_diff": c.max_diff, "top1_agreement": c.top1} for c in self.checks]}


class Reference:
    """Inputs and PyTorch reference logits, computed once per (task, input size) and cached."""

    def __init__(self, bundle, data: str | None = None, samples: int | None = None, seed: int = 0):
        if samples is not None and samples < 1:
            raise PbexportError(f"--samples must be at least 1, got {samples}")
        self.bundle, self.data, self.seed = bundle, data, seed
        self.samples = samples or (DATA_SAMPLES if data else RANDOM_SAMPLES)
        self._inputs: dict[tuple[int, int], np.ndarray] = {}
        self._logits: dict[tuple[str, int], np.ndarray] = {}
        self._task_data = None
        if data is not None:
            from ..data import load_data

            self._task_data = load_data(data)  # fail now, before anything is exported

    def describe(self) -> str:
        if self._task_data is None:
            return f"{self.samples} random inputs (seed {self.seed})"
        return f"{min(self.samples, len(self._task_data.test))} test images of {self.data}"

    def inputs(self, size: int, channels: int) -> np.ndarray:
        key = (size, channels)
        if key not in self._inputs:
            if self._task_data is None:
                rng = np.random.default_rng(self.seed)
                x = rng.random((self.samples, channels, size, size), dtype=np.float32)
            else:
                from ..data import to_model_input

                x = to_model_input(self._task_data.test.images[:self.samples], size).numpy()
                if x.shape[1] != channels:
                    raise PbexportError(f"--data images have {x.shape[1]} channels, the model takes {channels}",
                                        self.data)
            self._inputs[key] = np.ascontiguousarray(x, np.float32)
        return self._inputs[key]

    def logits(self, task: str, size: int, channels: int) -> np.ndarray:
        key = (task, size)
        if key not in self._logits:
            import torch

            model = self.bundle.task_model(task).eval()
            x = self.inputs(size, channels)
            with torch.no_grad():
                out = [model(torch.from_numpy(x[i:i + CHUNK])).numpy() for i in range(0, len(x), CHUNK)]
            self._logits[key] = np.concatenate(out)
        return self._logits[key]


# --------------------------------------------------------------------------- finding artifacts
@dataclass
class Artifact:
    task: str
    mode: str
    path: Path
    adapter: Path | None = None  # multitask only
    metadata: dict = field(default_factory=dict)
    unpack: Path | None = None  # multitask: model.onnx up to the weights, and after them (feed="weights")
    body: Path | None = None
    weights: list[str] = field(default_factory=list)  # the tensors between them


def read_metadata(path: Path) -> dict[str, str]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise PbexportError(f"cannot read ONNX model ({str(exc).splitlines()[0][:200] if str(exc) else exc})",
                            str(path)) from None
    meta = {p.key: p.value for p in model.metadata_props}
    if "pbexport_version" not in meta or "mode" not in meta:
        raise PbexportError("not an ONNX model exported by pbexport (no pbexport metadata)", str(path))
    return meta


def find_artifacts(path: str | Path, tasks: list[str] | None = None) -> list[Artifact]:
    """The task exports under ``path``: one .onnx file, a directory of them, or a multitask directory."""
    p = Path(path)
    found: list[Artifact] = []
    if p.is_file() and read_metadata(p)["mode"] == "multitask":
        p = p.parent  # a multitask model.onnx: its tasks are in the directory's index
    if p.is_file():
        meta = read_metadata(p)
        found.append(Artifact(meta.get("task", ""), meta["mode"], p, metadata=meta))
    elif p.is_dir() and (p / INDEX_FILE).is_file():
        try:
            idx = json.loads((p / INDEX_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise PbexportError(f"cannot read the multitask index ({exc})", str(p / INDEX_FILE)) from None
        if not isinstance(idx, dict) or idx.get("format") != INDEX_FORMAT or not isinstance(idx.get("tasks"), dict):
            raise PbexportError("not a pbexport multitask index", str(p / INDEX_FILE))
        model = p / idx.get("model", "model.onnx")
        meta = read_metadata(model)
        unpack, body = (p / idx[k] if isinstance(idx.get(k), str) else None for k in ("unpack", "body"))
        for name, entry in idx["tasks"].items():
            found.append(Artifact(name, meta["mode"], model, p / entry["adapter"], meta, unpack, body,
                                  list(idx.get("weights") or [])))
    elif p.is_dir():
        for f in sorted(p.glob("*.onnx")):
            meta = read_metadata(f)
            found.append(Artifact(meta.get("task", ""), meta["mode"], f, metadata=meta))
        if not found:
            raise PbexportError("no .onnx files here", str(p))
    else:
        raise PbexportError("no such file or directory", str(p))
    if tasks:
        have = [a.task for a in found]
        for t in tasks:
            if t not in have:
                raise PbexportError(f"holds no export of task {t!r} (it has: {', '.join(have)})", str(p))
        found = [a for a in found if a.task in tasks]
    return found


# --------------------------------------------------------------------------- running
def session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # overridable initializers are by design; don't warn about them
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_chunked(sess, x: np.ndarray, feeds: dict | None = None, run_options=None) -> np.ndarray:
    """The first output over all of ``x``, in chunks the input's batch dimension accepts."""
    batch = sess.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) else CHUNK
    outs = []
    for i in range(0, len(x), step):
        chunk = x[i:i + step]
        n = len(chunk)
        if n < step and isinstance(batch, int):
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - n, axis=0)])
        out = sess.run(None, {INPUT_NAME: chunk, **(feeds or {})}, run_options)[0]
        outs.append(out[:n])
    return np.concatenate(outs)


def _check_run(check: Check, sess, ref_in: np.ndarray, ref: np.ndarray, atol: float, rtol: float,
               feeds=None, run_options=None) -> None:
    names = [o.name for o in sess.get_outputs()]
    if not names or names[0] != OUTPUT_NAME:
        check.problems.append(f"first output is {names[:1]}, expected ['{OUTPUT_NAME}']")
    inputs = sess.get_inputs()
    if inputs[0].name != INPUT_NAME:
        check.problems.append(f"first input is {inputs[0].name!r}, expected {INPUT_NAME!r}")
        return
    out = run_chunked(sess, ref_in, feeds, run_options)
    check.samples = len(out)
    check.shape = tuple(out.shape)
    if out.shape != ref.shape:
        check.problems.insert(0, f"logits have shape {list(out.shape)}, expected {list(ref.shape)}")
        return
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    check.max_diff = float(np.nanmax(diff)) if diff.size else 0.0
    allowed = atol + rtol * np.abs(ref.astype(np.float64)).max(axis=1, initial=0.0)  # per sample
    over = (diff > allowed[:, None]).any(axis=1)
    if not np.isfinite(out).all():
        check.problems.append("logits are not all finite")
    elif over.any():
        worst = int(np.argmax(diff.max(axis=1) - allowed))
        check.problems.append(f"|diff| above atol {atol:g} + rtol {rtol:g} x max |logit| on {int(over.sum())} of "
                              f"{len(ref)} samples (max |diff| {check.max_diff:.3e}; worst sample: "
                              f"{diff[worst].max():.3e} > {allowed[worst]:.3e})")
    top_ref, top_out = ref.argmax(1), out.argmax(1)
    check.top1 = float((top_ref == top_out).mean()) if len(ref) else 1.0
    rows = np.arange(len(ref))
    real = (top_ref != top_out) & (ref[rows, top_ref] - ref[rows, top_out] > allowed)  # not a tie within tolerance
    if real.any():
        check.problems.append(f"top-1 class differs on {int(real.sum())} of {len(ref)} samples")


def verify_artifacts(bundle, artifacts: list[Artifact], reference: Reference,
                     atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> VerifyReport:
    import onnx

    checks: list[Check] = []
    for art in artifacts:
        modes = ["multitask (adapter)", "multitask (inputs)"] if art.adapter is not None else [art.mode]
        if art.unpack is not None and art.body is not None:
            modes.append("multitask (weights)")
        rel = str(art.adapter if art.adapter is not None else art.path)
        base_problems: list[str] = []
        if art.task not in bundle.tasks:
            base_problems.append(f"task {art.task!r} is not in the bundle")
        else:
            info = bundle.task_info(art.task)
        meta = art.metadata
        if meta.get("backbone_fingerprint") != bundle.fingerprint:
            base_problems.append(f"exported from backbone {meta.get('backbone_fingerprint', '?')[:12]}, the "
                                 f"bundle's is {bundle.fingerprint[:12]}")
        try:
            onnx.checker.check_model(str(art.path))
        except Exception as exc:
            base_problems.append(f"onnx.checker: {str(exc).strip().splitlines()[0][:200]}")
        for mode in modes:
            check = Check(art.task, mode, rel, list(base_problems))
            checks.append(check)
            if base_problems:
                continue
            try:
                sess = session(art.path)
                shape = sess.get_inputs()[0].shape
                size, channels = int(shape[2]), int(shape[1])
                x = reference.inputs(size, channels)
                ref = reference.logits(art.task, size, channels)
                feeds, run_options = None, None
                if mode == "multitask (adapter)":
                    import onnxruntime as ort

                    adapter = ort.LoraAdapter()
                    adapter.Load(str(art.adapter))
                    run_options = ort.RunOptions()
                    run_options.add_active_adapter(adapter)
                elif mode == "multitask (inputs)":
                    feeds = read_adapter(art.adapter)
                elif mode == "multitask (weights)":
                    sess = session(art.body)
                    feeds, unknown = weights_feed(session(art.unpack), sess, art.weights, read_adapter(art.adapter))
                    if unknown:
                        check.problems.append(f"adapter tensor {unknown[0]} is not an input of {art.unpack.name} or "
                                              f"{art.body.name} ({len(unknown)} unknown)")
                        continue
                if ref.shape[1] != info["num_classes"]:
                    check.problems.append(f"reference has {ref.shape[1]} classes, the task {info['num_classes']}")
                _check_run(check, sess, x, ref, atol, rtol, feeds, run_options)
            except PbexportError:
                raise
            except Exception as exc:  # onnxruntime refuses the model or its inputs
                check.problems.append(f"onnxruntime: {str(exc).strip().splitlines()[0][:200]}")
    return VerifyReport(checks, atol, reference.describe(), rtol)


def read_adapter(path: Path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    adapter = ort.AdapterFormat.read_adapter(str(path))
    # the OrtValues point into the adapter's buffer: copy while it is alive
    return {k: np.array(v.numpy(), copy=True) for k, v in adapter.get_parameters().items()}
