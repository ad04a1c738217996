"""On-device inference with onnxruntime + numpy + Pillow: no torch, no onnx package, no bundle.

    engine = pbexport.runtime.open_model("exports/shared")       # any of the three export forms
    engine.tasks                                                  # ['gtsrb', 'mnist']
    engine.classes("gtsrb")                                       # class names, from the artifact
    for p in engine.predict(["a.png", "b.jpg"], task="gtsrb", top_k=3):
        print(p.source, p.name, p.probability, [(c.name, c.probability) for c in p.top_k])

What ``open_model`` accepts (the layouts ``pbexport onnx`` writes):

    T.onnx                 one baked (or shared) task graph; also its int8 version (``pbexport quantize``)
    T.ort                  a baked graph in ORT format (``pbexport ort``, for onnxruntime-mobile)
    DIR/ with *.onnx       one graph per task: baked (``--all``), or shared (+ DIR/backbone.onnx.data);
                           a directory with no .onnx but .ort files: those
    DIR/ with tasks.json   multitask: DIR/model.onnx + DIR/adapters/<task>.onnx_adapter

Everything the device needs is read from the artifacts: the task names, class names and input size
from each graph's ``metadata_props`` (parsed here from the protobuf, without the onnx package and
without creating a session) or from the multitask ``tasks.json``. Mean/std normalization is inside
the graphs; this module only turns images into float32 NCHW RGB in [0, 1] at the input size.

Sessions are created on first use and cached: baked/shared keep the ``cache_size`` most recently
used task sessions (LRU; each holds its own copy of the effective weights); multitask keeps ONE
session and the ``cache_size`` most recently used tasks' tensors, fed on every run.

This module imports only onnxruntime, numpy, Pillow and pbexport's torch-free modules; a test runs it
with torch made unimportable.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .errors import PbexportError
from .spec import InputSpec

__all__ = ["ClassScore", "Prediction", "Failed", "Engine", "open_model", "load_image", "read_onnx_metadata",
           "resolve_providers", "list_inputs", "IMAGE_SUFFIXES", "ARRAY_SUFFIX", "DEFAULT_CACHE_SIZE"]

# Mirrors of the export package's names (pbexport.export imports onnx and torch; a test keeps them equal).
SHARED_DATA_FILE = "backbone.onnx.data"
MULTITASK_INDEX = "tasks.json"
MULTITASK_FORMAT = "pbexport-multitask"
MULTITASK_VERSIONS = (1,)
MODES = ("baked", "shared", "multitask")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp")
ARRAY_SUFFIX = ".npy"  # NCHW or CHW, float in [0, 1] or uint8
DEFAULT_CACHE_SIZE = 4
DEFAULT_BATCH = 32  # images per run; bounds the activation memory of a dynamic-batch graph
FEEDS = ("adapter", "inputs", "weights")  # multitask: how a task's tensors reach the graph (see MultitaskEngine)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

_ALPHA_MODES = {"RGBA": "RGB", "LA": "L", "PA": "P", "RGBa": "RGB", "La": "L"}


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ClassScore:
    index: int
    name: str
    probability: float


@dataclass(frozen=True)
class Prediction:
    """One image's result: the best class and the ``top_k`` best (best first), softmax probabilities."""

    source: str  # the file, or "<array>[i]" / "<image>[i]"
    task: str
    index: int
    name: str
    probability: float
    top_k: tuple[ClassScore, ...]

    def to_dict(self) -> dict:
        return {"image": self.source, "task": self.task, "label": self.index, "class": self.name,
                "probability": self.probability,
                "top_k": [{"label": c.index, "class": c.name, "probability": c.probability} for c in self.top_k]}


@dataclass(frozen=True)
class Failed:
    """An input that could not be read (``predict(..., errors="keep")``); ``message`` names it."""

    source: str
    message: str


# --------------------------------------------------------------------------- ONNX metadata without onnx
class _NotOnnx(Exception):
    pass


def _varint(f) -> int:
    shift = result = 0
    for _ in range(10):
        b = f.read(1)
        if not b:
            raise _NotOnnx("truncated")
        result |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return result
        shift += 7
    raise _NotOnnx("bad varint")


def _entry(buf: bytes) -> tuple[str, str]:
    """A StringStringEntryProto: key = field 1, value = field 2."""
    import io

    f, out = io.BytesIO(buf), {1: "", 2: ""}
    while f.tell() < len(buf):
        key = _varint(f)
        if key & 7 != 2:
            raise _NotOnnx("bad metadata entry")
        n = _varint(f)
        data = f.read(n)
        if len(data) != n:
            raise _NotOnnx("truncated metadata entry")
        if key >> 3 in out:
            out[key >> 3] = data.decode("utf-8")
    return out[1], out[2]


