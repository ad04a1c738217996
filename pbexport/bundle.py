"""Bundles: one frozen backbone shared by many Piggyback tasks, in one directory (docs/FORMAT.md).

    BUNDLE/manifest.json                      backbone identity, masked-tensor table, tasks (the commit point)
    BUNDLE/backbone.safetensors               the frozen backbone's state dict, written by the first pack only
    BUNDLE/tasks/<task>.<sha12>.safetensors   per task: coded masks (by position in the manifest's
                                              masked-tensor table), head, per-task BN, classes, summary

A pack writes new task files under new names, then replaces manifest.json atomically, then deletes
what the new manifest no longer lists: killed at any point, the bundle on disk is the old one or
the new one, both complete. Writers serialize on an advisory lock of the bundle directory.

Reading the manifest and task files (load_bundle, task_info, task_masks, task_tensors,
bundle_info) needs numpy only (and zstandard for zstd-coded masks); backbone(), task_model() and
pack_runs() import torch when called.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, stfile
from .bitset import CODECS, EncodedMask, decode_mask, encode_mask, mask_entropy_bits
from .errors import PbexportError
from .fileio import atomic_write, fsync_dir
from .spec import InputSpec

BUNDLE_FORMAT = "pbexport-bundle"
TASK_FORMAT = "pbexport-task"
FORMAT_VERSION = 2  # of the manifest and the task files (docs/FORMAT.md, section 6)
MANIFEST = "manifest.json"
BACKBONE_FILE = "backbone.safetensors"
TASKS_DIR = "tasks"
PACKABLE_METHODS = ("piggyback", "classifier")
MASKS_TENSOR = "masks"   # task file tensor (U8, 1-D): every mask's coded payload, in masked-table order
BN_TENSOR = "bn"         # task file tensor (F32 [4, C]): the per-task BatchNorm modules, one row per BN_ROWS
BN_ROWS = ("weight", "bias", "running_mean", "running_var")
PARAM_PREFIX = "param/"  # task file tensor holding any other head or per-task tensor, by plain state-dict name
CHECKSUM_HEX = 16        # a task file's checksums are sha256 digests cut to their first 16 hex digits

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
_TASK_FILE_RE = re.compile(r"(?P<task>[A-Za-z0-9][A-Za-z0-9._-]{0,63})\.(?P<hash>[0-9a-f]{12})\.safetensors\Z")
_TEMP_RE = re.compile(r"\..+\.tmp\Z")  # fileio.atomic_write's temporary files
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_CHECKSUM_RE = re.compile(rf"[0-9a-f]{{{CHECKSUM_HEX}}}\Z")


# ----------------------------------------------------------------------------- names and checks
def check_task_name(name) -> str:
    """A task name is also a file name: 1-64 of [A-Za-z0-9._-], starting with a letter or digit."""
    if not (isinstance(name, str) and _NAME_RE.match(name) and not name.endswith(".")
            and name.split(".")[0].lower() not in _RESERVED):
        raise PbexportError(f"invalid task name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit")
    return name


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


class _Invalid(Exception):
    pass


def _need(cond, what: str) -> None:
    if not cond:
        raise _Invalid(what)


def _is_int(v, minimum: int = 0) -> bool:
    return type(v) is int and v >= minimum


def _is_shape(v) -> bool:
    return isinstance(v, list) and all(_is_int(d) for d in v)


def _is_number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


# ----------------------------------------------------------------------------- manifest
def validate_manifest(m) -> None:
    """Raise PbexportError (no path) unless ``m`` is a well-formed manifest of FORMAT_VERSION."""
    if not isinstance(m, dict) or m.get("format") != BUNDLE_FORMAT:
        raise PbexportError("not a pbexport bundle manifest")
    version = m.get("format_version")
    if version != FORMAT_VERSION:
        raise PbexportError(f"bundle format version {version} is not supported (this pbexport reads version "
                            f"{FORMAT_VERSION})")
    try:
        _validate_body(m)
    except _Invalid as exc:
        raise PbexportError(f"invalid manifest: {exc}") from None


def _validate_body(m: dict) -> None:
    bb = m.get("backbone")
    _need(isinstance(bb, dict), "backbone must be an object")
    _need(isinstance(bb.get("name"), str) and bb["name"], "backbone.name must be a non-empty string")
    spec = bb.get("input_spec")
    _need(isinstance(spec, dict) and _is_int(spec.get("size"), 1) and _is_int(spec.get("channels"), 1),
          "backbone.input_spec needs integer size and channels")
    for key in ("mean", "std"):
        _need(isinstance(spec.get(key), list) and len(spec[key]) == spec["channels"]
              and all(_is_number(v) for v in spec[key]), f"backbone.input_spec.{key} needs one number per channel")
    _need(all(v > 0 for v in spec["std"]), "backbone.input_spec.std must be positive")
    _need(isinstance(bb.get("fingerprint"), str) and _HEX64.match(bb["fingerprint"]),
          "backbone.fingerprint must be 64 lowercase hex digits")
    _need(isinstance(bb.get("head_name"), str) and bb["head_name"], "backbone.head_name must be a non-empty string")
    _need(bb.get("file") == BACKBONE_FILE, f"backbone.file must be {BACKBONE_FILE!r}")
    _need(_is_int(bb.get("size")), "backbone.size must be a non-negative integer")
    _need(isinstance(bb.get("sha256"), str) and _HEX64.match(bb["sha256"]), "backbone.sha256 must be 64 hex digits")
    masked = bb.get("masked")
    _need(isinstance(masked, list), "backbone.masked must be a list")
    seen: set[str] = set()
    for i, entry in enumerate(masked):
        _need(isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry["name"]
              and _is_shape(entry.get("shape")), f"backbone.masked[{i}] needs a name and a shape")
        _need(entry["name"] not in seen, f"backbone.masked lists {entry['name']!r} twice")
        seen.add(entry["name"])
    tasks = m.get("tasks")
    _need(isinstance(tasks, list), "tasks must be a list")
    names: set[str] = set()
    files: set[str] = set()
    for i, t in enumerate(tasks):
        _need(isinstance(t, dict), f"tasks[{i}] must be an object")
        name = t.get("name")
        try:
            check_task_name(name)
        except PbexportError as exc:
            raise _Invalid(f"tasks[{i}]: {exc}") from None
        _need(name.lower() not in names, f"task {name!r} is listed twice")
        names.add(name.lower())
        _need(isinstance(t.get("sha256"), str) and _HEX64.match(t["sha256"]),
              f"task {name!r}: sha256 must be 64 hex digits")
        file = t.get("file")
        match = _TASK_FILE_RE.match(file[len(TASKS_DIR) + 1:]) if isinstance(file, str) else None
        _need(isinstance(file, str) and file.startswith(TASKS_DIR + "/") and match and match["task"] == name
              and match["hash"] == t["sha256"][:12],
              f"task {name!r}: file must be {TASKS_DIR}/{name}.<first 12 hex digits of sha256>.safetensors")
        _need(file not in files, f"task {name!r}: file {file!r} is listed twice")
        files.add(file)
        _need(_is_int(t.get("size")), f"task {name!r}: size must be a non-negative integer")
        _need(t.get("method") in PACKABLE_METHODS,
              f"task {name!r}: method must be one of {', '.join(PACKABLE_METHODS)}")
        _need(isinstance(t.get("train_bn"), bool), f"task {name!r}: train_bn must be true or false")
        _need(_is_int(t.get("num_classes"), 1), f"task {name!r}: num_classes must be a positive integer")


def _read_manifest(bundle: Path) -> dict:
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise PbexportError("bundle not found" if not bundle.exists() else "not a bundle directory", str(bundle))
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PbexportError("not a pbexport bundle (no manifest.json)", str(bundle)) from None
    except OSError as exc:
        raise PbexportError(f"cannot read manifest ({exc.strerror})", str(path)) from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PbexportError(f"manifest is not valid JSON ({str(exc)[:120]})", str(path)) from None
    try:
        validate_manifest(manifest)
    except PbexportError as exc:
        raise PbexportError(str(exc), str(path)) from None
    return manifest


# ----------------------------------------------------------------------------- task files
def _checksum(*chunks: bytes) -> str:
    """A task file's checksum: the first CHECKSUM_HEX hex digits of the sha256 of ``chunks`` in order."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()[:CHECKSUM_HEX]


