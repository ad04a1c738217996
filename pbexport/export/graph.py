"""ONNX plumbing shared by the three export modes: the one torch export, and graph-editing helpers.

The plain backbone is exported once (``export_base``) with the TorchScript exporter in
``TrainingMode.PRESERVE``: unlike an eval-mode export it keeps every BatchNormalization node
(the eval-mode exporters fold BN into the conv weights, and the dynamo optimizer does so while
keeping the weight's name), and its initializers carry the module's parameter names. The
exporter's de-duplication of equal initializers is undone, and every initializer that holds a
parameter or BN buffer is renamed to its plain state-dict name (``layer1.0.conv1.weight``), so the
modes can find, replace or re-wire it by name. An initializer that constant folding transposed
(``nn.Linear`` on 3-D inputs) is found by value and recorded as transposed.

Masks are unpacked in-graph with a [256, 8] float lookup table (row b holds the bits of byte b,
least significant first: ``bitset.BIT_ORDER``) built from six small constants:
Cast(uint8 -> int64) -> Gather(table) -> Reshape -> Mul. Every op used here has a CUDA kernel.
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import PbexportError
from ..spec import InputSpec

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
MIN_OPSET = 13  # Split and Unsqueeze take their sizes/axes as inputs from opset 13 on
BATCH_DIM = "batch"
CLASSES_DIM = "classes"

# Attributes equal to the operator's default are dropped from the small per-task graphs.
_OPTIONAL_ATTRS = {"Conv": ("kernel_shape",)}  # inferred from the weight when absent
_DEFAULT_ATTRS = {
    "Conv": {"group": 1},
    "BatchNormalization": {"epsilon": 1e-5, "momentum": 0.9, "training_mode": 0},
    "Gemm": {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0},
    "MaxPool": {"ceil_mode": 0, "storage_order": 0},
    "AveragePool": {"ceil_mode": 0, "count_include_pad": 0},
}
_ALL_ONES = {"Conv": ("dilations", "strides"), "MaxPool": ("dilations", "strides"), "AveragePool": ("strides",)}
_ALL_ZEROS = {"Conv": ("pads",), "MaxPool": ("pads",), "AveragePool": ("pads",)}


@dataclass
class BaseGraph:
    """The plain backbone (original classifier) as an ONNX model with plain initializer names."""

    model: onnx.ModelProto
    backbone_name: str
    fingerprint: str
    spec: InputSpec  # at the exported input size
    batch: int | None  # None: dynamic batch axis
    head_name: str
    masked: list[str]  # plain names of the masked weights, in the bundle's order
    transposed: set[str] = field(default_factory=set)  # stored as the transpose of the torch tensor
    eps: dict[str, float] = field(default_factory=dict)  # BN module name -> epsilon

    def initializers(self) -> dict[str, TensorProto]:
        return {t.name: t for t in self.model.graph.initializer}

    def array(self, name: str) -> np.ndarray:
        """The backbone's tensor ``name`` as stored in the graph (graph layout)."""
        return numpy_helper.to_array(self.initializers()[name])

    def to_graph_layout(self, name: str, value: np.ndarray) -> np.ndarray:
        """A tensor in torch layout (e.g. a mask, a task's head) as the graph stores it."""
        value = np.asarray(value)
        return np.ascontiguousarray(value.T) if name in self.transposed else value

    def head_tensors(self) -> list[str]:
        inits = self.initializers()
        return [n for n in (f"{self.head_name}.weight", f"{self.head_name}.bias") if n in inits]

    def require(self, names) -> None:
        inits = self.initializers()
        missing = [n for n in names if n not in inits]
        if missing:
            raise PbexportError(f"cannot find {missing[0]} in the ONNX export of {self.backbone_name} "
                                f"({len(missing)} tensors missing); this architecture is not supported by the "
                                "ONNX export yet")