# ModelProto fields whose wire type we check: ir_version (1, varint), graph (7), opset_import (8),
# metadata_props (14): a file that is not a ModelProto fails these or the structure long before the end.
_MODEL_WIRE = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2}


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """``metadata_props`` of an ONNX file, read from the protobuf's top level (the graph is skipped, not read).

    Raises PbexportError when the file is not an ONNX model. Costs a few reads even for a large file.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise _NotOnnx("empty file")
            meta: dict[str, str] = {}
            seen = set()
            while f.tell() < size:
                key = _varint(f)
                field, wire = key >> 3, key & 7
                if field == 0 or _MODEL_WIRE.get(field, wire) != wire:
                    raise _NotOnnx("unexpected field")
                if wire == 0:
                    _varint(f)
                elif wire == 1 or wire == 5:
                    f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
                elif wire == 2:
                    n = _varint(f)
                    if f.tell() + n > size:
                        raise _NotOnnx("truncated")
                    if field == 14:
                        k, v = _entry(f.read(n))
                        meta[k] = v
                    else:
                        f.seek(n, os.SEEK_CUR)
                else:
                    raise _NotOnnx("bad wire type")
                seen.add(field)
            if f.tell() != size or not {1, 7} <= seen:
                raise _NotOnnx("no graph")
    except FileNotFoundError:
        raise PbexportError("no such file", str(p)) from None
    except IsADirectoryError:
        raise PbexportError("is a directory, expected an .onnx file", str(p)) from None
    except OSError as exc:
        raise PbexportError(f"cannot read ({exc.strerror or exc})", str(p)) from None
    except (_NotOnnx, UnicodeDecodeError):
        raise PbexportError("not an ONNX model", str(p)) from None
    return meta


def _is_ort_format(path: Path) -> bool:
    """An ORT-format (flatbuffer, ``.ort``) model: its file identifier ``ORTM`` at bytes 4-8."""
    try:
        with open(path, "rb") as f:
            return f.read(8)[4:] == b"ORTM"
    except OSError:
        return False


def _ort_format_metadata(path: Path) -> dict[str, str]:
    """Custom metadata of an ORT-format model, through a session (the flatbuffer is not parsed here)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise PbexportError(f"onnxruntime cannot load this ORT-format model ({_first_line(exc)})", str(path)) from None
    return dict(sess.get_modelmeta().custom_metadata_map)


def _pbexport_meta(path: Path) -> dict[str, str]:
    meta = _ort_format_metadata(path) if _is_ort_format(path) else read_onnx_metadata(path)
    if "pbexport_version" not in meta or meta.get("mode") not in MODES:
        raise PbexportError("an ONNX model without pbexport metadata (export it with `pbexport onnx`)", str(path))
    return meta


def _spec_from(d: dict, where: str) -> tuple[InputSpec, int | None]:
    """InputSpec and fixed batch (None: dynamic) from metadata strings or the multitask index."""
    try:
        def val(k):
            v = d[k]
            return json.loads(v) if isinstance(v, str) and k in ("mean", "std") else v

        spec = InputSpec(int(d["size"]), int(d.get("channels", 3)), tuple(float(m) for m in val("mean")),
                         tuple(float(s) for s in val("std")))
        batch = d.get("batch")
        batch = None if batch in (None, "dynamic") else int(batch)
    except (KeyError, ValueError, TypeError) as exc:
        raise PbexportError(f"input description is damaged ({type(exc).__name__}: {exc})", where) from None
    if spec.size < 1 or spec.channels != 3 or (batch is not None and batch < 1):
        raise PbexportError(f"unsupported input: {spec.channels} channels at {spec.size}x{spec.size}", where)
    return spec, batch


def _meta_spec(meta: dict[str, str], where: str) -> tuple[InputSpec, int | None]:
    return _spec_from({"size": meta.get("input_size"), "channels": meta.get("input_channels", "3"),
                       "mean": meta.get("mean"), "std": meta.get("std"), "batch": meta.get("batch")}, where)


def _class_names(value, where: str) -> list[str]:
    try:
        names = json.loads(value) if isinstance(value, str) else value
    except ValueError:
        names = None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise PbexportError("class names are missing or damaged", where)
    return names


# --------------------------------------------------------------------------- images -> NCHW float32
def _resize_channels(arr: np.ndarray, size: int) -> np.ndarray:
    """HWC float32 in [0, 1] -> CHW at size x size, bilinear on float planes (no uint8 rounding).

    Pillow's bilinear filter widens its support when shrinking (antialiased), like torch's
    ``interpolate(..., bilinear, antialias=True)`` that training uses; enlarging is plain bilinear.
    """
    from PIL import Image

    if arr.shape[:2] == (size, size):
        return np.ascontiguousarray(arr.transpose(2, 0, 1))
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(arr[:, :, c]))
                         .resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
              for c in range(arr.shape[2])]
    return np.stack(planes)


def _from_pil(im, size: int, where: str) -> np.ndarray:
    """A PIL image -> float32 [3, size, size] in [0, 1]; gray becomes RGB, real transparency is refused."""
    mode = im.mode
    if mode in _ALPHA_MODES:
        alpha = np.asarray(im.getchannel("A" if "A" in mode else "a"))
        if alpha.min() < 255:
            raise PbexportError(f"image has {len(im.getbands())} channels ({mode}, with transparent pixels); the "
                                "model takes RGB or gray: flatten it onto a background first", where)
        im = im.convert(_ALPHA_MODES[mode])  # fully opaque: the alpha channel carries nothing
        mode = im.mode
    if mode.startswith("I;16"):  # 16-bit gray
        gray = np.asarray(im, dtype=np.float32) / 65535.0
        arr = np.repeat(gray[:, :, None], 3, axis=2)
    elif mode in ("I", "F"):
        raise PbexportError(f"unsupported pixel format {mode} (32-bit); save it as 8-bit RGB or gray", where)
    else:
        if len(im.getbands()) not in (1, 3) and mode != "CMYK":
            raise PbexportError(f"image has {len(im.getbands())} channels ({mode}); the model takes 3 (RGB)",
                                where)
        try:
            rgb = im.convert("RGB")
        except (ValueError, OSError) as exc:
            raise PbexportError(f"cannot convert image mode {mode} to RGB ({exc})", where) from None
        arr = np.asarray(rgb, dtype=np.float32) / 255.0
    return _resize_channels(arr, size)