def _table_rows(table) -> list[tuple[str, tuple[int, ...]]]:
    """A masked-tensor table as [(name, shape)], from the manifest's [{name, shape}] or from pairs."""
    pairs = [(e["name"], e["shape"]) if isinstance(e, dict) else (e[0], e[1]) for e in table]
    return [(name, tuple(int(d) for d in shape)) for name, shape in pairs]


def table_checksum(table) -> str:
    """The checksum of a masked-tensor table, as a task file records it: its masks follow this table."""
    rows = [[name, list(shape)] for name, shape in _table_rows(table)]
    return _checksum(json.dumps(rows, separators=(",", ":"), ensure_ascii=True).encode("ascii"))


def _little_endian(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))


def _group_bn(params: dict[str, np.ndarray]) -> tuple[list[list], dict[str, np.ndarray]]:
    """Split off the BatchNorm-like modules: those with all of BN_ROWS, float32 vectors of one length C >= 1.

    Returns ([[module, C]] sorted by module name, the remaining tensors by name)."""
    found: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in params.items():
        module, _, leaf = key.rpartition(".")
        if module and leaf in BN_ROWS:
            found.setdefault(module, {})[leaf] = arr
    table, rest = [], dict(params)
    for module in sorted(found):
        rows = found[module]
        if (len(rows) == len(BN_ROWS) and all(v.dtype.kind == "f" and v.dtype.itemsize == 4 and v.ndim == 1
                                              for v in rows.values())
                and len({v.size for v in rows.values()}) == 1 and rows["weight"].size > 0):
            table.append([module, int(rows["weight"].size)])
            for leaf in BN_ROWS:
                del rest[f"{module}.{leaf}"]
    return table, rest


def default_class_names(num_classes: int) -> list[str]:
    """The names of unnamed classes ("0", "1", ...): a task file leaves them out."""
    return [str(i) for i in range(num_classes)]


