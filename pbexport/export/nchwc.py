"""The multitask graph on onnxruntime's blocked-layout (NCHWc) convolutions, for x86 CPUs.

onnxruntime's CPU provider runs a plain backbone's convolutions 1.6-2.3x faster in a blocked layout
(channels in blocks of 8 on AVX2, 16 on AVX512): its ``NchwcTransformer`` rewrites each Conv to
``com.microsoft.nchwc.Conv`` and reorders its weight at load time. It only rewrites a Conv whose
weight is a constant, and the multitask graph's weights are computed per run (W * mask), so it keeps
the slower kernels. The NCHWc Conv kernel itself reads its weight as an ordinary input, so the
export does the transformer's work instead:

- each masked conv weight is stored in the kernel's filter layout (:class:`BlockedFilter`: OIHWBiBo,
  [O/B, I/B, KH, KW, Bi, Bo]; a first conv with fewer input channels than a block reads plain NCHW
  input and takes OIHWBo), and so is its mask: the adapters pack the mask bits in that order, so the
  in-graph unpack yields them blocked and W_eff costs what it costs in the portable graph (a per-task
  BN scale is stored as [O/B, 1, B], which broadcasts over the weight viewed as [O/B, -1, B]);
- :func:`to_nchwc` then moves those convs to ``nchwc.Conv``, keeps activations blocked between them
  (ReorderInput/Output at the edges; elementwise Relu/Add pass through, MaxPool and GlobalAveragePool
  have NCHWc kernels too) and fuses Conv -> Add -> Relu into one Conv (its Sum input and
  activation), as the transformer does.

The block size is the CPU's, so the graph is bound to it: it carries a check (ReorderInput of a
constant, reshaped to the exported block) that fails the run on a CPU with another block size, or
without NCHWc kernels, instead of computing with a wrong weight layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from ..errors import PbexportError

DOMAIN = "com.microsoft.nchwc"
BLOCK_SIZES = (8, 16)  # MLAS: 8 floats per block with AVX2, 16 with AVX512
_PASS_THROUGH = {"Relu", "Add"}  # elementwise: blocked tensors in, the same blocked tensor out
_CONV_ATTRS = ("pads", "strides", "dilations", "kernel_shape", "auto_pad")
# pooling with an nchwc kernel, and the attributes that kernel takes
_POOLS = {"MaxPool": ("auto_pad", "kernel_shape", "dilations", "pads", "strides", "ceil_mode"),
          "GlobalAveragePool": ()}
CHECK_NODE = "nchwc_block_check"


def check_block(block: int) -> None:
    if block not in BLOCK_SIZES:
        raise PbexportError(f"--nchwc-block must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block}")


@dataclass(frozen=True)
class BlockedFilter:
    """A [O, I, KH, KW] conv weight in the NCHWc kernel's filter layout for ``block``."""

    shape: tuple[int, int, int, int]
    block: int

    @staticmethod
    def fits(shape, block: int) -> bool:
        """The kernel takes it: a 2-D conv reading plain input (I < block) or 4-aligned channels."""
        return len(shape) == 4 and (shape[1] < block or shape[1] % 4 == 0)

    @property
    def first(self) -> bool:  # reads plain NCHW input, as the transformer treats a network's stem
        return self.shape[1] < self.block

    @property
    def padded(self) -> tuple[int, int, int, int]:
        o, i, kh, kw = self.shape
        up = lambda n: -(-n // self.block) * self.block  # noqa: E731
        return up(o), (i if self.first else up(i)), kh, kw

    @property
    def view(self) -> tuple[int, int, int]:
        """The blocked filter as [O/B, -1, B]: output channels are its outer and innermost axes, so a
        per-output-channel scale of shape [O/B, 1, B] (:meth:`scale_view`) broadcasts over it."""
        op, ip, kh, kw = self.padded
        return op // self.block, ip * kh * kw, self.block

    def scale_view(self, scale: np.ndarray) -> np.ndarray:
        full = np.ones(self.padded[0], np.float32)
        full[: self.shape[0]] = np.asarray(scale, np.float32).reshape(-1)
        return full.reshape(self.view[0], 1, self.block)

    def apply(self, w: np.ndarray) -> np.ndarray:
        """OIHW -> the blocked layout (zero-padded), as an array of shape ``padded``."""
        b, (o, i, kh, kw), (op, ip, _, _) = self.block, self.shape, self.padded
        full = np.zeros((op, ip, kh, kw), w.dtype)
        full[:o, :i] = w
        if self.first:  # OIHWBo
            out = full.reshape(op // b, b, ip, kh, kw).transpose(0, 2, 3, 4, 1)
        else:  # OIHWBiBo
            out = full.reshape(op // b, b, ip // b, b, kh, kw).transpose(0, 2, 4, 5, 3, 1)
        return np.ascontiguousarray(out).reshape(op, ip, kh, kw)


def to_nchwc(model: onnx.ModelProto, filters: dict[str, BlockedFilter]) -> onnx.ModelProto:
    """Move the Convs whose weight input is in ``filters`` (already in that blocked layout) to NCHWc."""
    shapes = {v.name: str(v.type.tensor_type.shape) for v in shape_inference.infer_shapes(model).graph.value_info}
    g = model.graph
    blocks = {f.block for f in filters.values()}
    if len(blocks) != 1:
        raise PbexportError("no convolution to put on NCHWc kernels" if not blocks else "mixed NCHWc block sizes")
    rw = _Rewriter(blocks.pop(), {i.name for i in g.input} | {t.name for t in g.initializer})
    for node in g.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and node.input[1] in filters and group == 1:
            rw.conv(node, filters[node.input[1]])
        elif node.op_type in _POOLS and node.input[0] in rw.blocked and len(node.output) == 1 and all(
                a.name in _POOLS[node.op_type] or (a.name, a.i) == ("storage_order", 0) for a in node.attribute):
            rw.pool(node)
        elif node.op_type in _PASS_THROUGH and all(i in rw.blocked and i in shapes for i in node.input) \
                and len({shapes[i] for i in node.input}) == 1:  # no broadcasting over a blocked layout
            rw.pass_through(node)
        else:
            for name in node.input:
                if name:
                    rw.plain(name)
            rw.nodes.append(node)
            rw.available.update(node.output)
    for out in g.output:
        rw.plain(out.name)
    rw.check(g.output[0].name)
    del g.node[:]
    g.node.extend(_fuse(rw.nodes, {o.name for o in g.output}))
    g.initializer.extend(rw.consts)
    del g.value_info[:]  # blocked tensors do not have the shapes inference gave their plain twins
    g.value_info.append(helper.make_tensor_value_info(rw.probe_out, onnx.TensorProto.FLOAT, [1, rw.block, 1, 1]))
    model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model


class _Rewriter:
    def __init__(self, block: int, available: set[str]):
        self.block = block
        self.available = set(available)  # tensors that exist in plain NCHW
        self.blocked: dict[str, tuple[str, int]] = {}  # plain name -> (its blocked tensor, real channels)
        self.nodes: list[onnx.NodeProto] = []
        self.consts: list[onnx.TensorProto] = []
        self._n = 0

    def _name(self, base: str) -> str:
        self._n += 1
        return f"{base}/nchwc{self._n}"

    def _node(self, op: str, inputs: list[str], base: str, domain: str = "", **attrs) -> str:
        out = self._name(base)
        self.nodes.append(helper.make_node(op, inputs, [out], domain=domain, **attrs))
        return out

    def plain(self, name: str) -> str:
        """``name`` in NCHW, reordered back from its blocked tensor the first time it is needed."""
        if name not in self.available and name in self.blocked:
            src, channels = self.blocked[name]
            self.nodes.append(helper.make_node("ReorderOutput", [src], [name], domain=DOMAIN, channels=channels))
            self.available.add(name)
        return name

    def conv(self, node: onnx.NodeProto, f: BlockedFilter) -> None:
        out_ch, in_ch, kh, kw = f.shape
        if f.first:
            x = self.plain(node.input[0])
        else:
            if node.input[0] not in self.blocked:
                self.blocked[node.input[0]] = (self._node("ReorderInput", [self.plain(node.input[0])],
                                                          node.input[0], DOMAIN), in_ch)
            x = self.blocked[node.input[0]][0]
        inputs = [x, node.input[1]]
        if len(node.input) > 2 and node.input[2]:
            bias, pad = node.input[2], f.padded[0] - out_ch
            if pad:
                amounts = self._name(bias + ".pads")
                self.consts.append(numpy_helper.from_array(np.array([0, pad], np.int64), amounts))
                bias = self._node("Pad", [bias, amounts], bias + ".padded")
            inputs.append(bias)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in _CONV_ATTRS}
        attrs.setdefault("kernel_shape", [kh, kw])
        self.blocked[node.output[0]] = (self._node("Conv", inputs, node.output[0], DOMAIN, **attrs), out_ch)

    def pool(self, node: onnx.NodeProto) -> None:
        src, channels = self.blocked[node.input[0]]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "storage_order"}
        self.blocked[node.output[0]] = (self._node(node.op_type, [src], node.output[0], DOMAIN, **attrs), channels)

    def pass_through(self, node: onnx.NodeProto) -> None:
        src = [self.blocked[i][0] for i in node.input]
        self.blocked[node.output[0]] = (self._node(node.op_type, src, node.output[0]), self.blocked[node.input[0]][1])

    def check(self, output: str) -> None:
        """Fail on a CPU whose block size is not this graph's: ReorderInput pads 4 channels to its block,
        and the Reshape to [block] only fits when they agree. Its zero sum joins the output, so the check
        is not pruned as dead code."""
        probe = self._name("probe")
        self.consts.append(numpy_helper.from_array(np.zeros((1, 4, 1, 1), np.float32), probe))
        size = self._name("block")
        self.consts.append(numpy_helper.from_array(np.array([self.block], np.int64), size))
        padded = self.probe_out = self._node("ReorderInput", [probe], "probe", DOMAIN)  # shape [1, block, 1, 1]
        self.nodes.append(helper.make_node("Reshape", [padded, size], [CHECK_NODE],
                                           name=f"{CHECK_NODE}_expects_block_{self.block}"))
        zero = self._node("ReduceSum", [CHECK_NODE], "probe", keepdims=0)
        unchecked = output + "/unchecked"
        for n in self.nodes:  # the graph's output is now produced under another name, plus the zero
            n.output[:] = [unchecked if o == output else o for o in n.output]
            n.input[:] = [unchecked if i == output else i for i in n.input]
        self.nodes.append(helper.make_node("Add", [unchecked, zero], [output]))


def _fuse(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """Conv [-> Add(other)] [-> Relu] into one nchwc.Conv (Sum input, activation)."""
    nodes = list(nodes)

    def position(name: str) -> int:  # of the node that makes ``name`` now; -1: a graph input or constant
        return next((i for i, n in enumerate(nodes) if name in n.output), -1)

    def only_user(name: str) -> onnx.NodeProto | None:
        users = [n for n in nodes if name in n.input]
        return users[0] if len(users) == 1 and name not in outputs else None

    for conv in [n for n in nodes if n.domain == DOMAIN and n.op_type == "Conv"]:
        add = only_user(conv.output[0])
        if add is not None and add.op_type == "Add" and add.domain == "":
            other = add.input[1] if add.input[0] == conv.output[0] else add.input[0]
            if position(other) < nodes.index(conv):  # the Sum input must exist when the conv runs
                conv.input.extend([""] * (3 - len(conv.input)) + [other])
                conv.output[0] = add.output[0]
                nodes.remove(add)
        relu = only_user(conv.output[0])
        if relu is not None and relu.op_type == "Relu" and relu.domain == "":
            conv.attribute.append(helper.make_attribute("activation", "Relu"))
            conv.output[0] = relu.output[0]
            nodes.remove(relu)
    return nodes