def _from_array(arr: np.ndarray, size: int, where: str) -> np.ndarray:
    """NCHW or CHW array (float in [0, 1], or uint8) -> float32 NCHW; never resized or transposed."""
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise PbexportError(f"array has shape {list(arr.shape)}; expected NCHW or CHW", where)
    if arr.shape[1] != 3:
        raise PbexportError(f"array has {arr.shape[1]} channels (shape {list(arr.shape)}); the model takes 3 "
                            "(arrays are NCHW or CHW, RGB)", where)
    if arr.shape[2:] != (size, size):
        raise PbexportError(f"array is {arr.shape[2]}x{arr.shape[3]}; the model takes {size}x{size} "
                            "(resize it, or pass images)", where)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype.kind != "f":
        raise PbexportError(f"array has dtype {arr.dtype}; expected float in [0, 1] or uint8", where)
    out = np.ascontiguousarray(arr, np.float32)
    if not np.isfinite(out).all():
        raise PbexportError("array has NaN or infinite values", where)
    return out


def load_image(item, size: int, where: str | None = None) -> np.ndarray:
    """One input -> float32 NCHW RGB in [0, 1] at ``size`` (N = 1 except for NCHW arrays).

    ``item``: a file path (an image Pillow reads, or a ``.npy`` array), a PIL image, or a numpy array
    (NCHW or CHW, float in [0, 1] or uint8, already at the input size). Raises PbexportError naming it.
    """
    if isinstance(item, (str, os.PathLike)):
        p = Path(item)
        where = where or str(p)
        if p.is_dir():
            raise PbexportError("is a directory, expected an image", where)
        if not p.exists():
            raise PbexportError("no such file", where)
        if p.suffix.lower() == ARRAY_SUFFIX:
            try:
                arr = np.load(p, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise PbexportError(f"cannot read array ({_first_line(exc)})", where) from None
            return _from_array(arr, size, where)
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(p) as im:
                im.load()
                return _from_pil(im, size, where)[None]
        except PbexportError:
            raise
        except UnidentifiedImageError:
            raise PbexportError("not an image (Pillow cannot identify it)", where) from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise PbexportError(f"cannot read image ({_first_line(exc)})", where) from None
    if isinstance(item, np.ndarray):
        return _from_array(item, size, where or "<array>")
    from PIL import Image

    if isinstance(item, Image.Image):
        return _from_pil(item, size, where or "<image>")[None]
    raise PbexportError(f"cannot use a {type(item).__name__} as an image (give a path, a PIL image or an NCHW "
                        "array)", where or "<input>")


def list_inputs(path: str | Path) -> list[Path]:
    """The files ``predict`` reads from a directory: images and .npy arrays at its top level, sorted."""
    p = Path(path)
    return sorted(f for f in p.iterdir() if not f.name.startswith(".") and f.is_file()
                  and f.suffix.lower() in (*IMAGE_SUFFIXES, ARRAY_SUFFIX))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:200] if text else type(exc).__name__)


