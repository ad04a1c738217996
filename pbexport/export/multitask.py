"""Multitask mode: ONE graph for every task; what a task adds is fed per run.

    DIR/model.onnx (+ .data)           the backbone graph; task tensors are overridable initializers
    DIR/unpack.onnx, DIR/body.onnx     model.onnx cut after the weights (feed="weights"), sharing its data
    DIR/adapters/<task>.onnx_adapter   the task's tensors (onnxruntime AdapterFormat)
    DIR/tasks.json                     task -> adapter, class names, class count, tensor names; unpack, body, weights

Task tensors are initializers also listed as graph inputs: their defaults reproduce the plain
backbone (all-ones masks, its own classifier and BN), and a run overrides them either with
onnxruntime's ``LoraAdapter`` + ``RunOptions.add_active_adapter`` or by passing them as inputs
(``run``/IOBinding). Tensors an adapter leaves out keep their defaults: a classifier-only task
carries no masks, a task without per-task BN no BN tensors.

Per masked weight W (``<name>.mask``: uint8, 1 bit per parameter, ``bitset.BIT_ORDER``)::

    W_eff = W * Reshape(Gather(LUT[256, 8], Cast<int64>(mask)))   (* scale, with per-task BN)

A BatchNormalization right after a conv is folded into that conv: without per-task BN in any task,
into its constant weight and bias; otherwise the task's BN enters as ``<bn>.scale`` (gamma /
sqrt(var + eps), one per output channel, multiplied into W_eff) and ``<bn>.shift`` (the conv's
bias). Both are weight-side: their cost does not grow with the batch, and the conv keeps onnxruntime's
Conv + activation fusion. The head (``<head>.weight`` [classes, in], ``<head>.bias``) has a dynamic
class dimension, so tasks with different class counts share the graph.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..bitset import pack_bits
from .graph import (
    CLASSES_DIM,
    BaseGraph,
    TaskData,
    bn_scale_shift,
    check_task_tensors,
    consumers,
    conv_bn_pairs,
    finish,
    lut_nodes,
    metadata,
    pack_graph_mask,
    remove_initializers,
    replace_initializer,
    rewire,
    set_num_classes,
    unpack_nodes,
)
from .nchwc import BlockedFilter, to_nchwc

MODE = "multitask"
MODEL_FILE = "model.onnx"
BODY_FILE = "body.onnx"  # the graph after the weights: image + computed weights in, logits out
UNPACK_FILE = "unpack.onnx"  # the graph up to the weights: the task's tensors in, computed weights out
INDEX_FILE = "tasks.json"
INDEX_FORMAT = "pbexport-multitask"
INDEX_VERSION = 1
ADAPTER_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"
MASK_SUFFIX = ".mask"


@dataclass
class MultitaskGraph:
    model: onnx.ModelProto
    task_bn: bool  # per-task BN tensors are inputs
    # BN module -> (the conv's own bias, ndim of the conv weight)
    folded: dict[str, tuple[np.ndarray | None, int]] = field(default_factory=dict)
    loose_bn: list[str] = field(default_factory=list)  # BN modules left as nodes (their tensors are inputs)
    blocked: dict[str, BlockedFilter] = field(default_factory=dict)  # --nchwc-block: weight (and mask) layout
    scale_filters: dict[str, BlockedFilter] = field(default_factory=dict)  # BN module -> its blocked conv

    def scale_layout(self, module: str, scale: np.ndarray) -> np.ndarray:
        """A folded BN's per-channel scale as the graph multiplies it into its conv's weight."""
        f = self.scale_filters.get(module)
        return scale.reshape(-1, 1, 1, 1) if f is None else f.scale_view(scale)

    def inputs(self) -> dict[str, onnx.ValueInfoProto]:
        return {v.name: v for v in self.model.graph.input[1:]}


def multitask_graph(base: BaseGraph, task_bn: bool, tasks: list[str],
                    nchwc_block: int | None = None) -> MultitaskGraph:
    """The multitask graph; with ``nchwc_block``, its convs on onnxruntime's NCHWc kernels (see .nchwc)."""
    model = copy.deepcopy(base.model)
    g = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    mg = MultitaskGraph(model, task_bn)
    front: list[onnx.NodeProto] = []
    overridable: dict[str, list] = {}  # name -> declared shape
    consts: list[TensorProto] = []
    effective: dict[str, str] = {}  # weight -> tensor the conv reads instead
    scales: dict[str, str] = {}  # conv weight -> per-task scale input
    if nchwc_block is not None:  # masked conv weights (and so their masks) go into the NCHWc filter layout
        for conv in [n for n in g.node if n.op_type == "Conv" and n.input[1] in base.masked]:
            shape = tuple(arrays[conv.input[1]].shape)
            if all(a.name != "group" or a.i == 1 for a in conv.attribute) and BlockedFilter.fits(shape, nchwc_block):
                mg.blocked[conv.input[1]] = BlockedFilter(shape, nchwc_block)

    for conv, bn, module in conv_bn_pairs(base, g):
        gamma, beta, mean, var = (arrays[f"{module}.{k}"] for k in ("weight", "bias", "running_mean", "running_var"))
        weight = conv.input[1]
        bias = arrays[conv.input[2]] if len(conv.input) > 2 and conv.input[2] else None
        scale, shift = bn_scale_shift(gamma, beta, mean, var, base.eps[module], bias)
        col = (-1,) + (1,) * (arrays[weight].ndim - 1)
        if task_bn:
            if weight in mg.blocked:
                mg.scale_filters[module] = mg.blocked[weight]
            value = mg.scale_layout(module, scale)
            consts.append(numpy_helper.from_array(value, f"{module}.scale"))
            overridable[f"{module}.scale"] = list(value.shape)
            overridable[f"{module}.shift"] = list(shift.shape)
            scales[weight] = f"{module}.scale"
        else:
            replace_initializer(g, weight, arrays[weight] * scale.reshape(col))
        consts.append(numpy_helper.from_array(shift, f"{module}.shift"))
        mg.folded[module] = (bias, arrays[weight].ndim)
        old_bias = conv.input[2] if len(conv.input) > 2 else None
        if old_bias:
            conv.input[2] = f"{module}.shift"
        else:
            conv.input.append(f"{module}.shift")
        conv.output[0] = bn.output[0]
        g.node.remove(bn)
        unused = [f"{module}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
        remove_initializers(g, [n for n in unused + ([old_bias] if old_bias else []) if not consumers(g, n)])

    if base.masked:
        lnodes, lconsts, lut = lut_nodes()
        front += lnodes
        consts += lconsts
    current = {t.name: t for t in g.initializer}  # BN may have been folded into the weights above
    for name, f in mg.blocked.items():  # a weight with a per-task scale is kept in the scale's [O/B, -1, B] view
        value = f.apply(numpy_helper.to_array(current[name]))
        replace_initializer(g, name, value.reshape(f.view) if name in scales else value)
    for name in base.masked:
        f = mg.blocked.get(name)
        shape = list(arrays[name].shape) if f is None else list(f.view if name in scales else f.padded)
        packed = pack_bits(np.ones(shape, bool))  # default: keep every weight (the plain backbone)
        consts.append(numpy_helper.from_array(packed, name + MASK_SUFFIX))
        overridable[name + MASK_SUFFIX] = list(packed.shape)
        consts.append(numpy_helper.from_array(np.array(shape, np.int64), f"{name}.shape"))
        front += unpack_nodes(name + MASK_SUFFIX, lut, f"{name}.shape", f"{name}.bits")
        front.append(helper.make_node("Mul", [name, f"{name}.bits"], [f"{name}.masked"]))
        effective[name] = f"{name}.masked"
    for weight, scale in scales.items():
        src = effective.get(weight, weight)
        if weight in mg.blocked:  # [O/B, -1, B] x [O/B, 1, B], then the conv's 4-D filter
            f = mg.blocked[weight]
            consts.append(numpy_helper.from_array(np.array(f.padded, np.int64), f"{weight}.filter"))
            front += [helper.make_node("Mul", [src, scale], [f"{weight}.scaled_view"]),
                      helper.make_node("Reshape", [f"{weight}.scaled_view", f"{weight}.filter"], [f"{weight}.scaled"])]
        else:
            front.append(helper.make_node("Mul", [src, scale], [f"{weight}.scaled"]))
        effective[weight] = f"{weight}.scaled"
    for weight, eff in effective.items():  # front is not in g yet: only the backbone's nodes are rewired
        rewire(g, weight, eff)

    if task_bn:  # a BN no conv could absorb keeps its node; its four tensors become inputs
        for bn in [n for n in g.node if n.op_type == "BatchNormalization"]:
            module = bn.input[1].removesuffix(".weight")
            if module in base.eps and all(n in arrays for n in bn.input[1:5]):
                mg.loose_bn.append(module)
                for n in bn.input[1:5]:
                    overridable[n] = list(arrays[n].shape)
    for name in base.head_tensors():
        dims: list = list(arrays[name].shape)
        dims[1 if name in base.transposed else 0] = CLASSES_DIM
        overridable[name] = dims

    g.initializer.extend(consts)
    body = list(g.node)
    del g.node[:]
    g.node.extend(front + body)
    del g.input[1:]
    types = {t.name: t.data_type for t in g.initializer}
    for name, dims in overridable.items():
        g.input.append(helper.make_tensor_value_info(name, types[name], dims))
    set_num_classes(model, base, CLASSES_DIM)
    md = metadata(base, MODE, tasks=tasks)
    if nchwc_block is not None:
        to_nchwc(model, {effective[w]: f for w, f in mg.blocked.items()})
        md["nchwc_block"] = str(nchwc_block)
    finish(model, md)
    return mg


def adapter_tensors(mg: MultitaskGraph, base: BaseGraph, task: TaskData) -> dict[str, np.ndarray]:
    """The tensors a task's adapter holds, by graph input name, in graph layout."""
    check_task_tensors(base, task)
    out: dict[str, np.ndarray] = {}
    for name, mask in task.masks.items():
        f = mg.blocked.get(name)
        out[name + MASK_SUFFIX] = (pack_bits(f.apply(np.asarray(mask, bool))) if f
                                   else pack_graph_mask(base, name, mask))
    for name in base.head_tensors():
        out[name] = base.to_graph_layout(name, np.asarray(task.tensors[name], np.float32))
    if task.info["train_bn"] and mg.task_bn:
        t = task.tensors
        for module, (bias, ndim) in mg.folded.items():
            scale, shift = bn_scale_shift(*(t[f"{module}.{k}"] for k in ("weight", "bias", "running_mean",
                                                                           "running_var")), base.eps[module], bias)
            out[f"{module}.scale"] = (mg.scale_layout(module, scale) if module in mg.scale_filters
                                      else scale.reshape((-1,) + (1,) * (ndim - 1)))
            out[f"{module}.shift"] = shift
        for module in mg.loose_bn:
            for k in ("weight", "bias", "running_mean", "running_var"):
                out[f"{module}.{k}"] = np.asarray(t[f"{module}.{k}"], np.float32)
    inputs = mg.inputs()
    for name, value in out.items():
        declared = [d.dim_value if d.HasField("dim_value") else None
                    for d in inputs[name].type.tensor_type.shape.dim]
        if len(declared) != value.ndim or any(d is not None and d != v
                                              for d, v in zip(declared, value.shape, strict=False)):
            raise AssertionError(f"internal error: adapter tensor {name} has shape {value.shape}, graph {declared}")
    return out


def write_adapter(path, tensors: dict[str, np.ndarray]) -> None:
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
    fmt.export_adapter(str(path))


def index(base: BaseGraph, tasks: list[TaskData], adapters: dict[str, dict[str, np.ndarray]],
          weights: list[str]) -> dict:
    meta = metadata(base, MODE)
    return {"format": INDEX_FORMAT, "format_version": INDEX_VERSION, "model": MODEL_FILE,
            "unpack": UNPACK_FILE, "body": BODY_FILE, "weights": weights,
            "backbone": base.backbone_name, "backbone_fingerprint": base.fingerprint,
            "input": {"name": meta["input_name"], "layout": "NCHW", "color": "RGB", "range": [0, 1],
                      "size": base.spec.size, "channels": base.spec.channels, "mean": list(base.spec.mean),
                      "std": list(base.spec.std), "batch": base.batch},
            "output": meta["output_name"],
            "tasks": {t.name: {"adapter": f"{ADAPTER_DIR}/{t.name}{ADAPTER_SUFFIX}", "num_classes": t.num_classes,
                               "class_names": list(t.info["class_names"]), "method": t.info["method"],
                               "train_bn": bool(t.info["train_bn"]), "tensors": sorted(adapters[t.name])}
                      for t in tasks}}


def split_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto, list[str]]:
    """``model`` cut where the weights are done: (unpack, body, the tensors between them). The unpack holds
    ``model``'s nodes that do not depend on the image (masks -> weights, BN scales) and computes the
    weights from the task's tensors; the body takes the image and those weights (and the task's tensors
    it reads itself: conv biases, the head). The runtime's feed="weights" runs the unpack once per task
    switch and the body per image, at the speed of a graph with plain weights. Both keep ``model``'s
    initializers as they are (with ``model`` saved to external data first, they reference its file)."""
    g = model.graph
    image = {g.input[0].name}
    for node in g.node:  # topological order
        if image & set(node.input):
            image.update(node.output)
    body = [n for n in g.node if set(n.output) & image]
    unpack = [n for n in g.node if not set(n.output) & image]
    made = {o for n in unpack for o in n.output}
    weights = list(dict.fromkeys(i for n in body for i in n.input if i in made))
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    missing = [w for w in weights if not inferred.get(w, onnx.ValueInfoProto()).type.tensor_type.HasField("shape")]
    if missing:
        raise AssertionError(f"internal error: no inferred shape for {missing[0]}, which the body takes")
    weight_info = [inferred[w] for w in weights]

    def part(nodes, name, inputs, outputs):
        used = {i for n in nodes for i in n.input}
        graph = helper.make_graph(nodes, name, [v for v in inputs if v.name in used], outputs,
                                  [t for t in g.initializer if t.name in used])  # task inputs keep defaults
        out = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        out.metadata_props.extend(model.metadata_props)
        return out

    unpack_model = part(unpack, "unpack", list(g.input[1:]), weight_info)
    body_model = part(body, "body", [g.input[0], *weight_info, *g.input[1:]], list(g.output))
    return unpack_model, body_model, weights