def task_file_bytes(info: dict, masks: dict[str, np.ndarray] | list, params: dict[str, np.ndarray]) -> bytes:
    """Serialize one task (torch-free, deterministic: equal inputs give equal bytes).

    ``info``: name, num_classes, class_names, method, train_bn, head_name, backbone_fingerprint,
    metrics. ``masks``: bool arrays in the manifest's masked-table order (name -> mask, or
    EncodedMask values; their names and shapes make the table the file records a checksum of).
    ``params``: head and per-task BN tensors by plain state-dict name.
    """
    required = ("name", "num_classes", "class_names", "method", "train_bn", "head_name",
                "backbone_fingerprint", "metrics")
    missing = [k for k in required if k not in info]
    if missing:
        raise PbexportError(f"task info misses {', '.join(missing)}")
    items = list(masks.items()) if isinstance(masks, dict) else list(masks)
    if items and info["method"] != "piggyback":
        raise PbexportError(f"a {info['method']} task has no masks")
    encoded = [(n, m if isinstance(m, EncodedMask) else encode_mask(m)) for n, m in items]
    params = {k: _little_endian(v) for k, v in params.items()}
    bn_table, rest = _group_bn(params)
    dense = [(PARAM_PREFIX + k, v) for k, v in rest.items()]
    if bn_table:
        dense.append((BN_TENSOR, np.stack([np.concatenate([params[f"{m}.{leaf}"] for m, _ in bn_table])
                                           for leaf in BN_ROWS]).astype("<f4")))
    # widest dtypes first keeps every tensor aligned to its item size; the mask payloads (bytes) last
    dense.sort(key=lambda t: (-t[1].dtype.itemsize, t[0]))
    metadata = {
        "format": TASK_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "task": _canonical_json({k: info[k] for k in required
                                 if k != "class_names" or list(info[k]) != default_class_names(info["num_classes"])}),
        "masks": _canonical_json([[e.codec, e.ones, len(e.payload), e.sha256[:CHECKSUM_HEX]] for _, e in encoded]),
        "bn": _canonical_json(bn_table),
        "params_checksum": _checksum(*(arr.tobytes() for _, arr in dense)),
    }
    if info["method"] == "piggyback":
        metadata["masked_table"] = table_checksum([(n, e.shape) for n, e in encoded])
    tensors = list(dense)
    if encoded:
        tensors.append((MASKS_TENSOR, np.frombuffer(b"".join(e.payload for _, e in encoded), dtype=np.uint8)))
    return stfile.dumps(tensors, metadata)


@dataclass(frozen=True)
class MaskRecord:
    """One mask as a task file stores it: no name or shape, those come from the masked-tensor table."""

    codec: str
    ones: int
    payload: bytes
    checksum: str  # first CHECKSUM_HEX hex digits of the sha256 of the packed bits


@dataclass
class TaskFile:
    """A parsed, checked task file; masks stay coded until asked for.

    The file stores its masks by position in the manifest's masked-tensor table; ``bind(table)``
    checks them against it and gives them their names and shapes (``masks``, ``mask_names``).
    """

    path: Path
    info: dict
    records: list[MaskRecord]  # in masked-table order
    masked_table: str | None  # checksum of the table the masks follow (piggyback)
    params: dict[str, np.ndarray]  # head and per-task BN by plain state-dict name
    masks: list[EncodedMask] = field(default_factory=list)  # once bound, in masked-table order
    mask_names: list[str] = field(default_factory=list)
    bound: bool = False

    def table_problem(self, table) -> str | None:
        """Why the masks do not follow ``table`` (the manifest's masked-tensor table), or None."""
        if self.info["method"] != "piggyback":
            return None
        rows = _table_rows(table)
        if len(self.records) != len(rows):
            return f"{len(self.records)} masks for {len(rows)} table entries"
        if self.masked_table != table_checksum(rows):
            return f"table checksum {self.masked_table}, manifest's is {table_checksum(rows)}"
        return None

    def bind(self, table) -> TaskFile:
        problem = self.table_problem(table)
        if problem is not None:
            raise PbexportError(f"task file does not match the masked-tensor table: {problem}", str(self.path))
        rows = _table_rows(table) if self.info["method"] == "piggyback" else []
        self.mask_names = [name for name, _ in rows]
        self.masks = [EncodedMask(r.codec, r.payload, shape, r.ones, r.checksum)
                      for r, (_, shape) in zip(self.records, rows, strict=True)]
        self.bound = True
        return self

    def decode_masks(self) -> dict[str, np.ndarray]:
        if not self.bound:
            raise PbexportError("task file's masks are not bound to a masked-tensor table", str(self.path))
        out = {}
        for name, enc in zip(self.mask_names, self.masks, strict=True):
            try:
                out[name] = decode_mask(enc.codec, enc.payload, enc.shape, enc.sha256, enc.ones)
            except PbexportError as exc:
                raise PbexportError(f"mask {name}: {exc}", str(self.path)) from None
        return out


def _json_field(metadata: dict, key: str, kind: type, path: Path):
    try:
        value = json.loads(metadata[key])
    except KeyError:
        raise PbexportError(f"task file has no {key!r} metadata", str(path)) from None
    except ValueError:
        raise PbexportError(f"task file's {key!r} metadata is not valid JSON", str(path)) from None
    if not isinstance(value, kind):
        raise PbexportError(f"task file's {key!r} metadata must be a JSON {kind.__name__}", str(path))
    return value


def _is_checksum(v) -> bool:
    return isinstance(v, str) and _CHECKSUM_RE.match(v) is not None


