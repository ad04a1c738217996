"""Shared-backbone mode: ONE weights file for every task, and one small graph per task.

    DIR/backbone.onnx.data   what the tasks share, float32, one flat array: the masked weights
                             (concatenated in the bundle's order, padded to a multiple of 8), then
                             every other backbone tensor (biases, BN, mean/std)
    DIR/<task>.onnx          the task's graph: that array as ONE external-data initializer, cut back
                             into tensors by Split (+ Reshape); the task's masks as ONE packed uint8
                             initializer (1 bit per masked parameter), unpacked and multiplied
                             in-graph; the task's head (+ per-task BN) inline

Every input of the unpack/split subgraph is an initializer, so onnxruntime constant-folds it at
session creation: inference runs the same kernels as the baked graph.

A BatchNormalization right after a conv is folded into the shared data (W * scale, and the BN's
shift as the conv's bias; ``scale = gamma / sqrt(var + eps)``), which is exact for the masks
((W * scale) * m == (W * m) * scale with m in {0, 1}) and saves a BN node and four tensors per conv
in every task graph. A task with its own BN carries ``<bn>.ratio`` (its scale / the backbone's)
and ``<bn>.shift`` inline: two vectors per BN instead of four. A BN whose backbone scale has a zero
stays a node. With one external reference, one mask initializer and compacted names, a task graph
is about 1 bit per masked parameter plus the head (and BN) plus a few KiB of graph.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..bitset import pack_bits
from .graph import (
    BaseGraph,
    TaskData,
    bn_scale_shift,
    check_task_tensors,
    compact,
    conv_bn_pairs,
    finish,
    lut_nodes,
    metadata,
    remove_initializers,
    set_num_classes,
    unpack_nodes,
)

MODE = "shared"
DATA_FILE = "backbone.onnx.data"
BN_KEYS = ("weight", "bias", "running_mean", "running_var")


@dataclass
class Fold:
    weight: str  # the conv's weight
    bias: str | None  # the conv's own bias (absorbed into the shift)
    scale: np.ndarray  # the backbone BN's scale, per output channel


@dataclass
class SharedLayout:
    """Where each shared tensor lies in the flat backbone array (element offsets follow the order)."""

    masked: list[tuple[str, tuple[int, ...]]]
    others: list[tuple[str, tuple[int, ...]]]
    masked_padded: int  # masked elements rounded up to a multiple of 8
    values: dict[str, np.ndarray] = field(default_factory=dict)  # stored instead of the graph's tensor
    folds: dict[str, Fold] = field(default_factory=dict)  # BN module -> the conv it is folded into

    @property
    def masked_elements(self) -> int:
        return sum(math.prod(s) for _, s in self.masked)

    @property
    def other_elements(self) -> int:
        return sum(math.prod(s) for _, s in self.others)

    @property
    def total(self) -> int:
        return self.masked_padded + self.other_elements


def shared_layout(base: BaseGraph) -> SharedLayout:
    g = base.model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    values, folds = {}, {}
    for conv, _, module in conv_bn_pairs(base, g):
        bias = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
        scale, shift = bn_scale_shift(*(arrays[f"{module}.{k}"] for k in BN_KEYS), base.eps[module],
                                      None if bias is None else arrays[bias])
        if not (np.all(scale != 0) and np.all(np.isfinite(scale))) or conv.input[1] in values:
            continue  # a zero scale could not be undone by a task's ratio: keep this BN a node
        w = arrays[conv.input[1]]
        values[conv.input[1]] = (w * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
        values[f"{module}.shift"] = shift
        folds[module] = Fold(conv.input[1], bias, scale)
    dropped = {f"{m}.{k}" for m in folds for k in BN_KEYS} | {f.bias for f in folds.values() if f.bias}
    masked = [(n, tuple(arrays[n].shape)) for n in base.masked]
    skip = set(base.masked) | set(base.head_tensors()) | dropped
    others = [(t.name, tuple(t.dims)) for t in g.initializer
              if t.name not in skip and t.data_type == TensorProto.FLOAT and len(t.dims) >= 1 and math.prod(t.dims)]
    others += [(f"{m}.shift", values[f"{m}.shift"].shape) for m in folds]
    n = sum(math.prod(s) for _, s in masked)
    return SharedLayout(masked, others, -(-n // 8) * 8, values, folds)


def write_backbone_data(path: Path, base: BaseGraph, layout: SharedLayout) -> None:
    def tensor(name: str) -> bytes:
        value = layout.values[name] if name in layout.values else base.array(name)
        return np.ascontiguousarray(value, "<f4").tobytes()

    with open(path, "wb") as f:
        for name, _ in layout.masked:
            f.write(tensor(name))
        f.write(b"\0" * 4 * (layout.masked_padded - layout.masked_elements))
        for name, _ in layout.others:
            f.write(tensor(name))


def _inline_tensors(base: BaseGraph, layout: SharedLayout, task: TaskData) -> dict[str, np.ndarray]:
    """What the task graph stores itself: the head, and per-task BN (folded BNs as ratio + shift)."""
    out = {n: base.to_graph_layout(n, np.asarray(v, np.float32)) for n, v in task.tensors.items()
           if n.rsplit(".", 1)[0] not in layout.folds}
    if task.info["train_bn"]:
        arrays = base.initializers()
        for module, fold in layout.folds.items():
            bias = None if fold.bias is None else numpy_helper.to_array(arrays[fold.bias])
            scale, shift = bn_scale_shift(*(task.tensors[f"{module}.{k}"] for k in BN_KEYS), base.eps[module], bias)
            ndim = len(arrays[fold.weight].dims)
            out[f"{module}.ratio"] = (scale.astype(np.float64) / fold.scale).astype(np.float32).reshape(
                (-1,) + (1,) * (ndim - 1))
            out[f"{module}.shift"] = shift
    return out


def shared_model(base: BaseGraph, layout: SharedLayout, task: TaskData) -> onnx.ModelProto:
    check_task_tensors(base, task)
    model = copy.deepcopy(base.model)
    g = model.graph
    inline = _inline_tensors(base, layout, task)
    consts: list[TensorProto] = []
    shapes: dict[tuple[int, ...], str] = {}

    def const(value: np.ndarray, name: str) -> str:
        if value.dtype == np.int64:  # varints: sizes and shapes take 1-3 bytes each, not 8
            consts.append(helper.make_tensor(name, TensorProto.INT64, value.shape, value.reshape(-1).tolist()))
        else:
            consts.append(numpy_helper.from_array(value, name))
        return name

    def shape_const(dims) -> str:
        dims = tuple(int(d) for d in dims)
        if dims not in shapes:
            shapes[dims] = const(np.array(dims, np.int64), f"shape.{len(shapes)}")
        return shapes[dims]

    def split(src: str, pieces: list[tuple[str, tuple[int, ...]]], tag: str) -> list[onnx.NodeProto]:
        """Split ``src`` into named tensors (Reshaped where not 1-D); pieces the task replaces are dropped."""
        outs, reshapes = [], []
        for name, shape in pieces:
            if name in inline or name == "pad":
                outs.append(f"{tag}.unused.{len(outs)}")
            elif len(shape) == 1:
                outs.append(name)
            else:
                outs.append(f"{name}.flat")
                reshapes.append(helper.make_node("Reshape", [outs[-1], shape_const(shape)], [name]))
        sizes = const(np.array([math.prod(s) for _, s in pieces], np.int64), f"{tag}.sizes")
        return [helper.make_node("Split", [src, sizes], outs, axis=0)] + reshapes

    # the BN nodes folded into the shared data leave the graph; the conv takes the shift as its bias
    for module, fold in layout.folds.items():
        bn = next(n for n in g.node if n.op_type == "BatchNormalization" and n.input[1] == f"{module}.weight")
        conv = next(n for n in g.node if n.op_type == "Conv" and n.output[0] == bn.input[0])
        conv.output[0] = bn.output[0]
        if fold.bias:
            conv.input[2] = f"{module}.shift"
        else:
            conv.input.append(f"{module}.shift")
        g.node.remove(bn)
    folded = {f"{m}.{k}" for m in layout.folds for k in BN_KEYS} | {f.bias for f in layout.folds.values() if f.bias}
    remove_initializers(g, {n for n, _ in layout.masked + layout.others} | set(base.head_tensors()) | folded
                        | set(inline))

    ext = TensorProto(name="backbone", data_type=TensorProto.FLOAT, dims=[layout.total],
                      data_location=TensorProto.EXTERNAL)
    for key, value in (("location", DATA_FILE), ("length", str(4 * layout.total))):
        ext.external_data.add(key=key, value=value)
    consts.append(ext)
    parts = [("backbone.masked", (layout.masked_padded,))] + ([("backbone.others", (layout.other_elements,))]
                                                              if layout.others else [])
    nodes = split("backbone", parts, "backbone")
    pad = layout.masked_padded - layout.masked_elements
    masked_src = "backbone.masked"
    if task.masks:
        bits = np.concatenate([base.to_graph_layout(n, task.masks[n]).reshape(-1) for n, _ in layout.masked]
                              + [np.zeros(pad, bool)])
        const(pack_bits(bits), "masks")
        lnodes, lconsts, lut = lut_nodes()
        consts += lconsts
        nodes += lnodes + unpack_nodes("masks", lut, shape_const((-1,)), "masks.bits")
        nodes.append(helper.make_node("Mul", ["backbone.masked", "masks.bits"], ["backbone.masked.eff"]))
        masked_src = "backbone.masked.eff"
    nodes += split(masked_src, list(layout.masked) + ([("pad", (pad,))] if pad else []), "masked")
    if layout.others:
        nodes += split("backbone.others", layout.others, "others")
    for module, fold in layout.folds.items():  # a task's own BN: its scale relative to the backbone's
        if f"{module}.ratio" in inline:
            nodes.append(helper.make_node("Mul", [fold.weight, f"{module}.ratio"], [f"{fold.weight}.task"]))
            for node in g.node:
                for i, x in enumerate(node.input):
                    if x == fold.weight:
                        node.input[i] = f"{fold.weight}.task"
    for name, value in inline.items():
        const(value, name)
    g.initializer.extend(consts)
    body = list(g.node)
    del g.node[:]
    g.node.extend(nodes + body)
    set_num_classes(model, base, task.num_classes)
    compact(model)
    return finish(model, metadata(base, MODE, task))