# --------------------------------------------------------------------------- providers and sessions
def resolve_providers(providers=None) -> list[str]:
    """``None``/"cpu" -> CPU; "cuda" -> CUDA then CPU (CUDA must be installed); "auto" -> CUDA when present.

    A list of onnxruntime provider names is passed through (each must be available).
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None:
        providers = "cpu"
    if isinstance(providers, str):
        key = providers.lower()
        if key == "auto":
            key = "cuda" if PROVIDERS["cuda"] in available else "cpu"
        if key not in PROVIDERS:
            raise PbexportError(f"unknown provider {providers!r}; choose cpu, cuda or auto")
        providers = [PROVIDERS["cuda"], PROVIDERS["cpu"]] if key == "cuda" else [PROVIDERS["cpu"]]
    providers = list(providers)
    for name in providers:
        if name not in available:
            hint = " (install onnxruntime-gpu for CUDA)" if name == PROVIDERS["cuda"] else ""
            raise PbexportError(f"execution provider {name} is not available in this onnxruntime "
                                f"{ort.__version__} (available: {', '.join(available)}){hint}")
    return providers


def _level(name: str):
    import onnxruntime as ort

    return {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[name]


OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


# --------------------------------------------------------------------------- the engine
class Engine:
    """Tasks of one export, ready to predict. Build it with :func:`open_model`.

    ``tasks``, ``classes(task)``, ``input_spec(task)``; ``predict(images, task=...)`` returns one
    :class:`Prediction` per image; ``logits(images, task=...)`` the raw first output. Thread-safe.
    """

    mode: str

    def __init__(self, path: Path, providers: list[str], cache_size: int, batch_size: int, threads: int | None,
                 optimization: str | None):
        if cache_size < 1:
            raise PbexportError(f"cache size must be at least 1, got {cache_size}")
        if batch_size < 1:
            raise PbexportError(f"batch size must be at least 1, got {batch_size}")
        if optimization is not None and optimization not in OPTIMIZATION_LEVELS:
            raise PbexportError(f"unknown optimization level {optimization!r}; choose from "
                                f"{', '.join(OPTIMIZATION_LEVELS)}")
        self.path = path
        self.providers = providers
        self.cache_size = cache_size
        self.batch_size = batch_size
        self.threads = threads
        self.optimization = optimization
        self._lock = threading.RLock()
        self._classes: dict[str, list[str]] = {}
        self._specs: dict[str, tuple[InputSpec, int | None]] = {}
        self.stats = {"loads": 0, "hits": 0, "evictions": 0}  # task state: created, reused, dropped
        self.backbone = ""  # the backbone's registry name, from the artifact

    # ---- what the artifact holds
    @property
    def tasks(self) -> list[str]:
        return list(self._classes)

    def _task(self, task: str | None) -> str:
        if task is None:
            if len(self._classes) == 1:
                return next(iter(self._classes))
            raise PbexportError(f"choose a task (this model has: {', '.join(self._classes)})", str(self.path))
        if task not in self._classes:
            raise PbexportError(f"unknown task {task!r} (this model has: {', '.join(self._classes)})",
                                str(self.path))
        return task

    def resolve_task(self, task: str | None = None) -> str:
        """``task`` checked against the model's tasks; None means the only task (PbexportError otherwise)."""
        return self._task(task)

    def classes(self, task: str | None = None) -> list[str]:
        return list(self._classes[self._task(task)])

    def input_spec(self, task: str | None = None) -> InputSpec:
        return self._specs[self._task(task)][0]

    def loaded(self) -> list[str]:
        """Tasks whose state is in the cache now, least recently used first."""
        raise NotImplementedError

    # ---- running
    def preprocess(self, images, task: str | None = None, errors: str = "raise"):
        """Inputs -> (float32 NCHW batch, one source name per image, [(position, Failed)])."""
        if errors not in ("raise", "keep"):
            raise PbexportError(f"errors must be 'raise' or 'keep', got {errors!r}")
        size = self.input_spec(task).size
        items = []
        for item in ([images] if _single(images) else list(images)):
            if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
                items += list_inputs(item)  # a directory: its image files
            else:
                items.append(item)
        arrays, sources, failures = [], [], []
        for i, item in enumerate(items):
            if isinstance(item, (str, os.PathLike)):
                where = str(item)
            else:
                where = f"<{'array' if isinstance(item, np.ndarray) else 'image'}>" + (f"[{i}]" if len(items) > 1
                                                                                         else "")
            try:
                x = load_image(item, size, where)
            except PbexportError as exc:
                if errors == "raise":
                    raise
                failures.append((len(sources) + len(failures), Failed(where, str(exc))))
                continue
            arrays.append(x)
            sources += [where] if len(x) == 1 else [f"{where}[{j}]" for j in range(len(x))]
        x = np.concatenate(arrays) if arrays else np.zeros((0, 3, size, size), np.float32)
        return x, sources, failures

    def logits(self, images, task: str | None = None) -> np.ndarray:
        """The graph's first output for ``images`` (anything :meth:`predict` takes): float32 [N, classes]."""
        task = self._task(task)
        x, _, _ = self.preprocess(images, task)
        return self._logits(task, x)

    def _logits(self, task: str, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.zeros((0, len(self._classes[task])), np.float32)
        fixed = self._specs[task][1]
        step = fixed or self.batch_size
        outs = []
        with self._lock:
            run = self._runner(task)
        for i in range(0, len(x), step):
            chunk = x[i:i + step]
            n = len(chunk)
            if fixed and n < fixed:  # a fixed-batch graph: pad with copies of the last image
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - n, axis=0)])
            outs.append(run(np.ascontiguousarray(chunk))[:n])
        out = np.concatenate(outs)
        want = len(self._classes[task])
        if out.ndim != 2 or out.shape[1] != want:
            raise PbexportError(f"task {task!r} returned logits of shape {list(out.shape)}, expected [N, {want}]",
                                str(self.path))
        return out

    def predict(self, images, task: str | None = None, top_k: int = 5, errors: str = "raise") -> list:
        """One :class:`Prediction` per image, in input order.

        ``images``: a path (image file or ``.npy``), a PIL image, an NCHW/CHW array, or a list of them;
        a directory path means its image files (:func:`list_inputs`). ``errors="raise"`` (default)
        raises PbexportError for the first unreadable input before running anything;
        ``errors="keep"`` predicts the readable ones and puts a :class:`Failed` in the others' place.
        """
        task = self._task(task)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise PbexportError(f"top-k must be a positive integer, got {top_k!r}")
        x, sources, failures = self.preprocess(images, task, errors)
        logits = self._logits(task, x).astype(np.float64)
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = z / z.sum(axis=1, keepdims=True)
        names = self._classes[task]
        k = min(top_k, len(names))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        out: list = []
        for row, src in enumerate(sources):
            top = tuple(ClassScore(int(j), names[j], float(probs[row, j])) for j in order[row])
            out.append(Prediction(src, task, top[0].index, top[0].name, top[0].probability, top))
        for pos, failed in failures:  # positions count earlier failures: insert in order
            out.insert(pos, failed)
        return out

    def warm(self, task: str | None = None) -> None:
        """Create (or touch) ``task``'s cached state now instead of on its first prediction."""
        task = self._task(task)
        with self._lock:
            self._runner(task)

    def close(self) -> None:
        """Drop every session and cached tensor (the engine can still be used: they come back lazily)."""
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.mode} {str(self.path)!r}: {len(self._classes)} tasks, "
                f"providers {self.providers}>")

    # ---- subclasses
    def _runner(self, task: str):
        """A function NCHW float32 chunk -> logits for ``task`` (called under the lock)."""
        raise NotImplementedError

    def _session(self, path: Path, contract: bool = True):
        """An onnxruntime session on ``path``; ``contract``: check its image input and logits output."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3  # overridable initializers (multitask) are by design: no warning per session
        # None: "all" for .onnx; an ORT-format file runs at "basic", the level it is saved (and verified) at
        level = self.optimization or ("basic" if _is_ort_format(path) else "all")
        so.graph_optimization_level = _level(level)
        if self.threads:
            so.intra_op_num_threads = self.threads
        try:
            sess = ort.InferenceSession(str(path), so, providers=self.providers)
        except Exception as exc:
            raise PbexportError(f"onnxruntime cannot load this model ({_first_line(exc)})", str(path)) from None
        if not contract:
            return sess
        first = sess.get_inputs()[0]
        if first.name != self._input_name or sess.get_outputs()[0].name != self._output_name:
            raise PbexportError(f"graph input/output are {first.name!r}/{sess.get_outputs()[0].name!r}, its metadata "
                                f"says {self._input_name!r}/{self._output_name!r}", str(path))
        return sess

    def _check_shape(self, sess, task: str, path: Path) -> None:
        shape = sess.get_inputs()[0].shape
        size = self._specs[task][0].size
        want = (3, size, size)
        if len(shape) != 4 or any(isinstance(d, int) and d != w for d, w in zip(shape[1:], want, strict=True)):
            raise PbexportError(f"graph input has shape {shape}, its metadata says [N, 3, {size}, {size}]", str(path))

    _input_name = "image"
    _output_name = "logits"


def _single(images) -> bool:
    if isinstance(images, (str, os.PathLike, np.ndarray)):
        return True
    return not isinstance(images, Iterable) or type(images).__module__.startswith("PIL")


class FileEngine(Engine):
    """Baked or shared: one graph (one session) per task; an LRU cache of ``cache_size`` sessions.

    Optimization level ``all`` by default, and why not ``extended`` (where onnxruntime sessions share
    the mmapped pages of external weights): in both layouts a session's weights are its own anyway. A
    baked file holds its weights inline; a shared graph derives every weight it runs (Split of the
    external backbone array, times its unpacked mask, times its BN ratio) by constant folding at load,
    so the backbone file is read, not shared, at any level (``disable`` would redo that work on every
    run). What ``extended`` saves is the NCHWc copy of the conv weights ``all`` makes. Measured with
    tools/bench_runtime.py, shared mode, batch 1, 1 thread: ResNet-20 @32 0.50 ms (all) vs 0.86 ms
    (extended) at the same 1.4-2.6 MiB per extra session; ResNet-18 @64 3.2 vs 3.6 ms, 56-61 vs 29-41
    MiB per extra session. Memory is bounded by ``cache_size`` either way; pass
    ``optimization="extended"`` to trade ~10% latency for 30-50% less memory per cached task on large
    backbones.
    """

    def __init__(self, path: Path, files: dict[str, Path], metas: dict[str, dict], **kw):
        super().__init__(path, **kw)
        self.files = files
        modes = {m["mode"] for m in metas.values()}
        self.mode = modes.pop() if len(modes) == 1 else "mixed"
        self.backbone = next(iter(metas.values())).get("backbone", "")
        for task, meta in metas.items():
            where = str(files[task])
            self._classes[task] = _class_names(meta.get("class_names"), where)
            self._specs[task] = _meta_spec(meta, where)
            if meta.get("num_classes") not in (None, str(len(self._classes[task]))):
                raise PbexportError(f"metadata has {meta['num_classes']} classes but {len(self._classes[task])} "
                                    "class names", where)
            if meta["mode"] == "shared" and not (files[task].parent / SHARED_DATA_FILE).is_file():
                raise PbexportError(f"shared-backbone graph without its weights file {SHARED_DATA_FILE} next to it",
                                    where)
        self._sessions: OrderedDict[str, object] = OrderedDict()

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def _runner(self, task: str):
        sess = self._sessions.get(task)
        if sess is not None:
            self._sessions.move_to_end(task)
            self.stats["hits"] += 1
        else:
            while len(self._sessions) >= self.cache_size:
                self._sessions.popitem(last=False)
                self.stats["evictions"] += 1
            sess = self._session(self.files[task])
            self._check_shape(sess, task, self.files[task])
            self._sessions[task] = sess
            self.stats["loads"] += 1
        names = [self._output_name]

        def run(x):
            return sess.run(names, {self._input_name: x})[0]

        return run

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()


class MultitaskEngine(Engine):
    """Multitask: ONE session for every task; a task's tensors are fed on each run.

    ``feed="adapter"`` (default) activates the task's onnxruntime ``LoraAdapter`` through its own
    ``RunOptions``; ``feed="inputs"`` passes the task's tensors next to the image (numpy arrays on
    CPU; with CUDA, OrtValues placed on the GPU once, so nothing is copied per run). Measured with
    tools/bench_runtime.py (ResNet-20, batch 1, 1 thread, 2-core box): adapter and numpy inputs tie
    within noise, OrtValues through ``run_with_ort_values`` were 3-6% slower on CPU; adapter is the
    default because it is onnxruntime's own mechanism and ties for fastest. Either way a switch is
    picking another cached feed: nothing is rebuilt, and a switching run costs what a run on one task
    costs (bench-out/runtime.json). The ``cache_size`` most recently used tasks keep their tensors in
    memory (about 1 bit per masked weight plus the head each); older ones are re-read from their files.

    Optimization level ``all``: the masked weights are computed per run from fed tensors, so nothing of
    them is folded or shared at any level, and ``all`` measured as fast as ``extended`` or faster.

    ``feed="weights"`` unpacks once per task switch instead: loading a task runs the export's
    ``unpack.onnx`` (model.onnx up to the weights) once on its tensors, and each run then goes through
    ``body.onnx`` (the graph after the weights) with the computed weights as inputs; model.onnx is not
    loaded. A run then costs what a graph with plain weights costs; with ``--nchwc-block`` that is the
    plain backbone's speed (BENCHMARKS.md). A switch to a task not cached costs one unpack run, and each
    cached task holds a full copy of the weights.
    """

    mode = "multitask"

    def __init__(self, path: Path, index: dict, meta: dict[str, str], feed: str = "adapter", **kw):
        super().__init__(path, **kw)
        if feed not in FEEDS:
            raise PbexportError(f"unknown feed {feed!r}; choose from {', '.join(FEEDS)}")
        self.feed = feed
        self.backbone = str(index.get("backbone", meta.get("backbone", "")))
        where = str(path / MULTITASK_INDEX)
        self.model_file = path / index.get("model", "model.onnx")
        spec = _spec_from(index.get("input") or {}, where)
        inp = index.get("input") or {}
        self._input_name = inp.get("name", meta.get("input_name", "image"))
        self._output_name = index.get("output", meta.get("output_name", "logits"))
        self.adapters: dict[str, Path] = {}
        self.tensor_names: dict[str, list[str]] = {}
        for task, entry in index["tasks"].items():
            if not isinstance(entry, dict) or not isinstance(entry.get("adapter"), str):
                raise PbexportError(f"task {task!r} has no adapter entry", where)
            self._classes[task] = _class_names(entry.get("class_names"), where)
            self._specs[task] = spec
            self.adapters[task] = path / entry["adapter"]
            self.tensor_names[task] = list(entry.get("tensors", []))
        self._sess = None
        self._feeds: OrderedDict[str, object] = OrderedDict()
        self.unpack_file = self.body_file = None
        self.weight_names = list(index.get("weights") or [])
        if feed == "weights":
            if not all(isinstance(index.get(k), str) for k in ("unpack", "body")) or not self.weight_names:
                raise PbexportError("this export has no unpack and body graphs for feed='weights' (exported by an "
                                    "older pbexport: export it again, or use feed='adapter')", where)
            self.unpack_file, self.body_file = path / index["unpack"], path / index["body"]
        self._body = self._unpack = None

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._feeds)

    def session(self):
        if self._sess is None:
            sess = self._session(self.model_file)
            self._check_shape(sess, next(iter(self._specs)), self.model_file)
            self._sess = sess
            self._overridable = feed_names(sess) - {sess.get_inputs()[0].name}  # a task's tensors, not the image
            self._device = ("cuda", 0) if self._sess.get_providers()[0] == PROVIDERS["cuda"] else ("cpu", 0)
        return self._sess

    def _read_tensors(self, task: str) -> dict[str, np.ndarray]:
        """The task's adapter tensors as numpy arrays."""
        import onnxruntime as ort

        file = self.adapters[task]
        if not file.is_file():
            raise PbexportError(f"adapter of task {task!r} is missing", str(file))
        try:
            fmt = ort.AdapterFormat.read_adapter(str(file))
            # .numpy() views memory that the AdapterFormat owns: copy while it is alive
            return {k: np.array(v.numpy(), copy=True) for k, v in fmt.get_parameters().items()}
        except Exception as exc:
            raise PbexportError(f"cannot read the adapter of task {task!r} ({_first_line(exc)})", str(file)) from None

    def _on_device(self, tensors: dict[str, np.ndarray]) -> dict:
        """numpy arrays on CPU; with CUDA, OrtValues placed on the GPU once, so nothing is copied per run."""
        import onnxruntime as ort

        if self._device[0] != "cuda":
            return tensors
        return {k: ort.OrtValue.ortvalue_from_numpy(v, *self._device) for k, v in tensors.items()}

    def _weights_feed(self, task: str) -> dict:
        """The unpack graph run once on the task's tensors, as the body's feed (see :func:`weights_feed`)."""
        feed, unknown = weights_feed(self._unpack, self._body, self.weight_names, self._read_tensors(task))
        if unknown:
            raise PbexportError(f"adapter tensor {unknown[0]} is not an input of {self.unpack_file.name} or "
                                f"{self.body_file.name} ({len(unknown)} unknown)", str(self.adapters[task]))
        return self._on_device(feed)

    def _load_feed(self, task: str):
        import onnxruntime as ort

        if self.feed == "weights":
            return self._weights_feed(task)
        file = self.adapters[task]
        if self.feed == "inputs":
            params = self._read_tensors(task)
            names, feed = list(params), self._on_device(params)
        else:
            if not file.is_file():
                raise PbexportError(f"adapter of task {task!r} is missing", str(file))
            try:
                adapter = ort.LoraAdapter()
                adapter.Load(str(file))
            except Exception as exc:
                raise PbexportError(f"cannot read the adapter of task {task!r} ({_first_line(exc)})",
                                    str(file)) from None
            names = self.tensor_names[task]
            opts = ort.RunOptions()
            opts.add_active_adapter(adapter)
            feed = (adapter, opts)
        unknown = [n for n in names if n not in self._overridable]
        if unknown:
            raise PbexportError(f"adapter tensor {unknown[0]} is not an input of {self.model_file.name} "
                                f"({len(unknown)} unknown)", str(file))
        return feed

    def _weights_sessions(self):
        """feed="weights": the unpack and body graphs instead of model.onnx (which is never loaded then)."""
        if self._body is None:
            self._unpack = self._session(self.unpack_file, contract=False)  # task tensors in, weights out
            body = self._session(self.body_file)
            self._check_shape(body, next(iter(self._specs)), self.body_file)
            self._device = ("cuda", 0) if body.get_providers()[0] == PROVIDERS["cuda"] else ("cpu", 0)
            self._body = body
        return self._body

    def _runner(self, task: str):
        sess = self._weights_sessions() if self.feed == "weights" else self.session()
        feed = self._feeds.get(task)
        if feed is not None:
            self._feeds.move_to_end(task)
            self.stats["hits"] += 1
        else:
            while len(self._feeds) >= self.cache_size:
                self._feeds.popitem(last=False)
                self.stats["evictions"] += 1
            feed = self._load_feed(task)
            self._feeds[task] = feed
            self.stats["loads"] += 1
        out_names, in_name = [self._output_name], self._input_name
        if self.feed == "adapter":
            _, opts = feed

            def run(x):
                return sess.run(out_names, {in_name: x}, opts)[0]
        elif self._device[0] == "cpu":
            def run(x):
                return sess.run(out_names, {in_name: x, **feed})[0]
        else:
            import onnxruntime as ort

            def run(x):
                feeds = dict(feed)
                feeds[in_name] = ort.OrtValue.ortvalue_from_numpy(x)
                outs = sess.run_with_ort_values(out_names, feeds)
                return np.array(outs[0].numpy(), copy=True)  # a view of the OrtValue's memory otherwise

        return run

    def close(self) -> None:
        with self._lock:
            self._feeds.clear()
            self._sess = self._body = self._unpack = None