def parse_task_file(data: bytes, path: str | Path, masked=None) -> TaskFile:
    """Parse and check a task file's bytes on their own (the manifest checks come on top).

    ``masked``: the masked-tensor table to bind the masks to (see TaskFile.bind); None leaves them unbound.
    """
    path = Path(path)
    tensors, metadata = stfile.loads(data, str(path))
    if metadata.get("format") != TASK_FORMAT:
        raise PbexportError("not a pbexport task file", str(path))
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise PbexportError(f"task file format version {metadata.get('format_version')} is not supported "
                            f"(this pbexport reads version {FORMAT_VERSION})", str(path))
    info = _json_field(metadata, "task", dict, path)
    mask_meta = _json_field(metadata, "masks", list, path)
    bn_meta = _json_field(metadata, "bn", list, path)
    try:
        _need(isinstance(info.get("name"), str), "task name must be a string")
        _need(_is_int(info.get("num_classes"), 1), "num_classes must be a positive integer")
        info.setdefault("class_names", default_class_names(info["num_classes"]))  # absent: the labels' digits
        _need(isinstance(info["class_names"], list) and len(info["class_names"]) == info["num_classes"]
              and all(isinstance(c, str) for c in info["class_names"]), "class_names must be num_classes strings")
        _need(info.get("method") in PACKABLE_METHODS, f"method must be one of {', '.join(PACKABLE_METHODS)}")
        _need(isinstance(info.get("train_bn"), bool), "train_bn must be true or false")
        _need(isinstance(info.get("head_name"), str), "head_name must be a string")
        _need(isinstance(info.get("backbone_fingerprint"), str), "backbone_fingerprint must be a string")
        _need(isinstance(info.get("metrics"), dict), "metrics must be an object")
        piggyback = info["method"] == "piggyback"
        _need(piggyback or not mask_meta, "a classifier task holds masks")
        masked_table = metadata.get("masked_table") if piggyback else None
        _need(not piggyback or _is_checksum(masked_table), f"masked_table must be {CHECKSUM_HEX} hex digits")
        _need(_checksum(*(a.tobytes() for k, a in tensors.items() if k != MASKS_TENSOR))  # in data order
              == metadata.get("params_checksum"), "params do not match params_checksum")
        # masks: [codec, ones, nbytes, checksum] each, payloads back to back in tensor "masks"
        for i, e in enumerate(mask_meta):
            _need(isinstance(e, list) and len(e) == 4 and isinstance(e[0], str) and _is_int(e[1])
                  and _is_int(e[2]) and _is_checksum(e[3]), f"masks[{i}] must be [codec, ones, nbytes, checksum]")
            _need(e[0] in CODECS, f"masks[{i}] has unknown codec {e[0]!r} (known: {', '.join(CODECS)})")
        records = []
        if mask_meta:
            payloads = tensors.get(MASKS_TENSOR)
            _need(payloads is not None and payloads.dtype == np.uint8 and payloads.ndim == 1,
                  f"masks need a 1-D U8 tensor {MASKS_TENSOR!r}")
            total = sum(e[2] for e in mask_meta)
            _need(payloads.size == total, f"tensor {MASKS_TENSOR!r} has {payloads.size} bytes, the masks take {total}")
            raw, pos = payloads.tobytes(), 0
            for codec, ones, nbytes, checksum in mask_meta:
                records.append(MaskRecord(codec, ones, raw[pos:pos + nbytes], checksum))
                pos += nbytes
        # per-task BN: [module, channels] each, columns of tensor "bn" (rows BN_ROWS)
        params: dict[str, np.ndarray] = {}
        for i, e in enumerate(bn_meta):
            _need(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and e[0] and _is_int(e[1], 1),
                  f"bn[{i}] must be [module, channels]")
        if bn_meta:
            channels = sum(e[1] for e in bn_meta)
            bn = tensors.get(BN_TENSOR)
            _need(bn is not None and bn.dtype == np.dtype("<f4") and bn.shape == (len(BN_ROWS), channels),
                  f"bn needs an F32 tensor {BN_TENSOR!r} of shape [{len(BN_ROWS)}, {channels}]")
            begin = 0
            for module, c in bn_meta:
                for row, leaf in enumerate(BN_ROWS):
                    _need(f"{module}.{leaf}" not in params, f"bn lists {module!r} twice")
                    params[f"{module}.{leaf}"] = bn[row, begin:begin + c]
                begin += c
        for name, arr in tensors.items():  # in data order
            if name.startswith(PARAM_PREFIX):
                key = name[len(PARAM_PREFIX):]
                _need(key not in params, f"{key} is stored twice")
                params[key] = arr
        known = {MASKS_TENSOR} if mask_meta else set()
        known |= {BN_TENSOR} if bn_meta else set()
        extra = {k for k in tensors if not k.startswith(PARAM_PREFIX)} - known
        _need(not extra, f"unexpected tensors {sorted(extra)[:3]}")
    except _Invalid as exc:
        raise PbexportError(f"invalid task file: {exc}", str(path)) from None
    tf = TaskFile(path, info, records, masked_table, params)
    return tf.bind(masked) if masked is not None else tf


