"""ONNX export in three modes (baked, shared, multitask) and their verification against PyTorch."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import make_arrays
from safetensors.torch import load_file, save_file
from test_cli import assert_one_line_error, pbexport

from pbexport import PbexportError
from pbexport.backbones import build_architecture
from pbexport.bundle import load_bundle, pack_runs
from pbexport.export import main_export, verify_export
from pbexport.export.verify import read_adapter
from pbexport.runtime import open_model
from pbexport.training import TrainConfig, train

# (task, classes, method, per-task BN): different class counts, one task with its own BN, one head-only
TASKS = [("alpha", 3, "piggyback", True), ("beta", 5, "piggyback", False), ("gamma", 2, "classifier", False)]
DENSITY = 0.8
ort.set_default_logger_severity(3)  # overridable initializers are by design: no warning per tensor


def _calibrated_weights(arch: str, size: int, path: Path) -> Path:
    """A random-init backbone whose BN statistics match its own activations (logits stay O(1))."""
    torch.manual_seed(0)
    net = build_architecture(arch, 10)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.rand(32, 3, size, size))
    torch.save(net.state_dict(), path)
    return path


def _make_bundle(root: Path, arch: str, size: int, weights: Path | None = None) -> Path:
    runs = []
    for i, (task, classes, method, bn) in enumerate(TASKS):
        data = root / f"{task}.npz"
        np.savez(data, **make_arrays(n_train=16, n_test=8, classes=classes, size=size, seed=i))
        cfg = TrainConfig(backbone=arch, data=str(data), task=task, weights=str(weights) if weights else None,
                          method=method, train_bn=bn, epochs=1, batch_size=8, val_fraction=0.25, input_size=size)
        train(cfg, root / "runs" / task, progress=False)
        runs.append(root / "runs" / task)
        if method == "piggyback":  # a few training steps flip no mask: set a known density instead
            path = root / "runs" / task / "model.safetensors"
            state = load_file(str(path))
            gen = torch.Generator().manual_seed(i)
            for k, v in state.items():
                if k.startswith("scores."):
                    state[k] = torch.where(torch.rand(v.shape, generator=gen) < DENSITY, 1e-2, 0.0)
            save_file(state, str(path))
    pack_runs(runs, root / "bundle")
    return root / "bundle"


@pytest.fixture(scope="module", params=[("cifar_resnet20", 32), ("resnet18", 32)], ids=["cifar_resnet20", "resnet18"])
def bundle(request, tmp_path_factory) -> Path:
    arch, size = request.param
    root = tmp_path_factory.mktemp(arch)
    return _make_bundle(root, arch, size, _calibrated_weights(arch, size, root / "weights.pth"))


@pytest.fixture(scope="module")
def r20_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("r20")
    return _make_bundle(root, "cifar_resnet20", 32, _calibrated_weights("cifar_resnet20", 32, root / "weights.pth"))


@pytest.fixture(scope="module")
def exports(r20_bundle, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exports")
    paths = {"baked": out / "baked", "shared": out / "shared", "multitask": out / "multitask"}
    for mode, path in paths.items():
        result = main_export(r20_bundle, path, mode=mode, verify=False)
        assert result.report is None
    return paths


def _metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _reference(bundle: Path, task: str, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return load_bundle(bundle).task_model(task)(torch.from_numpy(x)).numpy()


# ----------------------------------------------------------------------------- all modes, both families
def test_every_mode_passes_verification(bundle, tmp_path):
    b = load_bundle(bundle)
    for mode in ("baked", "shared", "multitask"):
        result = main_export(bundle, tmp_path / mode, mode=mode, samples=16)
        assert result.ok, result.report.summary()
        checks = result.report.checks
        assert len(checks) == (9 if mode == "multitask" else 3)  # adapter, inputs, weights
        for c in checks:
            assert c.ok and c.max_diff is not None and c.top1 == 1.0  # within atol + rtol x max |logit|
            assert c.shape == (16, b.task_info(c.task)["num_classes"])
    for f in sorted(tmp_path.rglob("*.onnx")):
        onnx.checker.check_model(str(f), full_check=True)


def test_single_baked_file_and_metadata(r20_bundle, tmp_path):
    out = tmp_path / "alpha.onnx"
    result = main_export(r20_bundle, out, tasks=["alpha"], samples=4)
    assert result.ok and result.files == [out] and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpha.onnx"]  # no temporary left behind
    meta = _metadata(out)
    assert meta["task"] == "alpha" and meta["mode"] == "baked" and meta["input_size"] == "32"
    assert json.loads(meta["class_names"]) == load_bundle(r20_bundle).task_info("alpha")["class_names"]
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406]) and meta["batch"] == "dynamic"
    assert meta["pbexport_version"] and meta["backbone_fingerprint"] == load_bundle(r20_bundle).fingerprint
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), outs = sess.get_inputs(), sess.get_outputs()
    assert inp.name == "image" and inp.type == "tensor(float)" and inp.shape == ["batch", 3, 32, 32]
    assert outs[0].name == "logits" and outs[0].shape == ["batch", 3]
    assert len(onnx.load(str(out)).graph.initializer) and not list(tmp_path.glob("*.data"))  # standalone


def test_shared_layout_and_folding(exports, r20_bundle, tmp_path):
    d = exports["shared"]
    assert sorted(p.name for p in d.iterdir()) == ["alpha.onnx", "backbone.onnx.data", "beta.onnx", "gamma.onnx"]
    b = load_bundle(r20_bundle)
    masked = sum(int(np.prod(s)) for s in b.masked_shapes.values())
    for task in b.tasks:
        model = onnx.load(str(d / f"{task}.onnx"), load_external_data=False)
        external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert len(external) == 1 and {e.key: e.value for e in external[0].external_data}["location"] == \
            "backbone.onnx.data"
        packed = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
        if b.task_info(task)["method"] == "piggyback":
            assert [int(np.prod(t.dims)) for t in packed] == [-(-masked // 8)]  # 1 bit per masked parameter
        else:
            assert not packed
        dense = sum(v.nbytes for v in b.task_tensors(task).values())
        assert (d / f"{task}.onnx").stat().st_size <= (masked / 8 if packed else 0) + dense + 6000
    # onnxruntime folds the unpack + multiply at session creation: no Gather/Mul/Split is left to run
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(d / "alpha.onnx"), so, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert not ops & {"Gather", "Split", "Mul", "Cast", "BatchNormalization"}, ops


def test_multitask_adapters_inputs_iobinding_and_task_switching(exports, r20_bundle):
    d = exports["multitask"]
    index = json.loads((d / "tasks.json").read_text())
    assert index["format"] == "pbexport-multitask" and index["model"] == "model.onnx"
    assert {t: (e["num_classes"], e["adapter"]) for t, e in index["tasks"].items()} == {
        "alpha": (3, "adapters/alpha.onnx_adapter"), "beta": (5, "adapters/beta.onnx_adapter"),
        "gamma": (2, "adapters/gamma.onnx_adapter")}
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    overridable = {i.name for i in sess.get_overridable_initializers()}
    assert {"conv1.weight.mask", "linear.weight", "linear.bias", "bn1.scale", "bn1.shift"} <= overridable
    assert [i.name for i in sess.get_inputs()] == ["image"]
    x = np.random.default_rng(1).random((6, 3, 32, 32), dtype=np.float32)
    gamma_tensors = read_adapter(d / "adapters" / "gamma.onnx_adapter")
    assert sorted(gamma_tensors) == ["linear.bias", "linear.weight"]  # head-only task: masks/BN keep defaults
    assert "bn1.scale" not in read_adapter(d / "adapters" / "beta.onnx_adapter")
    for task in ["alpha", "gamma", "beta", "alpha"]:  # switch tasks in one session, run after run
        ref = _reference(r20_bundle, task, x)
        adapter = ort.LoraAdapter()
        adapter.Load(str(d / "adapters" / f"{task}.onnx_adapter"))
        ro = ort.RunOptions()
        ro.add_active_adapter(adapter)
        via_adapter = sess.run(None, {"image": x}, ro)[0]
        tensors = read_adapter(d / "adapters" / f"{task}.onnx_adapter")
        via_inputs = sess.run(None, {"image": x, **tensors})[0]
        binding = sess.io_binding()  # task tensors as OrtValues (on a GPU: OrtValue.ortvalue_from_numpy(v, "cuda"))
        binding.bind_cpu_input("image", x)
        values = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in tensors.items()}
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits")
        sess.run_with_iobinding(binding)
        via_binding = binding.copy_outputs_to_cpu()[0]
        for out in (via_adapter, via_inputs, via_binding):
            assert out.shape == ref.shape and np.abs(out - ref).max() <= 1e-4
    # feed="weights": unpack.onnx computes a task's weights once, body.onnx runs on them; both read model.onnx.data
    assert (index["unpack"], index["body"]) == ("unpack.onnx", "body.onnx")
    assert len(index["weights"]) == len(load_bundle(r20_bundle).masked_names)
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    unpack = onnx.load(str(d / "unpack.onnx"), load_external_data=False)
    assert {e.value for t in unpack.graph.initializer for e in t.external_data if e.key == "location"} == {
        "model.onnx.data"}
    with open_model(d, feed="weights") as engine:
        for task in ["alpha", "gamma", "beta", "alpha"]:
            assert np.abs(engine.logits(x, task=task) - _reference(r20_bundle, task, x)).max() <= 1e-4
    old = d.parent / "old-multitask"  # exported before body.onnx: feed="weights" says so
    shutil.copytree(d, old)
    (old / "tasks.json").write_text(json.dumps({k: v for k, v in index.items()
                                                if k not in ("unpack", "body", "weights")}))
    with pytest.raises(PbexportError, match="no unpack and body graphs for feed='weights'"):
        open_model(old, feed="weights")
    # no adapter: the defaults are the plain backbone with its own classifier
    with torch.no_grad():
        plain = load_bundle(r20_bundle).backbone()
        expected = plain.model((torch.from_numpy(x) - torch.tensor(plain.spec.mean).view(1, 3, 1, 1))
                               / torch.tensor(plain.spec.std).view(1, 3, 1, 1)).numpy()
    assert np.abs(sess.run(None, {"image": x})[0] - expected).max() <= 1e-4


def test_multitask_unpack_uses_only_portable_ops(exports):
    """Per-run ops must have CUDA kernels: no BitShift/BitwiseAnd (the CPU-only unpackers)."""
    model = onnx.load(str(exports["multitask"] / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"BitShift", "BitwiseAnd", "BitwiseOr", "BatchNormalization"}
    assert {"Cast", "Gather", "Reshape", "Mul"} <= ops


ORT_ONLY = textwrap.dedent("""
    import sys
    for name in ("torch", "pbexport", "torchvision", "safetensors"):
        sys.modules[name] = None  # any import of them now fails
    import json
    import numpy as np
    import onnxruntime as ort
    x = np.load(sys.argv[1])
    out = {}
    for path in sys.argv[2:]:
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        meta = sess.get_modelmeta().custom_metadata_map
        out[path] = {"logits": sess.run(["logits"], {"image": x})[0].tolist(), "task": meta["task"],
                     "classes": json.loads(meta["class_names"])}
    try:
        import torch  # noqa: F401
        out["torch_blocked"] = False
    except ImportError:
        out["torch_blocked"] = True
    print(json.dumps(out))