# --------------------------------------------------------------------------- opening
def open_model(path: str | Path, providers=None, cache_size: int = DEFAULT_CACHE_SIZE, *,
               batch_size: int = DEFAULT_BATCH, threads: int | None = None, optimization: str | None = None,
               feed: str = "adapter") -> Engine:
    """Open any export of ``pbexport onnx``: a task's ``.onnx``, a directory of them (baked or shared),
    or a multitask directory. Nothing heavy happens here: sessions are created on first use.

    Args:
        providers: "cpu" (default), "cuda", "auto" (CUDA when this onnxruntime has it), or a list of
            onnxruntime provider names.
        cache_size: tasks whose state stays loaded (sessions for baked/shared, tensors for multitask).
        batch_size: images per run (a fixed-batch export runs its own batch size, padded).
        threads: onnxruntime intra-op threads (None: onnxruntime's default).
        optimization: onnxruntime graph optimization level (disable, basic, extended, all); None: "all"
            for .onnx files, "basic" for ORT-format (.ort) files.
        feed: multitask only: "adapter" (default), "inputs" or "weights" (see :class:`MultitaskEngine`).
    """
    p = Path(path)
    kw = {"providers": resolve_providers(providers), "cache_size": cache_size, "batch_size": batch_size,
          "threads": threads, "optimization": optimization}
    if p.is_dir():
        if (p / MULTITASK_INDEX).exists():
            return _open_multitask(p, feed, kw)
        files = sorted(f for f in p.glob("*.onnx") if f.is_file())
        files = files or sorted(f for f in p.glob("*.ort") if f.is_file())  # ORT-format task files only
        if not files:
            raise PbexportError("no .onnx files and no tasks.json here: not a pbexport export", str(p))
        metas, by_task = {}, {}
        for f in files:
            meta = _pbexport_meta(f)
            if meta["mode"] == "multitask":
                raise PbexportError(f"a multitask graph without its {MULTITASK_INDEX} next to it", str(f))
            task = meta.get("task")
            if not task:
                raise PbexportError("pbexport metadata names no task", str(f))
            if task in by_task:
                raise PbexportError(f"task {task!r} is exported twice (also in {by_task[task].name})", str(f))
            by_task[task], metas[task] = f, meta
        return FileEngine(p, by_task, metas, **kw)
    if not p.exists():
        raise PbexportError("no such file or directory", str(p))
    meta = _pbexport_meta(p)
    if meta["mode"] == "multitask":
        if (p.parent / MULTITASK_INDEX).exists():
            return _open_multitask(p.parent, feed, kw)
        raise PbexportError(f"a multitask graph without its {MULTITASK_INDEX} next to it: open its directory", str(p))
    if not meta.get("task"):
        raise PbexportError("pbexport metadata names no task", str(p))
    return FileEngine(p, {meta["task"]: p}, {meta["task"]: meta}, **kw)