# ----------------------------------------------------------------------------- the bundle
class Bundle:
    """A loaded, validated bundle. Task files are read (and checked) on first use, then cached."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._entries = {t["name"]: t for t in manifest["tasks"]}
        self._files: dict[str, TaskFile] = {}
        self._backbone = None

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, backbone={self.backbone_name!r}, tasks={self.tasks})"

    @property
    def tasks(self) -> list[str]:
        return [t["name"] for t in self.manifest["tasks"]]

    @property
    def backbone_name(self) -> str:
        return self.manifest["backbone"]["name"]

    @property
    def spec(self) -> InputSpec:
        return InputSpec.from_dict(self.manifest["backbone"]["input_spec"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["backbone"]["fingerprint"]

    @property
    def masked_names(self) -> list[str]:
        return [e["name"] for e in self.manifest["backbone"]["masked"]]

    @property
    def masked_shapes(self) -> dict[str, tuple[int, ...]]:
        return {e["name"]: tuple(e["shape"]) for e in self.manifest["backbone"]["masked"]}

    def task_entry(self, task: str) -> dict:
        try:
            return self._entries[task]
        except KeyError:
            have = f"bundle has: {', '.join(self.tasks)}" if self.tasks else "bundle has no tasks"
            raise PbexportError(f"unknown task {task!r} ({have})", str(self.path)) from None

    def task_path(self, task: str) -> Path:
        return self.path / self.task_entry(task)["file"]

    def task_file(self, task: str) -> TaskFile:
        """The checked task file: size and sha256 against the manifest, then its own structure."""
        if task in self._files:
            return self._files[task]
        entry = self.task_entry(task)
        path = self.path / entry["file"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise PbexportError("task file is missing (the manifest lists it)", str(path)) from None
        except OSError as exc:
            raise PbexportError(f"cannot read task file ({exc.strerror})", str(path)) from None
        if len(data) != entry["size"]:
            raise PbexportError(f"task file is {len(data)} bytes, the manifest says {entry['size']} "
                                "(truncated or replaced)", str(path))
        if _sha256(data) != entry["sha256"]:
            raise PbexportError("task file is corrupt or was modified (sha256 does not match the manifest)",
                                str(path))
        tf = parse_task_file(data, path)
        self._check_against_manifest(tf, entry)
        tf.bind(self.manifest["backbone"]["masked"])
        self._files[task] = tf
        return tf

    def _check_against_manifest(self, tf: TaskFile, entry: dict) -> None:
        info, bb = tf.info, self.manifest["backbone"]
        problems = [f"{key} {info[key]!r}, manifest says {entry[key]!r}"
                    for key in ("name", "method", "train_bn", "num_classes") if info[key] != entry[key]]
        if info["backbone_fingerprint"] != bb["fingerprint"]:
            problems.append(f"backbone fingerprint {info['backbone_fingerprint'][:12]}, manifest says "
                            f"{bb['fingerprint'][:12]}")
        if info["head_name"] != bb["head_name"]:
            problems.append(f"head {info['head_name']!r}, manifest says {bb['head_name']!r}")
        table = tf.table_problem(bb["masked"])
        if table is not None:
            problems.append(f"masks do not follow the manifest's masked-tensor table ({table})")
        if problems:
            raise PbexportError("task file does not match the manifest: " + "; ".join(problems), str(tf.path))

    def task_info(self, task: str) -> dict:
        info = self.task_file(task).info
        return {"num_classes": info["num_classes"], "class_names": list(info["class_names"]),
                "method": info["method"], "train_bn": info["train_bn"], "head_name": info["head_name"],
                "metrics": json.loads(json.dumps(info["metrics"]))}

    def task_masks(self, task: str) -> dict[str, np.ndarray]:
        return self.task_file(task).decode_masks()

    def task_tensors(self, task: str) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.task_file(task).params.items()}

    # ------------------------------------------------------------------------- torch side
    def backbone(self):
        """The frozen backbone (shared by every task model of this Bundle object; do not modify it)."""
        if self._backbone is None:
            from .backbones import load_backbone

            bb = self.manifest["backbone"]
            path = self.path / BACKBONE_FILE
            if not path.is_file():
                raise PbexportError("backbone file is missing (the manifest lists it)", str(path))
            if path.stat().st_size != bb["size"] or _file_sha256(path) != bb["sha256"]:
                raise PbexportError("backbone file is corrupt or was modified (size or sha256 does not match "
                                    "the manifest)", str(path))
            backbone = load_backbone(bb["name"], path, input_size=self.spec.size)
            if backbone.fingerprint != bb["fingerprint"]:
                raise PbexportError(f"backbone fingerprint {backbone.fingerprint[:12]} does not match the "
                                    f"manifest's {bb['fingerprint'][:12]}", str(path))
            backbone.spec = self.spec
            self._backbone = backbone
        return self._backbone

    def task_model(self, task: str):
        """The task's eval-mode TaskModel: logits bitwise identical to the packed run's model."""
        import torch

        from . import masking
        from .taskmodel import SCORES_PREFIX, build_task_model

        info, path = self.task_info(task), self.task_path(task)
        model = build_task_model(self.backbone(), info["num_classes"], info["method"], info["train_bn"])
        if model.head_name != info["head_name"]:
            raise PbexportError(f"task head {info['head_name']!r} is not the backbone's classifier "
                                f"{model.head_name!r}", str(path))
        if info["method"] == "piggyback":
            try:
                masking.set_binary_masks(model.net, {k: torch.from_numpy(v) for k, v in self.task_masks(task).items()})
            except ValueError as exc:
                raise PbexportError(f"masks do not fit the backbone ({exc})", str(path)) from None
        tensors = self.task_tensors(task)
        expected = {k for k in model.task_state() if not k.startswith(SCORES_PREFIX)}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise PbexportError(f"task tensors do not fit the model (missing {missing[:3]}, unexpected "
                                f"{extra[:3]})", str(path))
        own = model.net.state_dict(keep_vars=True)
        with torch.no_grad():
            for key, value in tensors.items():
                t = torch.from_numpy(value)
                if t.shape != own[key].shape or t.dtype != own[key].dtype:
                    raise PbexportError(f"{key} is {t.dtype} {list(t.shape)}, the model needs "
                                        f"{own[key].dtype} {list(own[key].shape)}", str(path))
                own[key].data.copy_(t)
        return model.eval()

    # ------------------------------------------------------------------------- report
    def info(self) -> dict:
        return bundle_info(self)


def load_bundle(path: str | Path) -> Bundle:
    """Open a bundle: the manifest is validated now (format, version, structure, files present with
    their recorded sizes); each task file is checked (sha256, per-tensor checksums) when first read."""
    bundle = Path(path)
    manifest = _read_manifest(bundle)
    bb_path = bundle / BACKBONE_FILE
    if not bb_path.is_file():
        raise PbexportError("backbone file is missing (the manifest lists it)", str(bb_path))
    if bb_path.stat().st_size != manifest["backbone"]["size"]:
        raise PbexportError(f"backbone file is {bb_path.stat().st_size} bytes, the manifest says "
                            f"{manifest['backbone']['size']}", str(bb_path))
    for entry in manifest["tasks"]:
        tpath = bundle / entry["file"]
        if not tpath.is_file():
            raise PbexportError("task file is missing (the manifest lists it)", str(tpath))
    return Bundle(bundle, manifest)


# ----------------------------------------------------------------------------- info
def _layer_stats(n: int, ones: int, stored_bytes: int, entropy_bits: float) -> dict:
    return {"params": n, "ones": ones, "density": ones / n if n else None, "stored_bytes": stored_bytes,
            "stored_bits_per_param": 8 * stored_bytes / n if n else None,
            "entropy_bits_per_param": entropy_bits / n if n else None}


def bundle_info(bundle: Bundle) -> dict:
    """Everything `pbexport info` shows, computed from the stored files (masks are decoded)."""
    bb = bundle.manifest["backbone"]
    masked_params = sum(math.prod(e["shape"]) for e in bb["masked"])
    out = {
        "path": str(bundle.path), "format_version": bundle.manifest["format_version"],
        "backbone": {"name": bb["name"], "input_spec": bb["input_spec"], "fingerprint": bb["fingerprint"],
                     "head_name": bb["head_name"], "file": bb["file"], "size": bb["size"],
                     "masked_tensors": len(bb["masked"]), "masked_params": masked_params},
        "manifest_size": (bundle.path / MANIFEST).stat().st_size,
        "tasks": {},
    }
    for task in bundle.tasks:
        entry, tf = bundle.task_entry(task), bundle.task_file(task)
        decoded = tf.decode_masks()
        layers, entropy = [], 0.0
        for name, enc in zip(tf.mask_names, tf.masks, strict=True):
            bits = mask_entropy_bits(decoded[name])  # n * H(density of this tensor), from the decoded mask
            entropy += bits
            layers.append({"name": name, "codec": enc.codec,
                           **_layer_stats(decoded[name].size, int(np.count_nonzero(decoded[name])),
                                          len(enc.payload), bits)})
        n = sum(layer["params"] for layer in layers)
        ones = sum(layer["ones"] for layer in layers)
        stored = sum(layer["stored_bytes"] for layer in layers)
        totals = _layer_stats(n, ones, stored, entropy)
        out["tasks"][task] = {
            "file": entry["file"], "size": entry["size"], "method": tf.info["method"],
            "train_bn": tf.info["train_bn"], "num_classes": tf.info["num_classes"],
            "class_names": tf.info["class_names"], "metrics": tf.info["metrics"],
            "masked_params": n, "mask_bytes": stored,
            "param_bytes": sum(v.nbytes for v in tf.params.values()),
            "density": totals["density"], "stored_bits_per_param": totals["stored_bits_per_param"],
            "entropy_bits_per_param": totals["entropy_bits_per_param"],
            "layers": layers,
        }
    out["total_size"] = bb["size"] + out["manifest_size"] + sum(t["size"] for t in out["tasks"].values())
    return out


def plot_densities(info: dict, path: str | Path) -> None:
    """Per-layer mask density of every masked task (the paper's figure), as a PNG."""
    tasks = {name: t for name, t in info["tasks"].items() if t["layers"]}
    if not tasks:
        raise PbexportError("no task in the bundle has masks to plot", info["path"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [layer["name"] for layer in next(iter(tasks.values()))["layers"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(layers) + 2.0), 4.5))
    lowest = 1.0
    for name, t in tasks.items():
        density = [layer["density"] if layer["density"] is not None else float("nan") for layer in t["layers"]]
        lowest = min([lowest, *(d for d in density if d == d)])
        ax.plot(range(len(density)), density, marker="o", markersize=3, label=f"{name} ({t['density']:.3f})")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([n.removesuffix(".weight") for n in layers], rotation=90, fontsize=7)
    ax.set_ylim(max(0.0, lowest - 0.05 * (1.0 - lowest) - 0.01), 1.005)
    ax.set_ylabel("mask density (fraction of weights kept)")
    ax.set_title(f"Piggyback masks per layer: {info['backbone']['name']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- writing
def _public_mode() -> int:
    """0666 less the umask: a bundle is meant to be shipped (mkstemp alone gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


CRASH_ENV = "PBEXPORT_TEST_CRASH_AT"  # tests only: a writer SIGKILLs itself at the named step


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step and hasattr(signal, "SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)


def _write_public(path: Path, data: bytes, step: str) -> None:
    def write(tmp: Path) -> None:
        if os.environ.get(CRASH_ENV) == f"{step}-partial":
            tmp.write_bytes(data[: len(data) // 2])
            _crash_point(f"{step}-partial")
        tmp.write_bytes(data)
        os.chmod(tmp, _public_mode())

    atomic_write(path, write)
    _crash_point(f"{step}-written")


def manifest_text(manifest: dict) -> str:
    """Indented JSON, but one line per masked tensor and per task (the table is long, the rows short)."""
    rows = {"masked": manifest["backbone"]["masked"], "tasks": manifest["tasks"]}
    marks = {key: f"@@{key}@@" for key in rows}
    shell = dict(manifest, backbone=dict(manifest["backbone"], masked=marks["masked"]), tasks=marks["tasks"])
    text = json.dumps(shell, indent=2)
    for key, items in rows.items():
        pad = " " * (6 if key == "masked" else 4)
        body = ",\n".join(pad + json.dumps(item, separators=(", ", ": ")) for item in items)
        text = text.replace(json.dumps(marks[key]), f"[\n{body}\n{pad[:-2]}]" if items else "[]")
    return text + "\n"


def _write_manifest(bundle: Path, manifest: dict) -> None:
    _write_public(bundle / MANIFEST, manifest_text(manifest).encode(), "manifest")


@contextlib.contextmanager
def _locked(bundle: Path):
    """Exclusive advisory lock on the bundle directory for the whole update (released on kill)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): concurrent writers are not serialized
        yield
        return
    fd = os.open(bundle, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _ours(bundle: Path, referenced: set[str]) -> list[Path]:
    """Files a writer of this format may delete: unreferenced task files and leftover temporaries."""
    out = [p for p in bundle.iterdir() if p.is_file() and _TEMP_RE.match(p.name)]
    tasks = bundle / TASKS_DIR
    if tasks.is_dir():
        for p in tasks.iterdir():
            rel = f"{TASKS_DIR}/{p.name}"
            if p.is_file() and (_TEMP_RE.match(p.name) or (_TASK_FILE_RE.match(p.name) and rel not in referenced)):
                out.append(p)
    return out


def _collect_garbage(bundle: Path, manifest: dict | None) -> None:
    referenced = {t["file"] for t in manifest["tasks"]} if manifest else set()
    removed = False
    for p in _ours(bundle, referenced):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed = True
            _crash_point("gc")
    if removed and (bundle / TASKS_DIR).is_dir():
        fsync_dir(bundle / TASKS_DIR)


def _manifest_for_update(bundle: Path) -> dict | None:
    """The current manifest, or None for a new bundle (an empty directory or a first pack's leftovers)."""
    if (bundle / MANIFEST).exists():
        return _read_manifest(bundle)
    leftovers = {BACKBONE_FILE, TASKS_DIR}
    foreign = [p.name for p in bundle.iterdir() if p.name not in leftovers and not _TEMP_RE.match(p.name)]
    tasks = bundle / TASKS_DIR
    if tasks.is_dir():
        foreign += [f"{TASKS_DIR}/{p.name}" for p in tasks.iterdir()
                    if not (_TASK_FILE_RE.match(p.name) or _TEMP_RE.match(p.name))]
    elif tasks.exists():
        foreign.append(TASKS_DIR)
    if foreign:
        raise PbexportError(f"exists, is not empty and is not a pbexport bundle (no manifest.json; found "
                            f"{sorted(foreign)[0]})", str(bundle))
    return None


@dataclass
class _Plan:
    run: Path
    info: dict  # the run's config.json
    name: str

    @property
    def backbone(self) -> dict:
        return self.info["backbone"]


def _plan(run_dir: Path, name: str | None) -> _Plan:
    from .runs import RunDir

    info = RunDir(run_dir).info()
    method = info["config"]["method"]
    if method == "finetune":
        raise PbexportError("a finetune run changes the backbone's weights and cannot share a frozen backbone; "
                            "only piggyback and classifier runs can be packed", str(run_dir))
    if method not in PACKABLE_METHODS:
        raise PbexportError(f"cannot pack a {method!r} run", str(run_dir))
    if not (run_dir / "model.safetensors").exists():
        raise PbexportError("run has not finished (no model.safetensors); continue it with "
                            "`pbexport train ... --resume`", str(run_dir))
    return _Plan(run_dir, info, check_task_name(name if name is not None else info["task"]["name"]))


def _check_backbone(plan: _Plan, bb: dict, against: str) -> None:
    """Refuse a run whose backbone (fingerprint, name, input spec) differs from ``bb``."""
    mine = plan.backbone
    if mine["fingerprint"] != bb["fingerprint"] or mine["name"] != bb["name"]:
        raise PbexportError(f"run was trained on another backbone ({mine['name']} {mine['fingerprint'][:12]}) "
                            f"than {against} ({bb['name']} {bb['fingerprint'][:12]})", str(plan.run))
    if InputSpec.from_dict(mine["input_spec"]) != InputSpec.from_dict(bb["input_spec"]):
        raise PbexportError(f"run was trained with input spec {mine['input_spec']}, {against} takes "
                            f"{bb['input_spec']}", str(plan.run))


def _write_backbone_file(path: Path, backbone) -> tuple[int, str]:
    import torch

    tensors = []
    for key, value in backbone.model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        t = value.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            tensors.append((key, t.view(torch.int16).numpy(), "BF16"))
        else:
            tensors.append((key, t.numpy()))
    metadata = {"format": "pbexport-backbone", "format_version": str(FORMAT_VERSION),
                "name": backbone.name, "fingerprint": backbone.fingerprint}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            stfile.dump(f, tensors, metadata)
        _crash_point("backbone-partial")
        os.chmod(tmp, _public_mode())

    atomic_write(path, write)
    _crash_point("backbone-written")
    return path.stat().st_size, _file_sha256(path)


def _masked_table(backbone) -> tuple[str, list[dict]]:
    from .backbones import classifier_name
    from .masking import maskable_names

    head = classifier_name(backbone.model)
    params = dict(backbone.model.named_parameters())
    return head, [{"name": n, "shape": list(params[n].shape)} for n in maskable_names(backbone.model, exclude=head)]


def _task_bytes(plan: _Plan, backbone, manifest_bb: dict) -> bytes:
    """Rebuild the run's model on ``backbone`` and serialize what the task adds to it."""
    from . import masking
    from .runs import RunDir
    from .taskmodel import SCORES_PREFIX, build_task_model

    run = RunDir(plan.run)
    cfg, task = run.config(), plan.info["task"]
    model = build_task_model(backbone, task["num_classes"], cfg.method, cfg.train_bn, cfg.seed)
    model.load_task_state(run.final_state(), str(plan.run / "model.safetensors"))
    found = {k: v.cpu().numpy() for k, v in masking.binary_masks(model.net).items()}
    masks = {}
    if cfg.method == "piggyback":
        table = {e["name"]: tuple(e["shape"]) for e in manifest_bb["masked"]}
        if {k: v.shape for k, v in found.items()} != table:
            raise PbexportError("the run's masks do not fit the bundle's masked-tensor table", str(plan.run))
        masks = {k: found[k] for k in table}  # in table order
    params = {k: v.cpu().numpy() for k, v in model.task_state().items() if not k.startswith(SCORES_PREFIX)}
    metrics = run.metrics() if (plan.run / "metrics.json").exists() else {}
    summary = {k: metrics.get(k) for k in ("test_accuracy", "val_accuracy", "best_epoch", "mask_density")}
    summary["epochs"] = len(metrics.get("epochs", []))
    info = {"name": plan.name, "num_classes": task["num_classes"], "class_names": list(task["class_names"]),
            "method": cfg.method, "train_bn": bool(cfg.train_bn), "head_name": model.head_name,
            "backbone_fingerprint": manifest_bb["fingerprint"], "metrics": summary}
    return task_file_bytes(info, masks, params)


def _commit_task(bundle: Path, plan: _Plan, data: bytes) -> dict:
    digest = _sha256(data)
    rel = f"{TASKS_DIR}/{plan.name}.{digest[:12]}.safetensors"
    (bundle / TASKS_DIR).mkdir(exist_ok=True)
    _write_public(bundle / rel, data, "task")
    cfg = plan.info["config"]
    return {"name": plan.name, "file": rel, "size": len(data), "sha256": digest, "method": cfg["method"],
            "train_bn": bool(cfg["train_bn"]), "num_classes": plan.info["task"]["num_classes"]}


def pack_runs(run_dirs, bundle_path, *, replace: bool = False, name: str | None = None,
              weights: str | Path | None = None) -> list[str]:
    """Pack finished runs into a bundle, creating it or adding to it; return the packed task names.

    All runs are checked before anything is written, and they all land in one manifest update.
    ``weights`` says where the backbone weights are when the first pack creates the bundle and they
    moved since training (later packs rebuild runs on the bundle's own backbone file).
    """
    runs = [Path(r) for r in run_dirs]
    if not runs:
        raise PbexportError("no run directories to pack")
    if name is not None and len(runs) != 1:
        raise PbexportError(f"--name renames one run, got {len(runs)} run directories")
    plans = [_plan(r, name) for r in runs]
    seen: dict[str, Path] = {}
    for p in plans:
        if p.name.lower() in seen:
            raise PbexportError(f"two runs would both be packed as task {p.name!r} ({seen[p.name.lower()]} and "
                                f"{p.run}); use --name", str(p.run))
        seen[p.name.lower()] = p.run
    for p in plans[1:]:
        _check_backbone(p, plans[0].backbone, f"run {plans[0].run}")
    bundle = Path(bundle_path)
    if bundle.exists() and not bundle.is_dir():
        raise PbexportError("exists and is not a bundle directory", str(bundle))
    created = not bundle.exists()
    bundle.mkdir(parents=True, exist_ok=True)
    with _locked(bundle):
        try:
            manifest = _manifest_for_update(bundle)
            return _pack_locked(bundle, manifest, plans, replace, weights)
        except BaseException:
            if created and not (bundle / MANIFEST).exists():
                _discard(bundle)
            raise


def _pack_locked(bundle: Path, manifest: dict | None, plans: list[_Plan], replace: bool, weights) -> list[str]:
    from .backbones import load_backbone

    if manifest is not None:
        for p in plans:
            _check_backbone(p, manifest["backbone"], "the bundle's")
        existing = {t["name"].lower(): t["name"] for t in manifest["tasks"]}
        for p in plans:
            other = existing.get(p.name.lower())
            if other == p.name and not replace:
                raise PbexportError(f"task {p.name!r} is already in the bundle (use --replace to overwrite it)",
                                    str(bundle))
            if other is not None and other != p.name:
                raise PbexportError(f"task name {p.name!r} differs from existing task {other!r} only in case",
                                    str(bundle))
        backbone = Bundle(bundle, manifest).backbone()
    else:
        first = plans[0]
        cfg = first.info["config"]
        source = weights if weights is not None else first.backbone["weights"]
        backbone = load_backbone(first.backbone["name"], source, cfg.get("input_size"))
        if backbone.fingerprint != first.backbone["fingerprint"]:
            raise PbexportError(f"backbone weights {source} do not match the ones this run was trained on "
                                f"(fingerprint {backbone.fingerprint[:12]} != {first.backbone['fingerprint'][:12]})",
                                str(first.run))
        backbone.spec = InputSpec.from_dict(first.backbone["input_spec"])
        head, table = _masked_table(backbone)
        size, digest = _write_backbone_file(bundle / BACKBONE_FILE, backbone)
        manifest = {
            "format": BUNDLE_FORMAT, "format_version": FORMAT_VERSION, "pbexport_version": __version__,
            "backbone": {"name": backbone.name, "input_spec": backbone.spec.to_dict(),
                         "fingerprint": backbone.fingerprint, "head_name": head, "file": BACKBONE_FILE,
                         "size": size, "sha256": digest, "masked": table},
            "tasks": [],
        }
    entries = [_commit_task(bundle, p, _task_bytes(p, backbone, manifest["backbone"])) for p in plans]
    tasks = list(manifest["tasks"])
    for entry in entries:
        index = next((i for i, t in enumerate(tasks) if t["name"] == entry["name"]), None)
        if index is None:
            tasks.append(entry)
        else:
            tasks[index] = entry  # a replaced task keeps its place
    new = json.loads(json.dumps(dict(manifest, tasks=tasks, pbexport_version=__version__)))  # as it will be read
    validate_manifest(new)
    _write_manifest(bundle, new)  # the commit point
    _collect_garbage(bundle, new)
    return [p.name for p in plans]


def _discard(bundle: Path) -> None:
    """Undo a failed first pack: remove what it wrote, and the directory if it is then empty."""
    _collect_garbage(bundle, None)
    with contextlib.suppress(OSError):
        (bundle / BACKBONE_FILE).unlink()
    for d in (bundle / TASKS_DIR, bundle):
        with contextlib.suppress(OSError):
            d.rmdir()


def remove_task(bundle_path, task: str) -> None:
    """Remove ``task`` from the bundle (manifest first, then its file)."""
    bundle = Path(bundle_path)
    _read_manifest(bundle)
    with _locked(bundle):
        manifest = _read_manifest(bundle)
        Bundle(bundle, manifest).task_entry(task)  # unknown task -> error
        new = dict(manifest, tasks=[t for t in manifest["tasks"] if t["name"] != task])
        _write_manifest(bundle, new)
        _collect_garbage(bundle, new)