# --------------------------------------------------------------------------- the one torch export
def export_base(backbone, masked: list[str], *, opset: int = DEFAULT_OPSET, batch: int | None = None,
                input_size: int | None = None) -> BaseGraph:
    """Export ``backbone`` (a backbones.Backbone: plain network, original classifier) once.

    The graph takes ``image`` (float32 NCHW RGB in [0, 1]) and normalizes it inside, exactly like
    TaskModel; its output ``logits`` has the backbone's own classes until a mode swaps the head.
    """
    import torch

    from .. import masking
    from ..backbones import classifier_name
    from ..taskmodel import TaskModel

    if not MIN_OPSET <= opset <= _max_opset():
        raise PbexportError(f"--opset {opset} is not supported (choose {MIN_OPSET} to {_max_opset()})")
    if batch is not None and batch < 1:
        raise PbexportError(f"--batch must be at least 1, got {batch}")
    spec = backbone.spec if input_size is None else replace(backbone.spec, size=int(input_size))
    if spec.size < 1:
        raise PbexportError(f"--input-size must be at least 1, got {spec.size}")
    net = copy.deepcopy(backbone.model).eval()
    head = classifier_name(net)
    wrapper = TaskModel(net, spec, "classifier", False, head).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((batch or 2, spec.channels, spec.size, spec.size), generator=gen)
    try:
        with torch.no_grad():
            wrapper(x)
    except Exception as exc:  # the architecture fixes its input size (e.g. ViT) or it is too small
        raise PbexportError(f"backbone {backbone.name} does not accept {spec.size}x{spec.size} inputs "
                            f"({_first_line(exc)})") from None
    buf = io.BytesIO()
    dynamic = None if batch is not None else {INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (x,), buf, dynamo=False, opset_version=opset,
                              training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=dynamic)
    except Exception as exc:
        raise PbexportError(f"torch.onnx.export failed for {backbone.name} ({_first_line(exc)})") from None
    model = onnx.load_from_string(buf.getvalue())
    _materialize_identities(model.graph)
    _fold_small_constants(model)
    state = {k: v.detach().cpu().numpy() for k, v in wrapper.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    wanted = set(masked) | {f"{head}.weight", f"{head}.bias"}
    eps = {}
    for name, bn in masking.batchnorms(net):
        eps[name] = float(bn.eps)
        wanted |= {f"{name}.{k}" for k in ("weight", "bias", "running_mean", "running_var")}
    transposed = _name_initializers(model.graph, state, wanted)
    del model.graph.value_info[:]
    _set_io_shapes(model, batch, spec, num_classes=None)
    base = BaseGraph(model, backbone.name, backbone.fingerprint, spec, batch, head, list(masked), transposed, eps)
    base.require(list(masked) + [f"{head}.weight"])
    return base


def _max_opset() -> int:
    from torch.onnx import _constants

    return min(_constants.ONNX_MAX_OPSET, onnx.defs.onnx_opset_version())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _materialize_identities(graph: onnx.GraphProto) -> None:
    """The exporter shares equal initializers through Identity nodes: give each its own copy."""
    inits = {t.name: t for t in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            t = copy.deepcopy(inits[node.input[0]])
            t.name = node.output[0]
            graph.initializer.append(t)
            inits[t.name] = t
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _fold_small_constants(model: onnx.ModelProto, limit: int = 4096) -> None:
    """Evaluate nodes whose inputs are all small constants (the exporter leaves Constant nodes and
    shape arithmetic behind, e.g. for F.pad) and store their results as initializers."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    known = {t.name: numpy_helper.to_array(t) for t in graph.initializer if np.prod(t.dims) <= limit}
    big = {t.name for t in graph.initializer} - set(known)
    keep, new = [], []
    for node in graph.node:
        ins = [x for x in node.input if x]
        if node.op_type in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial") \
                or any(x in big or x not in known for x in ins) or any(a.type == onnx.AttributeProto.GRAPH
                                                                       for a in node.attribute):
            keep.append(node)
            continue
        try:
            sub = helper.make_graph([node], "fold", [], [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None)
                                                      for o in node.output],
                                    [numpy_helper.from_array(np.asarray(known[x]), x) for x in set(ins)])
            outs = ReferenceEvaluator(helper.make_model(sub, opset_imports=list(model.opset_import))).run(None, {})
        except Exception:
            keep.append(node)
            continue
        if any(np.asarray(o).size > limit for o in outs):
            keep.append(node)
            continue
        for name, value in zip(node.output, outs, strict=True):
            known[name] = np.asarray(value)
            new.append(numpy_helper.from_array(np.asarray(value), name))
    used = {x for node in keep for x in node.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(t for t in new if t.name in used)
    remove_initializers(graph, [t.name for t in graph.initializer if t.name not in used])


def _name_initializers(graph: onnx.GraphProto, state: dict[str, np.ndarray], wanted: set[str]) -> set[str]:
    """Rename initializers to plain state-dict names (``net.`` dropped); return those stored transposed."""
    renames: dict[str, str] = {}
    found: set[str] = set()
    transposed: set[str] = set()
    for t in graph.initializer:
        key = t.name
        if key in state and key not in renames:
            plain = key.removeprefix("net.")
            if np.array_equal(numpy_helper.to_array(t), state[key]):
                renames[key] = plain
                found.add(plain)
    # constant folding may have replaced a parameter by a transposed copy: find it by value
    by_size: dict[int, list[TensorProto]] = {}
    for t in graph.initializer:
        if t.name not in renames and t.data_type == TensorProto.FLOAT:
            by_size.setdefault(int(np.prod(t.dims)), []).append(t)
    for plain in sorted(wanted - found):
        value = state.get("net." + plain)
        if value is None:
            continue
        for t in by_size.get(value.size, []):
            if t.name in renames:
                continue
            arr = numpy_helper.to_array(t)
            if arr.shape == value.shape and np.array_equal(arr, value):
                renames[t.name] = plain
            elif value.ndim == 2 and arr.shape == value.T.shape and np.array_equal(arr, value.T):
                renames[t.name] = plain
                transposed.add(plain)
            else:
                continue
            break
    rename_values(graph, renames)
    return transposed


def rename_values(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Rename initializers/values everywhere they appear (nodes, inputs, outputs, subgraphs)."""
    if not renames:
        return
    for t in graph.initializer:
        t.name = renames.get(t.name, t.name)
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        vi.name = renames.get(vi.name, vi.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for i, name in enumerate(node.output):
            if name in renames:
                node.output[i] = renames[name]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                rename_values(attr.g, renames)


def _set_io_shapes(model: onnx.ModelProto, batch: int | None, spec: InputSpec, num_classes: int | str | None) -> None:
    g = model.graph
    batch_dim = batch if batch is not None else BATCH_DIM
    g.input[0].CopyFrom(helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                                      [batch_dim, spec.channels, spec.size, spec.size]))
    if num_classes is None:
        num_classes = g.output[0].type.tensor_type.shape.dim[1].dim_value or CLASSES_DIM
    g.output[0].CopyFrom(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [batch_dim, num_classes]))


def set_num_classes(model: onnx.ModelProto, base: BaseGraph, num_classes: int | str) -> None:
    """Declare the ``logits`` output as [batch, num_classes] (a dim name for a dynamic class count)."""
    _set_io_shapes(model, base.batch, base.spec, num_classes)


# --------------------------------------------------------------------------- editing helpers
def consumers(graph: onnx.GraphProto, name: str) -> list[tuple[onnx.NodeProto, int]]:
    return [(node, i) for node in graph.node for i, x in enumerate(node.input) if x == name]


def producer(graph: onnx.GraphProto, name: str) -> onnx.NodeProto | None:
    for node in graph.node:
        if name in node.output:
            return node
    return None


def rewire(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Make every consumer of ``old`` read ``new``."""
    for node, i in consumers(graph, old):
        node.input[i] = new


def replace_initializer(graph: onnx.GraphProto, name: str, value: np.ndarray) -> None:
    for i, t in enumerate(graph.initializer):
        if t.name == name:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(np.asarray(value), name))
            return
    raise KeyError(name)


def remove_initializers(graph: onnx.GraphProto, names) -> None:
    names = set(names)
    keep = [t for t in graph.initializer if t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def conv_bn_pairs(base: BaseGraph, g: onnx.GraphProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto, str]]:
    """(Conv, BatchNormalization, BN module name) in ``g`` (a copy of the base graph) where the conv's
    output only feeds that BN, whose parameters are the named tensors of one BN module: the pairs
    whose BN a conv can absorb into its weight and bias."""
    inits = {t.name for t in g.initializer}
    pairs = []
    for bn in [n for n in g.node if n.op_type == "BatchNormalization"]:
        module = bn.input[1].removesuffix(".weight")
        names = [f"{module}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
        if list(bn.input[1:5]) != names or not all(n in inits for n in names) or module not in base.eps:
            continue
        conv = producer(g, bn.input[0])
        if conv is None or conv.op_type != "Conv" or conv.input[1] not in inits:
            continue
        if len(consumers(g, conv.output[0])) != 1 or conv.output[0] in {o.name for o in g.output}:
            continue
        pairs.append((conv, bn, module))
    return pairs


def bn_scale_shift(gamma, beta, mean, var, eps: float, conv_bias=None) -> tuple[np.ndarray, np.ndarray]:
    """BN(conv(x) + b) = conv(x) * scale + shift, per output channel (computed in float64)."""
    scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    shift = np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * scale
    if conv_bias is not None:
        shift = shift + scale * np.asarray(conv_bias, np.float64)
    return scale.astype(np.float32), shift.astype(np.float32)


# --------------------------------------------------------------------------- mask unpacking
def lut_nodes(prefix: str = "lut") -> tuple[list[onnx.NodeProto], list[TensorProto], str]:
    """Nodes + constants computing the [256, 8] float bit table; ORT folds them at session creation."""
    c = [numpy_helper.from_array(np.array(0, np.int64), f"{prefix}.start"),
         numpy_helper.from_array(np.array(256, np.int64), f"{prefix}.limit"),
         numpy_helper.from_array(np.array(1, np.int64), f"{prefix}.one"),
         numpy_helper.from_array(np.array([1], np.int64), f"{prefix}.axes"),
         numpy_helper.from_array((1 << np.arange(8, dtype=np.int64))[None, :], f"{prefix}.pow2"),
         numpy_helper.from_array(np.array(2, np.int64), f"{prefix}.two")]
    n = [helper.make_node("Range", [f"{prefix}.start", f"{prefix}.limit", f"{prefix}.one"], [f"{prefix}.bytes"]),
         helper.make_node("Unsqueeze", [f"{prefix}.bytes", f"{prefix}.axes"], [f"{prefix}.col"]),
         helper.make_node("Div", [f"{prefix}.col", f"{prefix}.pow2"], [f"{prefix}.shifted"]),
         helper.make_node("Mod", [f"{prefix}.shifted", f"{prefix}.two"], [f"{prefix}.bits"]),
         helper.make_node("Cast", [f"{prefix}.bits"], [prefix], to=TensorProto.FLOAT)]
    return n, c, prefix


def unpack_nodes(packed: str, lut: str, shape: str, out: str) -> list[onnx.NodeProto]:
    """uint8 [ceil(n/8)] packed bits -> float 0/1 tensor of the shape held by int64 tensor ``shape``.

    ``shape`` may be [-1] when the packed tensor holds a multiple of 8 elements."""
    return [helper.make_node("Cast", [packed], [f"{packed}.idx"], to=TensorProto.INT64),
            helper.make_node("Gather", [lut, f"{packed}.idx"], [f"{packed}.rows"]),
            helper.make_node("Reshape", [f"{packed}.rows", shape], [out])]


def pack_graph_mask(base: BaseGraph, name: str, mask: np.ndarray) -> np.ndarray:
    """A torch-layout bool mask packed in the graph's layout (bitset.pack_bits order)."""
    from ..bitset import pack_bits

    return pack_bits(base.to_graph_layout(name, np.asarray(mask, bool)))


# --------------------------------------------------------------------------- finishing
def finish(model: onnx.ModelProto, metadata: dict[str, str]) -> onnx.ModelProto:
    from .. import __version__

    model.producer_name = "pbexport"
    model.producer_version = __version__
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=str(value))
    return model


def compact(model: onnx.ModelProto) -> None:
    """Shorten a graph that is stored once per task: short value names (graph inputs and outputs
    excepted), no node names or doc strings, no attributes equal to their defaults."""
    g = model.graph
    fixed = {v.name for v in g.input} | {v.name for v in g.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if name in fixed or not name:
            return name
        if name not in names:
            names[name] = np.base_repr(len(names), 36).lower()
        return names[name]

    for node in g.node:
        node.ClearField("name")  # proto2: an empty string set explicitly still takes bytes
        node.ClearField("doc_string")
        for i, x in enumerate(node.input):
            node.input[i] = short(x)
        for i, x in enumerate(node.output):
            node.output[i] = short(x)
        defaults = _DEFAULT_ATTRS.get(node.op_type, {})
        ones, zeros = _ALL_ONES.get(node.op_type, ()), _ALL_ZEROS.get(node.op_type, ())
        keep_attrs = []
        for a in node.attribute:
            value = helper.get_attribute_value(a)
            if a.name in _OPTIONAL_ATTRS.get(node.op_type, ()):
                continue
            if a.name in defaults and np.isclose(value, defaults[a.name], rtol=1e-6, atol=0):
                continue
            if (a.name in ones and all(v == 1 for v in value)) or (a.name in zeros and all(v == 0 for v in value)):
                continue
            keep_attrs.append(a)
        del node.attribute[:]
        node.attribute.extend(keep_attrs)
    for t in g.initializer:
        t.name = short(t.name)
        t.ClearField("doc_string")
    for vi in g.input:
        vi.ClearField("doc_string")
    del g.value_info[:]
    g.ClearField("doc_string")
    g.name = "g"


# --------------------------------------------------------------------------- what a task adds
@dataclass
class TaskData:
    """One task of the bundle, read (and checksum-checked) before anything is written."""

    name: str
    info: dict  # bundle.task_info: num_classes, class_names, method, train_bn, head_name, metrics
    masks: dict[str, np.ndarray]  # torch layout, bool; empty for a classifier-only task
    tensors: dict[str, np.ndarray]  # head + per-task BN, plain state-dict names, torch layout

    @property
    def num_classes(self) -> int:
        return int(self.info["num_classes"])


def check_task_tensors(base: BaseGraph, task: TaskData) -> None:
    """Every task tensor must name a backbone tensor of the same shape (the head may change its class count)."""
    inits = base.initializers()
    heads = set(base.head_tensors())
    for name, value in task.tensors.items():
        if name not in inits:
            raise PbexportError(f"task {task.name!r}: tensor {name} is not in the backbone's ONNX graph")
        shape = tuple(inits[name].dims)
        new = np.shape(base.to_graph_layout(name, value))
        if name in heads:
            axis = 1 if name in base.transposed else 0
            same = len(new) == len(shape) and all(a == b for i, (a, b) in enumerate(zip(new, shape, strict=False))
                                                  if i != axis)
            if not same or new[axis] != task.num_classes:
                raise PbexportError(f"task {task.name!r}: head tensor {name} has shape {list(new)}, which does not "
                                    f"fit {task.num_classes} classes on this backbone")
        elif new != shape:
            raise PbexportError(f"task {task.name!r}: {name} has shape {list(new)}, the backbone's is {list(shape)}")
    for name, mask in task.masks.items():
        if name not in base.masked:
            raise PbexportError(f"task {task.name!r}: mask for {name}, which the backbone does not mask")
        if np.shape(base.to_graph_layout(name, mask)) != tuple(inits[name].dims):
            raise PbexportError(f"task {task.name!r}: mask {name} has shape {list(np.shape(mask))}")


def metadata(base: BaseGraph, mode: str, task: TaskData | None = None, tasks: list[str] | None = None) -> dict:
    """The contract a device reads from ``custom_metadata_map`` (all values are strings)."""
    import json

    from .. import __version__

    spec = base.spec
    md = {"pbexport_version": __version__, "mode": mode, "backbone": base.backbone_name,
          "backbone_fingerprint": base.fingerprint, "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
          "input_layout": "NCHW", "input_color": "RGB", "input_range": "[0, 1]", "input_size": str(spec.size),
          "input_channels": str(spec.channels), "mean": json.dumps(list(spec.mean)),
          "std": json.dumps(list(spec.std)), "batch": "dynamic" if base.batch is None else str(base.batch)}
    if task is not None:
        md.update({"task": task.name, "num_classes": str(task.num_classes),
                   "class_names": json.dumps(list(task.info["class_names"])), "method": task.info["method"],
                   "train_bn": json.dumps(bool(task.info["train_bn"]))})
    if tasks is not None:
        md["tasks"] = json.dumps(list(tasks))
    return md