def _open_multitask(p: Path, feed: str, kw: dict) -> MultitaskEngine:
    where = str(p / MULTITASK_INDEX)
    try:
        index = json.loads((p / MULTITASK_INDEX).read_text())
    except (OSError, ValueError) as exc:
        raise PbexportError(f"cannot read the multitask index ({_first_line(exc)})", where) from None
    if not isinstance(index, dict) or index.get("format") != MULTITASK_FORMAT or not isinstance(index.get("tasks"),
                                                                                                  dict):
        raise PbexportError("not a pbexport multitask index", where)
    if index.get("format_version") not in MULTITASK_VERSIONS:
        raise PbexportError(f"multitask format version {index.get('format_version')!r} is not supported by "
                            f"pbexport {__version__} (reads {', '.join(map(str, MULTITASK_VERSIONS))})", where)
    if not index["tasks"]:
        raise PbexportError("the multitask index lists no tasks", where)
    model = p / index.get("model", "model.onnx")
    meta = _pbexport_meta(model)
    if meta["mode"] != "multitask":
        raise PbexportError(f"graph mode is {meta['mode']!r}, the index says multitask", str(model))
    if "nchwc_block" in meta:  # blocked weights for one CPU family: wrong results, or none, on another
        block = nchwc_block_size()
        if str(block) != meta["nchwc_block"]:
            found = f"block size {block}" if block else "no NCHWc kernels"
            raise PbexportError(f"graph built for onnxruntime's NCHWc block size {meta['nchwc_block']}; this "
                                f"CPU's onnxruntime has {found} (export without --nchwc-block"
                                + (f", or with --nchwc-block {block})" if block else ")"), str(model))
    return MultitaskEngine(p, index, meta, feed=feed, **kw)