""")


def test_baked_and_shared_run_with_onnxruntime_alone(exports, r20_bundle, tmp_path):
    x = np.random.default_rng(2).random((5, 3, 32, 32), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    files = [exports["baked"] / "beta.onnx", exports["shared"] / "alpha.onnx", exports["shared"] / "beta.onnx"]
    r = subprocess.run([sys.executable, "-c", ORT_ONLY, str(tmp_path / "x.npy"), *map(str, files)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got.pop("torch_blocked") is True
    for f in files:
        task = f.stem
        assert got[str(f)]["task"] == task
        assert got[str(f)]["classes"] == load_bundle(r20_bundle).task_info(task)["class_names"]
        assert np.abs(np.array(got[str(f)]["logits"]) - _reference(r20_bundle, task, x)).max() <= 1e-4


def test_baked_quantizes(exports, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"image": rng.random((4, 3, 32, 32), dtype=np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self.batches, None)

    out = tmp_path / "q.onnx"
    quantize_static(str(exports["baked"] / "alpha.onnx"), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True)
    assert out.stat().st_size < 0.5 * (exports["baked"] / "alpha.onnx").stat().st_size
    logits = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"image": np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32)})[0]
    assert logits.shape == (2, 3) and np.isfinite(logits).all()


def test_fixed_batch_input_size_and_opset(r20_bundle, tmp_path):
    result = main_export(r20_bundle, tmp_path / "b", mode="shared", tasks=["alpha"], batch=4, input_size=40,
                         opset=13, samples=6)
    assert result.ok, result.report.summary()
    sess = ort.InferenceSession(str(tmp_path / "b" / "alpha.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [4, 3, 40, 40] and sess.get_outputs()[0].shape == [4, 3]
    assert _metadata(tmp_path / "b" / "alpha.onnx")["input_size"] == "40"
    assert onnx.load(str(tmp_path / "b" / "alpha.onnx"), load_external_data=False).opset_import[0].version == 13
    with pytest.raises(PbexportError, match="--opset 7 is not supported"):
        main_export(r20_bundle, tmp_path / "c", mode="shared", opset=7)
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- verify
def test_tolerance_scales_with_each_samples_logits():
    """|diff| <= atol + rtol * max |logit| per sample: one error passes beside large logits, fails beside small."""
    from types import SimpleNamespace

    from pbexport.export.verify import INPUT_NAME, OUTPUT_NAME, Check, _check_run

    ref = np.array([[20.0, -3.0, 1.0], [1.0, 0.5, -0.2]], np.float32)

    class Session:  # the two calls _check_run makes, and a run that returns ref + err
        def __init__(self, err):
            self.err = err

        def get_outputs(self):
            return [SimpleNamespace(name=OUTPUT_NAME)]

        def get_inputs(self):
            return [SimpleNamespace(name=INPUT_NAME, shape=["N", 3, 4, 4])]

        def run(self, names, feeds, options=None):
            n = len(feeds[INPUT_NAME])
            return [ref[:n] + self.err[:n]]

    x = np.zeros((2, 3, 4, 4), np.float32)
    err = np.zeros_like(ref)
    err[0, 1] = 2.5e-4  # within 1e-4 + 1e-5 * 20 = 3e-4
    check = Check("t", "baked", "f.onnx")
    _check_run(check, Session(err), x, ref, 1e-4, 1e-5)
    assert check.ok and check.max_diff == pytest.approx(2.5e-4, rel=1e-3)
    err[1, 2] = 1.5e-4  # above 1e-4 + 1e-5 * 1
    check = Check("t", "baked", "f.onnx")
    _check_run(check, Session(err), x, ref, 1e-4, 1e-5)
    assert len(check.problems) == 1 and "on 1 of 2 samples" in check.problems[0]
    check = Check("t", "baked", "f.onnx")  # without the relative term the first sample fails too
    _check_run(check, Session(err), x, ref, 1e-4, 0.0)
    assert "on 2 of 2 samples" in check.problems[0]
    for bad in (-1e-5, float("nan")):  # refused before anything is opened
        with pytest.raises(PbexportError, match="--rtol must be a number >= 0"):
            verify_export("no-bundle", "no-export", rtol=bad)


def test_verify_later_and_detects_a_wrong_model(exports, r20_bundle, tmp_path):
    report = verify_export(r20_bundle, exports["multitask"], tasks=["beta"], samples=4)
    assert report.ok and [c.mode for c in report.checks] == ["multitask (adapter)", "multitask (inputs)",
                                                             "multitask (weights)"]
    # a baked file whose head was tampered with fails on tolerance, and the table says so
    model = onnx.load(str(exports["baked"] / "beta.onnx"))
    for t in model.graph.initializer:
        if t.name == "linear.bias":
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) + 0.01, t.name))
    onnx.save(model, str(tmp_path / "beta.onnx"))
    report = verify_export(r20_bundle, tmp_path / "beta.onnx", samples=4)
    assert not report.ok and "max |diff|" in report.failures()[0] and "FAIL" in report.table()
    with pytest.raises(PbexportError, match="holds no export of task 'alpha'"):
        verify_export(r20_bundle, tmp_path / "beta.onnx", tasks=["alpha"])


def test_cli_onnx_and_verify(r20_bundle, tmp_path):
    r = pbexport("onnx", r20_bundle, "--task", "beta", "-o", tmp_path / "beta.onnx", "--samples", "4")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^beta +baked .* ok$", r.stdout, re.M) and "1 checks passed" in r.stdout
    r = pbexport("verify", r20_bundle, "--onnx", tmp_path / "beta.onnx", "--task", "beta", "--atol", "0",
                 "--rtol", "0", "--samples", "4")
    assert r.returncode == 1 and "FAIL" in r.stdout  # float32 rounding is not zero
    r = pbexport("verify", r20_bundle, "--onnx", tmp_path / "beta.onnx", "--atol", "0", "--rtol", "0", "--no-strict",
                 "--samples", "4")
    assert r.returncode == 0 and "FAILED" in r.stdout


def test_cli_bad_input_leaves_nothing_behind(r20_bundle, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(pbexport("onnx", r20_bundle, "--task", "nope", "-o", out / "x.onnx"),
                          "unknown task 'nope' (bundle has: alpha, beta, gamma)")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(pbexport("onnx", r20_bundle, "--shared", "-o", out), "output exists (use --force")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert_one_line_error(pbexport("onnx", r20_bundle, "--all", "--task", "beta", "-o", tmp_path / "y"),
                          "give --task or --all, not both")
    assert_one_line_error(pbexport("verify", r20_bundle, "--onnx", tmp_path / "missing"), "no such file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_corrupt_bundle_is_refused_before_writing(r20_bundle, tmp_path):
    import shutil

    bad = tmp_path / "bundle"
    shutil.copytree(r20_bundle, bad)
    task_file = next((bad / "tasks").glob("beta.*.safetensors"))
    data = bytearray(task_file.read_bytes())
    data[-1] ^= 0xFF
    task_file.write_bytes(bytes(data))
    for args in (["--all"], ["--shared"], ["--multitask"]):
        assert_one_line_error(pbexport("onnx", bad, *args, "-o", tmp_path / "out", "--no-verify"), "sha256")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_force_replaces_a_directory_without_merging(r20_bundle, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.onnx").write_text("old")
    main_export(r20_bundle, out, mode="baked", tasks=["gamma", "beta"], force=True, verify=False)
    assert sorted(p.name for p in out.iterdir()) == ["beta.onnx", "gamma.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(PbexportError, match="a .onnx file holds one task, not 2"):
        main_export(r20_bundle, tmp_path / "two.onnx", tasks=["gamma", "beta"])


# ----------------------------------------------------------------------------- real data (when present)
def test_real_weights_and_data(resnet20_weights, shared_data, tmp_path):
    """Pretrained CIFAR-10 ResNet-20, GTSRB/MNIST tasks (one with per-task BN): 256 real images.
    (tools/accept_export.py runs the full acceptance: longer training, resnet18 too, each task on its own data.)"""
    runs = []
    for task, data, bn, method in [("gtsrb", "gtsrb32.npz", True, "piggyback"), ("mnist", "mnist28.npz", False,
                                   "piggyback"), ("gtsrb-head", "gtsrb32.npz", False, "classifier")]:
        cfg = TrainConfig(backbone="cifar_resnet20", data=str(shared_data / data), task=task,
                          weights=str(resnet20_weights), method=method, train_bn=bn, epochs=1, batch_size=32,
                          max_train_samples=128, val_fraction=0.25)
        train(cfg, tmp_path / task, progress=False)
        runs.append(tmp_path / task)
    pack_runs(runs, tmp_path / "bundle")
    for mode in ("baked", "shared", "multitask"):
        result = main_export(tmp_path / "bundle", tmp_path / mode, mode=mode, data=str(shared_data / "gtsrb32.npz"),
                             samples=256)
        assert result.ok, result.report.summary()
        assert all(c.samples == 256 and c.top1 == 1.0 and c.max_diff <= 1e-4 for c in result.report.checks)
