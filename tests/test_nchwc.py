"""The multitask graph on onnxruntime's NCHWc convolutions (`pbexport onnx --multitask --nchwc-block`)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from test_cli import assert_one_line_error, pbexport
from test_export import _calibrated_weights, _make_bundle

from pbexport import PbexportError
from pbexport.export import main_export
from pbexport.export.nchwc import CHECK_NODE, DOMAIN, BlockedFilter
from pbexport.export.verify import read_adapter
from pbexport.runtime import _NCHWC_PROBE, nchwc_block_size, open_model

BLOCK = nchwc_block_size()
pytestmark = pytest.mark.skipif(BLOCK is None, reason="this onnxruntime has no NCHWc kernels")
OTHER = 8 if BLOCK == 16 else 16


@pytest.fixture(scope="module", params=[("cifar_resnet20", 32), ("resnet18", 32)], ids=["cifar_resnet20", "resnet18"])
def bundle(request, tmp_path_factory):
    arch, size = request.param
    root = tmp_path_factory.mktemp(arch)
    return _make_bundle(root, arch, size, _calibrated_weights(arch, size, root / "weights.pth"))


def _ops(path) -> dict[tuple[str, str], int]:
    ops: dict[tuple[str, str], int] = {}
    for n in onnx.load(str(path)).graph.node:
        ops[(n.domain, n.op_type)] = ops.get((n.domain, n.op_type), 0) + 1
    return ops


def test_the_runtime_probe_is_the_model_onnx_builds():
    graph = helper.make_graph([helper.make_node("ReorderInput", ["x"], ["y"], domain=DOMAIN)], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                              ir_version=8)
    assert model.SerializeToString() == _NCHWC_PROBE
    assert BLOCK in (8, 16)


def test_nchwc_multitask_matches_torch_and_the_portable_graph(bundle, tmp_path):
    result = main_export(bundle, tmp_path / "nchwc", mode="multitask", nchwc_block=BLOCK, samples=16)
    assert result.ok, result.report.summary()  # every task, adapter and inputs, against the PyTorch model
    assert [c.max_diff <= 1e-4 for c in result.report.checks] == [True] * 9  # adapter, inputs, weights
    main_export(bundle, tmp_path / "plain", mode="multitask", verify=False)
    ops, plain_ops = _ops(tmp_path / "nchwc" / "model.onnx"), _ops(tmp_path / "plain" / "model.onnx")
    # every conv moved to the blocked kernels, and the Conv -> Add -> Relu chains were fused into them
    assert ops[(DOMAIN, "Conv")] == plain_ops[("", "Conv")] and ("", "Conv") not in ops
    assert ops.get(("", "Relu"), 0) < plain_ops[("", "Relu")]
    if ("", "MaxPool") in plain_ops:  # resnet18: blocked from the stem on (its ReorderInput is the block check's)
        assert ops[(DOMAIN, "MaxPool")] == 1 and ops[(DOMAIN, "ReorderInput")] == 1
    model = onnx.load(str(tmp_path / "nchwc" / "model.onnx"))
    assert {p.key: p.value for p in model.metadata_props}["nchwc_block"] == str(BLOCK)
    # the same task tensors by name, the masks packed in the blocked filter order, the same logits
    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    logits, feeds = {}, {}
    for d in ("nchwc", "plain"):
        sess = ort.InferenceSession(str(tmp_path / d / "model.onnx"), providers=["CPUExecutionProvider"])
        feeds[d] = read_adapter(tmp_path / d / "adapters" / "alpha.onnx_adapter")
        logits[d] = sess.run(None, {"image": x, **feeds[d]})[0]
    assert sorted(feeds["nchwc"]) == sorted(feeds["plain"])
    assert any(not np.array_equal(v, feeds["plain"][k]) for k, v in feeds["nchwc"].items() if k.endswith(".mask"))
    np.testing.assert_allclose(logits["nchwc"], logits["plain"], atol=1e-4)
    image = tmp_path / "x.npy"
    np.save(image, x[0])
    shown = [pbexport("predict", tmp_path / "nchwc", image, "--task", "alpha", "--json", "--feed", feed)
             for feed in ("adapter", "weights")]
    assert [r.returncode for r in shown] == [0, 0] and shown[0].stdout == shown[1].stdout
    for feed in ("adapter", "weights"):  # weights: unpacked once for the task, then the body graph per run
        with open_model(tmp_path / "nchwc", feed=feed) as engine:
            for task in ("alpha", "beta", "alpha"):
                got = engine.logits(x, task=task)
                if task == "alpha":
                    np.testing.assert_allclose(got, logits["plain"], atol=1e-4)


def test_blocked_filter_layout_is_the_kernels():
    """BlockedFilter against onnxruntime's nchwc.Conv on a plain NCHW conv: stem (OIHWBo), padded channels."""
    rng = np.random.default_rng(0)
    for in_ch, out_ch in ((3, 16), (16, 32), (20, 24)):
        x = rng.standard_normal((2, in_ch, 6, 6)).astype(np.float32)
        w = rng.standard_normal((out_ch, in_ch, 3, 3)).astype(np.float32)
        f = BlockedFilter(w.shape, BLOCK)
        nodes = [] if f.first else [helper.make_node("ReorderInput", ["x"], ["xb"], domain=DOMAIN)]
        nodes += [helper.make_node("Conv", ["x" if f.first else "xb", "w"], ["yb"], domain=DOMAIN, pads=[1] * 4),
                  helper.make_node("ReorderOutput", ["yb"], ["y"], domain=DOMAIN, channels=out_ch)]
        graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape),
                                                  helper.make_tensor_value_info("w", TensorProto.FLOAT, f.padded)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x, "w": f.apply(w)})[0]
        want = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_graph_for_another_block_size_is_refused(tmp_path):
    root = tmp_path / "b"
    root.mkdir()
    bundle = _make_bundle(root, "cifar_resnet20", 32)
    out = tmp_path / "other"
    main_export(bundle, out, mode="multitask", nchwc_block=OTHER, verify=False)
    with pytest.raises(PbexportError, match=f"NCHWc block size {OTHER}; this CPU's onnxruntime has block size {BLOCK}"):
        open_model(out)
    image = tmp_path / "x.npy"
    np.save(image, np.zeros((32, 32, 3), np.uint8))
    assert_one_line_error(pbexport("predict", out, image, "--task", "alpha"), "export without --nchwc-block")
    # with onnxruntime alone, the graph's own check fails the run instead of computing with the wrong layout
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = read_adapter(out / "adapters" / "alpha.onnx_adapter")
    with pytest.raises(Exception, match=CHECK_NODE):
        sess.run(None, {"image": np.zeros((1, 3, 32, 32), np.float32), **feeds})


def test_block_size_option_is_checked_before_anything_is_written(tmp_path):
    bundle = tmp_path / "no-bundle-needed"
    for mode, block, message in (("baked", BLOCK, "applies to the multitask mode"),
                                 ("multitask", 4, "must be one of 8, 16")):
        with pytest.raises(PbexportError, match=message):
            main_export(bundle, tmp_path / "out", mode=mode, nchwc_block=block)
    assert not (tmp_path / "out").exists()
    r = pbexport("onnx", bundle, "--multitask", "--nchwc-block", "4", "-o", tmp_path / "out")
    assert r.returncode == 2 and "'4' is not one of '8', '16'" in r.stderr
    r = pbexport("nchwc-block")
    assert r.returncode == 0 and r.stdout.strip() == str(BLOCK)