# A 4-channel tensor through onnxruntime's nchwc.ReorderInput comes out padded to the block size. Built with
# onnx.helper (tests/test_nchwc.py builds it again and compares): the runtime does not need onnx.
_NCHWC_PROBE = (b'\x08\x08:Z\n)\n\x01x\x12\x01y"\x0cReorderInput:\x13com.microsoft.nchwc\x12\x05probeZ\x1b\n'
                b'\x01x\x12\x16\n\x14\x08\x01\x12\x10\n\x02\x08\x01\n\x02\x08\x04\n\x02\x08\x01\n\x02\x08\x01b\t\n\x01y\x12'
                b'\x04\n\x02\x08\x01B\x04\n\x00\x10\x11B\x17\n\x13com.microsoft.nchwc\x10\x01')


def feed_names(sess) -> set[str]:
    """What a session accepts in a feed: its inputs and its overridable initializers."""
    return {i.name for i in sess.get_inputs()} | {i.name for i in sess.get_overridable_initializers()}


def weights_feed(unpack, body, weight_names: list[str],
                 tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """feed="weights" for one task: ``unpack`` (an unpack.onnx session) run once on the task's tensors gives
    the weights ``weight_names``; the body's feed is those and the task's tensors the body reads itself (its
    head, loose BN). Returns that feed and the names of the tensors neither graph takes (unrun if any)."""
    take, wanted = feed_names(unpack), feed_names(body)
    unknown = [n for n in tensors if n not in take | wanted]
    if unknown:
        return {}, unknown
    values = unpack.run(weight_names, {k: v for k, v in tensors.items() if k in take})
    feed = {**dict(zip(weight_names, values, strict=True)), **{k: v for k, v in tensors.items() if k in wanted}}
    return feed, []


@functools.cache
def nchwc_block_size() -> int | None:
    """The channel block of onnxruntime's NCHWc CPU kernels here (16 with AVX512, 8 with AVX2), None where
    it has none: the ``--nchwc-block`` to export a multitask graph with for this machine."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(_NCHWC_PROBE, so, providers=["CPUExecutionProvider"])
        out = sess.run(None, {"x": np.zeros((1, 4, 1, 1), np.float32)})[0]
    except Exception:  # noqa: BLE001 - a build without the kernels: no block size
        return None
    return int(out.shape[1]) if out.shape[1] > 4 else None
