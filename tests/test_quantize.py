import json
import subprocess
import sys

import numpy as np
import pytest

from pbexport.bundle import pack_runs
from pbexport.export import main_export
from pbexport.training import TrainConfig, train


def pbexport(*args):
    return subprocess.run([sys.executable, "-m", "pbexport", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_npz):
    root = tmp_path_factory.mktemp("quantize")
    train(TrainConfig(backbone="cifar_resnet20", data=str(tiny_npz), task="tiny", epochs=1, batch_size=8,
                      max_train_samples=16, input_size=32), root / "run", progress=False)
    pack_runs([root / "run"], root / "bundle")
    main_export(root / "bundle", root / "tiny.onnx", mode="baked", tasks=["tiny"], verify=False)
    main_export(root / "bundle", root / "shared", mode="shared", verify=False)
    return root


def test_quantize_baked_reports_size_accuracy_and_latency(exported, tiny_npz):
    out = exported / "tiny.int8.onnx"
    r = pbexport("quantize", exported / "tiny.onnx", "-o", out, "--calib", tiny_npz, "--per-channel", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["int8_bytes"] == out.stat().st_size
    assert report["size_ratio"] > 3.0  # float32 -> int8 weights
    assert report["samples"] == 24 and 0.0 <= report["int8_accuracy"] <= 1.0
    assert report["int8_latency_ms"] > 0

    from pbexport.runtime import open_model, read_onnx_metadata

    meta = read_onnx_metadata(out)
    assert meta["quantization"] == "int8-static-qdq-per-channel" and meta["task"] == "tiny"
    engine = open_model(out)  # the runtime opens it like any baked export
    assert engine.logits(np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)).shape == (2, 3)


@pytest.mark.parametrize("case", ["shared", "not_onnx", "exists", "quantized"])
def test_quantize_refusals(exported, tiny_npz, tmp_path, case):
    target, out = exported / "tiny.onnx", tmp_path / "q.onnx"
    if case == "shared":
        target = exported / "shared" / "tiny.onnx"
        expected = "only baked exports can be quantized (this is a shared export"
    elif case == "not_onnx":
        target = tmp_path / "x.onnx"
        target.write_bytes(b"hello")
        expected = "x.onnx: not an ONNX model"
    elif case == "exists":
        out.write_bytes(b"keep me")
        expected = "q.onnx: output exists (use --force to overwrite)"
    else:
        assert pbexport("quantize", target, "-o", out, "--calib", tiny_npz).returncode == 0
        target, out = out, tmp_path / "qq.onnx"
        expected = "already quantized"
    r = pbexport("quantize", target, "-o", out, "--calib", tiny_npz)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.stderr
    if case == "exists":
        assert out.read_bytes() == b"keep me"


def test_ort_format_of_float_and_int8_baked_models(exported, tiny_npz, tmp_path):
    import onnxruntime as ort

    int8 = tmp_path / "tiny.int8.onnx"
    assert pbexport("quantize", exported / "tiny.onnx", "-o", int8, "--calib", tiny_npz).returncode == 0
    for model, out in ((exported / "tiny.onnx", tmp_path / "tiny.ort"), (int8, None)):
        r = pbexport("ort", model, *(["-o", out] if out else []))
        assert r.returncode == 0, r.stderr
        out = out or int8.with_suffix(".ort")
        assert "same logits as the .onnx" in r.stdout
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert session.get_modelmeta().custom_metadata_map["task"] == "tiny"
        assert session.run(None, {"image": np.zeros((1, 3, 32, 32), np.float32)})[0].shape == (1, 3)


def test_ort_format_refuses_shared_exports(exported, tmp_path):
    r = pbexport("ort", exported / "shared" / "tiny.onnx", "-o", tmp_path / "x.ort")
    assert r.returncode == 2 and "only baked exports convert to ORT format" in r.stderr
    assert not (tmp_path / "x.ort").exists()
