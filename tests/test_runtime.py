"""pbexport.runtime and `pbexport predict`: torch-free inference on every export form.

Same top-1 as the PyTorch task models (tiny tasks always; 256 real test images per task when
../shared/data is there), torch never imported, task switching and the session/tensor caches,
preprocessing against training's, every bad input as one line and exit code 2, and a fresh venv
with the base install only (no torch) predicting from exported files.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, make_arrays
from PIL import Image
from safetensors.torch import load_file, save_file

from pbexport import PbexportError, runtime
from pbexport.bundle import load_bundle, pack_runs
from pbexport.cli import main
from pbexport.data import load_data, to_model_input
from pbexport.export import main_export
from pbexport.training import TrainConfig, train

MODES = ("baked", "shared", "multitask")
# (task, classes, method, per-task BN): different class counts, per-task BN, a head-only task
TASKS = [("alpha", 3, "piggyback", True), ("beta", 4, "piggyback", False), ("gamma", 2, "classifier", False)]


# ----------------------------------------------------------------------------- fixtures
def _set_density(run: Path, density: float, seed: int) -> None:
    """One epoch on 16 images flips no mask: give the run's scores a known random density instead."""
    path = run / "model.safetensors"
    state = load_file(str(path))
    gen = torch.Generator().manual_seed(seed)
    for k, v in state.items():
        if k.startswith("scores."):
            state[k] = torch.where(torch.rand(v.shape, generator=gen) < density, 1e-2, 0.0)
    save_file(state, str(path))


def _train(root: Path, task: str, data, method: str, bn: bool, seed: int, weights=None, val: float = 0.25) -> Path:
    cfg = TrainConfig(backbone="cifar_resnet20", data=str(data), task=task, method=method, train_bn=bn, epochs=1,
                      batch_size=8, max_train_samples=16, val_fraction=val, input_size=32,
                      weights=None if weights is None else str(weights))
    run = root / "runs" / task
    train(cfg, run, progress=False)
    if method == "piggyback":
        _set_density(run, 0.8, seed)
    return run


def _export_all(bundle: Path, out: Path) -> dict[str, Path]:
    paths = {m: out / m for m in MODES}
    for mode, path in paths.items():
        main_export(bundle, path, mode=mode, verify=False)
    return paths


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 3-task bundle, its exports in all modes, and per task its test images (uint8 NHWC) as PNGs."""
    root = tmp_path_factory.mktemp("runtime")
    runs, images = [], {}
    for i, (task, classes, method, bn) in enumerate(TASKS):
        data = root / f"{task}.npz"
        arrays = make_arrays(n_train=16, n_test=12, classes=classes, seed=i)
        np.savez(data, **arrays)
        runs.append(_train(root, task, data, method, bn, i))
        imgs = np.concatenate([arrays["test_images"],
                               np.random.default_rng(i).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)])
        files = []
        for j, im in enumerate(imgs):
            files.append(root / "images" / task / f"{j:03d}.png")
            files[-1].parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(files[-1])
        images[task] = (imgs, files)
    pack_runs(runs, root / "bundle")
    exports = _export_all(root / "bundle", root / "exports")
    exports["baked file"] = root / "exports" / "alpha.onnx"
    main_export(root / "bundle", exports["baked file"], tasks=["alpha"], verify=False)
    return {"root": root, "bundle": root / "bundle", "exports": exports, "images": images}


def _torch_logits(bundle: Path, task: str, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return load_bundle(bundle).task_model(task)(torch.from_numpy(x)).numpy()


def _assert_same_top1(ours: np.ndarray, ref: np.ndarray, tol: float = 1e-4) -> None:
    """Same best class on every sample (a reference near-tie within ``tol`` is not a disagreement)."""
    rows = np.arange(len(ref))
    top_ref, top = ref.argmax(1), ours.argmax(1)
    real = (top_ref != top) & (ref[rows, top_ref] - ref[rows, top] > tol)
    assert not real.any(), f"top-1 differs on {int(real.sum())} of {len(ref)} samples"


def cli(*args) -> tuple[int, str, str]:
    """`pbexport ARGS` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code or 0
    return code, out.getvalue(), err.getvalue()


def one_line_error(code: int, stdout: str, stderr: str) -> str:
    assert code == 2, (code, stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


# ----------------------------------------------------------------------------- parity with PyTorch
@pytest.mark.parametrize("mode", MODES)
def test_same_logits_and_top1_as_torch_in_every_mode(world, mode):
    engine = runtime.open_model(world["exports"][mode])
    assert engine.mode == mode and engine.tasks == ["alpha", "beta", "gamma"]
    bundle = load_bundle(world["bundle"])
    for task in ["alpha", "gamma", "beta", "alpha"]:  # switch back and forth
        imgs, files = world["images"][task]
        x = to_model_input(imgs, 32).numpy()
        ref = _torch_logits(world["bundle"], task, x)
        assert engine.classes(task) == bundle.task_info(task)["class_names"]
        ours = engine.logits(x, task)
        assert ours.shape == ref.shape and np.abs(ours - ref).max() <= 1e-4
        preds = engine.predict(files, task=task, top_k=2)  # PNG files: the runtime's own preprocessing
        assert [p.source for p in preds] == [str(f) for f in files]
        from_files = engine.logits(files, task)
        _assert_same_top1(from_files, ref)
        assert np.abs(from_files - ref).max() <= 1e-4  # lossless PNGs at the input size: the same inputs
        assert [p.index for p in preds] == list(ref.argmax(1))
        assert all(p.name == engine.classes(task)[p.index] and p.top_k[0].index == p.index for p in preds)


def test_multitask_adapter_feed_equals_inputs_feed(world):
    d = world["exports"]["multitask"]
    x = np.random.default_rng(3).random((5, 3, 32, 32), dtype=np.float32)
    a, b = runtime.open_model(d, feed="adapter"), runtime.open_model(d, feed="inputs")
    for task in ["beta", "alpha", "gamma", "beta"]:
        assert np.abs(a.logits(x, task) - b.logits(x, task)).max() <= 1e-5
    with pytest.raises(PbexportError, match="unknown feed"):
        runtime.open_model(d, feed="magic")


def test_single_baked_file_needs_no_task(world):
    engine = runtime.open_model(world["exports"]["baked file"])
    assert engine.tasks == ["alpha"] and engine.mode == "baked" and engine.backbone == "cifar_resnet20"
    imgs, files = world["images"]["alpha"]
    p = engine.predict(files[0])  # the only task
    assert len(p) == 1 and p[0].task == "alpha" and p[0].source == str(files[0])
    spec = engine.input_spec()
    assert spec.size == 32 and spec.channels == 3 and spec.mean == pytest.approx((0.485, 0.456, 0.406))


def test_real_data_256_samples_per_task_same_top1(shared_data, resnet20_weights, tmp_path):
    """Acceptance: 256 real test images per task, read from image files, same top-1 as PyTorch in every mode."""
    specs = [("gtsrb", shared_data / "gtsrb32.npz", "piggyback", True),
             ("mnist", shared_data / "mnist28.npz", "piggyback", False),
             ("gtsrb-head", shared_data / "gtsrb32.npz", "classifier", False)]
    runs, files, refs = [], {}, {}
    for i, (task, data, method, bn) in enumerate(specs):
        runs.append(_train(tmp_path, task, data, method, bn, i, resnet20_weights, val=0.0))  # 43 classes, 16 images
    pack_runs(runs, tmp_path / "bundle")
    exports = _export_all(tmp_path / "bundle", tmp_path / "exports")
    for task, data, _, _ in specs:
        test = load_data(str(data)).test.images[:256]
        ref = _torch_logits(tmp_path / "bundle", task, to_model_input(test, 32).numpy())
        refs[task] = ref
        files[task] = []
        for j, im in enumerate(test):  # mnist: 28x28 gray PNGs, resized and made RGB by the runtime
            f = tmp_path / "images" / task / f"{j:03d}.png"
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im[:, :, 0] if im.shape[2] == 1 else im).save(f)
            files[task].append(f)
        assert len(set(ref.argmax(1))) > 1  # not a degenerate comparison
    for mode in MODES:
        engine = runtime.open_model(exports[mode])
        for task in ["mnist", "gtsrb", "gtsrb-head", "mnist"]:
            ours = engine.logits(files[task], task)
            _assert_same_top1(ours, refs[task])
            assert (ours.argmax(1) == refs[task].argmax(1)).all(), (mode, task)
            assert np.abs(ours - refs[task]).max() <= 1e-3


def test_ort_format_file(world, tmp_path):
    """An ORT-format copy of a baked task (what `pbexport ort` writes for onnxruntime-mobile) opens the same."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "alpha.ort")
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(world["exports"]["baked file"]), so, providers=["CPUExecutionProvider"])
    engine = runtime.open_model(tmp_path / "alpha.ort")
    assert engine.tasks == ["alpha"] and engine.classes() == runtime.open_model(world["exports"]["baked"]).classes(
        "alpha")
    imgs, files = world["images"]["alpha"]
    ref = _torch_logits(world["bundle"], "alpha", to_model_input(imgs, 32).numpy())
    assert np.abs(engine.logits(files) - ref).max() <= 1e-4
    assert runtime.open_model(tmp_path).tasks == ["alpha"]  # a directory of .ort files


def test_fixed_batch_export_is_padded(world, tmp_path):
    out = tmp_path / "beta4.onnx"
    main_export(world["bundle"], out, tasks=["beta"], batch=4, verify=False)
    engine = runtime.open_model(out, batch_size=64)
    imgs, files = world["images"]["beta"]
    x = to_model_input(imgs[:7], 32).numpy()
    assert np.abs(engine.logits(x, "beta") - _torch_logits(world["bundle"], "beta", x)).max() <= 1e-4


# ----------------------------------------------------------------------------- torch-free
_TORCH_FREE = """
import json, sys
BLOCK = {block}
for name in BLOCK:
    sys.modules[name] = None  # any import of it raises ImportError
from pbexport import runtime
from pbexport.cli import main
out = {{}}
for name, path in {paths}.items():
    engine = runtime.open_model(path)
    out[name] = [p.index for p in engine.predict({files}, task="alpha")]
try:
    main(["predict", {multitask!r}, "--task", "alpha", "--json", *{files}])
except SystemExit as exc:
    assert not exc.code, exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnx", "onnxscript",
               "safetensors", "zstandard", "tqdm", "matplotlib") and m not in BLOCK)
print(json.dumps({{"labels": out, "heavy": heavy}}))
"""


@pytest.mark.parametrize("block", [["torch", "torchvision", "onnx", "onnxscript"], []], ids=["blocked", "plain"])
def test_runtime_never_imports_torch(world, block):
    paths = {m: str(world["exports"][m]) for m in ("baked", "shared", "multitask", "baked file")}
    files = [str(f) for f in world["images"]["alpha"][1][:6]]
    code = _TORCH_FREE.format(block=block, paths=paths, files=files, multitask=paths["multitask"])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["heavy"] == []  # nor torch, nor onnx: none of them is in the base install
    expected = list(_torch_logits(world["bundle"], "alpha", to_model_input(world["images"]["alpha"][0][:6], 32)
                                  .numpy()).argmax(1))
    assert all(v == expected for v in result["labels"].values())
    assert [json.loads(line)["label"] for line in lines[:-1]] == expected  # the CLI's JSON lines


# ----------------------------------------------------------------------------- caches and switching
def test_shared_sessions_lru_cache(world):
    engine = runtime.open_model(world["exports"]["shared"], cache_size=2)
    x = np.zeros((1, 3, 32, 32), np.float32)
    assert engine.loaded() == []  # nothing is created by opening
    for task in ["alpha", "beta", "alpha"]:
        engine.logits(x, task)
    assert engine.loaded() == ["beta", "alpha"] and engine.stats == {"loads": 2, "hits": 1, "evictions": 0}
    engine.logits(x, "gamma")  # evicts the least recently used (beta)
    assert engine.loaded() == ["alpha", "gamma"] and engine.stats["evictions"] == 1
    sessions = dict(engine._sessions)
    for _ in range(10):  # switching between cached tasks creates nothing
        engine.logits(x, "alpha")
        engine.logits(x, "gamma")
    assert engine.stats["loads"] == 3 and all(engine._sessions[t] is s for t, s in sessions.items())
    engine.close()
    assert engine.loaded() == []
    assert engine.logits(x, "beta").shape == (1, 4)  # comes back lazily


def test_multitask_one_session_and_tensor_cache(world):
    engine = runtime.open_model(world["exports"]["multitask"], cache_size=1)
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    first = {t: engine.logits(x, t) for t in ["alpha", "beta", "gamma"]}
    sess = engine.session()
    assert engine.loaded() == ["gamma"] and engine.stats["evictions"] == 2
    for t in ["beta", "alpha"]:  # re-read after eviction: same results, same session
        assert np.array_equal(engine.logits(x, t), first[t])
    assert engine.session() is sess


def test_bad_engine_arguments(world):
    d = world["exports"]["shared"]
    with pytest.raises(PbexportError, match="cache size must be at least 1"):
        runtime.open_model(d, cache_size=0)
    with pytest.raises(PbexportError, match="unknown provider 'tpu'; choose cpu, cuda or auto"):
        runtime.open_model(d, providers="tpu")
    engine = runtime.open_model(d)
    with pytest.raises(PbexportError, match=r"choose a task \(this model has: alpha, beta, gamma\)"):
        engine.predict(np.zeros((3, 32, 32), np.float32))
    with pytest.raises(PbexportError, match="top-k must be a positive integer"):
        engine.predict(np.zeros((3, 32, 32), np.float32), "alpha", top_k=0)
    assert len(engine.predict(np.zeros((3, 32, 32), np.float32), "gamma", top_k=9)[0].top_k) == 2  # clamped


def test_cuda_provider(world):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(PbexportError, match="CUDAExecutionProvider is not available"):
            runtime.open_model(world["exports"]["multitask"], providers="cuda")
        assert runtime.resolve_providers("auto") == ["CPUExecutionProvider"]
        return
    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    for mode in MODES:
        gpu = runtime.open_model(world["exports"][mode], providers="cuda")
        cpu = runtime.open_model(world["exports"][mode])
        for task in ["alpha", "gamma", "beta"]:
            assert np.abs(gpu.logits(x, task) - cpu.logits(x, task)).max() <= 1e-3


# ----------------------------------------------------------------------------- inputs and preprocessing
def test_preprocessing_matches_training_resize():
    rng = np.random.default_rng(0)
    for src, dst, channels in [(28, 32, 1), (32, 24, 3), (40, 32, 3), (32, 32, 3)]:
        imgs = rng.integers(0, 256, (3, src, src, channels), dtype=np.uint8)
        ref = to_model_input(imgs, dst).numpy()
        ours = np.concatenate([runtime.load_image(Image.fromarray(im[:, :, 0] if channels == 1 else im), dst)
                               for im in imgs])
        assert ours.shape == ref.shape and ours.dtype == np.float32
        assert np.abs(ours - ref).max() <= 1e-5, (src, dst)


def test_image_kinds(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    gray = rgb[:, :, 0]
    base = runtime.load_image(Image.fromarray(rgb), 32)
    assert base.shape == (1, 3, 32, 32) and 0 <= base.min() and base.max() <= 1
    g = runtime.load_image(Image.fromarray(gray), 32)
    assert np.array_equal(g[0, 0], g[0, 2]) and np.allclose(g[0, 0], gray / 255.0)
    opaque = Image.fromarray(np.dstack([rgb, np.full((32, 32), 255, np.uint8)]))
    assert np.array_equal(runtime.load_image(opaque, 32), base)  # an alpha channel that is all opaque is dropped
    g16 = Image.fromarray(gray.astype(np.uint16) * 257)
    assert g16.mode == "I;16" and opaque.mode == "RGBA"
    assert np.allclose(runtime.load_image(g16, 32), g, atol=1e-6)
    np.save(tmp_path / "a.npy", base[0])  # CHW float
    np.save(tmp_path / "b.npy", (base * 255).round().astype(np.uint8))  # NCHW uint8
    assert np.array_equal(runtime.load_image(tmp_path / "a.npy", 32), base)
    assert np.allclose(runtime.load_image(tmp_path / "b.npy", 32), base, atol=1e-6)
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"")
    assert [p.name for p in runtime.list_inputs(tmp_path)] == ["a.npy", "b.npy", "c.jpg"]


def test_bad_inputs_name_themselves(tmp_path):
    size = 32
    cases = {
        "missing.png": (None, "no such file"),
        "text.png": (lambda p: p.write_text("hello"), "not an image (Pillow cannot identify it)"),
        "rgba.png": (lambda p: Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(p),
                     "image has 4 channels (RGBA, with transparent pixels); the model takes RGB or gray: "
                     "flatten it onto a background first"),
        "la.png": (lambda p: Image.fromarray(np.zeros((8, 8, 2), np.uint8)).save(p),
                   "image has 2 channels (LA, with transparent pixels)"),
        "four.npy": (lambda p: np.save(p, np.zeros((1, 4, 32, 32), np.float32)),
                     "array has 4 channels (shape [1, 4, 32, 32]); the model takes 3 (arrays are NCHW or CHW, RGB)"),
        "small.npy": (lambda p: np.save(p, np.zeros((3, 16, 16), np.float32)),
                      "array is 16x16; the model takes 32x32 (resize it, or pass images)"),
        "pickle.npy": (lambda p: np.save(p, np.array([{"a": 1}], dtype=object)), "cannot read array"),
        "truncated.png": (lambda p: p.write_bytes(_png_bytes()[:60]), "cannot read image"),
    }
    for name, (make, message) in cases.items():
        p = tmp_path / name
        if make:
            make(p)
        with pytest.raises(PbexportError) as exc:
            runtime.load_image(p, size)
        assert str(exc.value).startswith(f"{p}: {message}"), str(exc.value)
        assert "\n" not in str(exc.value)
    with pytest.raises(PbexportError, match=r"^<array>: array has 1 channels"):
        runtime.load_image(np.zeros((2, 1, 32, 32), np.float32), size)
    with pytest.raises(PbexportError, match="NaN"):
        runtime.load_image(np.full((3, 32, 32), np.nan, np.float32), size)
    with pytest.raises(PbexportError, match="cannot use a dict as an image"):
        runtime.load_image({}, size)


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_predict_keeps_failures_in_place(world, tmp_path):
    engine = runtime.open_model(world["exports"]["baked"])
    _, files = world["images"]["beta"]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG junk")
    items = [files[0], bad, files[1], tmp_path / "gone.jpg", np.zeros((2, 3, 32, 32), np.float32)]
    with pytest.raises(PbexportError, match="bad.png: "):
        engine.predict(items, "beta")
    out = engine.predict(items, "beta", errors="keep")
    assert [type(r).__name__ for r in out] == ["Prediction", "Failed", "Prediction", "Failed", "Prediction",
                                               "Prediction"]
    assert out[1].source == str(bad) and out[3].message == f"{tmp_path / 'gone.jpg'}: no such file"
    assert [r.source for r in out[4:]] == ["<array>[4][0]", "<array>[4][1]"]


# ----------------------------------------------------------------------------- reading artifacts
def test_metadata_reader_matches_onnx_and_refuses_other_files(world, tmp_path):
    import onnx

    from pbexport.export import multitask, shared

    assert (runtime.SHARED_DATA_FILE, runtime.MULTITASK_INDEX, runtime.MULTITASK_FORMAT) == (
        shared.DATA_FILE, multitask.INDEX_FILE, multitask.INDEX_FORMAT)
    assert multitask.INDEX_VERSION in runtime.MULTITASK_VERSIONS
    for f in sorted(world["root"].joinpath("exports").rglob("*.onnx")):
        expected = {p.key: p.value for p in onnx.load(str(f), load_external_data=False).metadata_props}
        assert runtime.read_onnx_metadata(f) == expected and expected["pbexport_version"]
    plain = tmp_path / "plain.onnx"
    g = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(g), plain)
    assert runtime.read_onnx_metadata(plain) == {}
    with pytest.raises(PbexportError, match=r"plain.onnx: an ONNX model without pbexport metadata"):
        runtime.open_model(plain)
    good = world["exports"]["baked file"].read_bytes()
    rng = np.random.default_rng(0)
    junk = {"empty": b"", "text": b"hello world\n" * 20, "png": _png_bytes(), "truncated": good[:len(good) // 2],
            "random": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "zip": b"PK\x03\x04" + b"\0" * 100}
    for name, data in junk.items():
        p = tmp_path / f"{name}.onnx"
        p.write_bytes(data)
        with pytest.raises(PbexportError, match=r"\.onnx: not an ONNX model$"):
            runtime.read_onnx_metadata(p)


def test_broken_export_layouts(world, tmp_path):
    shared = tmp_path / "shared"
    shutil.copytree(world["exports"]["shared"], shared)
    (shared / "backbone.onnx.data").unlink()
    with pytest.raises(PbexportError, match="shared-backbone graph without its weights file backbone.onnx.data"):
        runtime.open_model(shared)
    multi = tmp_path / "multi"
    shutil.copytree(world["exports"]["multitask"], multi)
    with pytest.raises(PbexportError, match="a multitask graph without its tasks.json next to it"):
        shutil.copy(multi / "model.onnx", tmp_path / "model.onnx")
        runtime.open_model(tmp_path / "model.onnx")
    assert runtime.open_model(multi / "model.onnx").mode == "multitask"  # the graph of a complete directory
    (multi / "adapters" / "beta.onnx_adapter").unlink()
    engine = runtime.open_model(multi)
    assert engine.logits(np.zeros((3, 32, 32), np.float32), "alpha").shape == (1, 3)
    with pytest.raises(PbexportError, match="beta.onnx_adapter: adapter of task 'beta' is missing"):
        engine.logits(np.zeros((3, 32, 32), np.float32), "beta")
    index = json.loads((multi / "tasks.json").read_text())
    (multi / "tasks.json").write_text(json.dumps({**index, "format_version": 99}))
    with pytest.raises(PbexportError, match="multitask format version 99 is not supported"):
        runtime.open_model(multi)
    (multi / "tasks.json").write_text("{not json")
    with pytest.raises(PbexportError, match="tasks.json: cannot read the multitask index"):
        runtime.open_model(multi)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PbexportError, match="no .onnx files and no tasks.json here"):
        runtime.open_model(empty)


# ----------------------------------------------------------------------------- CLI
def test_cli_predict_table_and_json(world):
    imgs, files = world["images"]["beta"]
    expected = _torch_logits(world["bundle"], "beta", to_model_input(imgs, 32).numpy()).argmax(1)
    names = load_bundle(world["bundle"]).task_info("beta")["class_names"]
    image_dir = files[0].parent
    for mode in MODES:
        code, out, err = cli("predict", world["exports"][mode], "--task", "beta", image_dir, "--top-k", "3")
        assert code == 0 and err == "", err
        lines = out.splitlines()
        assert lines[0].split() == ["image", "beta", "class", "probability", "top", "3"]
        rows = lines[2:]
        assert len(rows) == len(files)
        for row, f, label in zip(rows, files, expected, strict=True):
            cells = row.split()
            assert cells[0] == str(f) and cells[1] == names[label] and 0 < float(cells[2]) <= 1
        code, out, err = cli("predict", world["exports"][mode], "--task", "beta", "--json", *files[:3])
        assert code == 0 and err == ""
        records = [json.loads(line) for line in out.splitlines()]
        assert [r["label"] for r in records] == list(expected[:3])
        r = records[0]
        assert r["image"] == str(files[0]) and r["task"] == "beta" and r["class"] == names[r["label"]]
        assert len(r["top_k"]) == 4 and r["top_k"][0]["label"] == r["label"]  # top 5 of 4 classes
        assert sum(t["probability"] for t in r["top_k"]) == pytest.approx(1.0)
    code, out, _ = cli("predict", world["exports"]["baked file"], files[0], "--top-k", "1")
    assert code == 0 and out.splitlines()[0].split() == ["image", "alpha", "class", "probability"]


def test_cli_bad_inputs_one_line_exit_2(world, tmp_path):
    model = world["exports"]["shared"]
    good = world["images"]["alpha"][1][0]
    notonnx = tmp_path / "model.onnx"
    notonnx.write_text("not a model")
    text = tmp_path / "notes.png"
    text.write_text("hello")
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(rgba)
    four = tmp_path / "four.npy"
    np.save(four, np.zeros((4, 32, 32), np.float32))
    cases = [
        (("predict", model, "--task", "alpha", tmp_path / "missing.png"),
         f"error: {tmp_path / 'missing.png'}: no such file"),
        (("predict", model, "--task", "alpha", text), f"error: {text}: not an image (Pillow cannot identify it)"),
        (("predict", model, "--task", "zeta", good), f"error: {model}: unknown task 'zeta' (this model has: alpha, "
                                                     "beta, gamma)"),
        (("predict", model, good), f"error: {model}: choose a task (this model has: alpha, beta, gamma)"),
        (("predict", notonnx, good), f"error: {notonnx}: not an ONNX model"),
        (("predict", tmp_path / "nowhere", good), f"error: {tmp_path / 'nowhere'}: no such file or directory"),
        (("predict", model, "--task", "alpha", rgba), f"error: {rgba}: image has 4 channels (RGBA, with transparent "
                                                      "pixels); the model takes RGB or gray: flatten it onto a "
                                                      "background first"),
        (("predict", model, "--task", "alpha", four), f"error: {four}: array has 4 channels (shape [1, 4, 32, 32]); "
                                                      "the model takes 3 (arrays are NCHW or CHW, RGB)"),
        (("predict", model, "--task", "alpha", "--top-k", "0", good), None),
        (("predict", model, "--task", "alpha", "--provider", "tpu", good), None),
    ]
    for args, message in cases:
        code, out, err = cli(*args)
        line = one_line_error(code, out, err)
        assert out == ""
        if message is not None:
            assert line == message


def test_cli_directory_with_one_bad_image(world, tmp_path):
    imgs, files = world["images"]["gamma"]
    d = tmp_path / "imgs"
    d.mkdir()
    for f in files[:5]:
        shutil.copy(f, d / f.name)
    (d / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n corrupt")  # replaces one good image
    (d / "readme.txt").write_text("ignored: not an image file")
    expected = _torch_logits(world["bundle"], "gamma", to_model_input(imgs[:5], 32).numpy()).argmax(1)
    code, out, err = cli("predict", world["exports"]["multitask"], "--task", "gamma", d, "--json")
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {d / '002.png'}: "), err
    records = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["image"]).name for r in records] == ["000.png", "001.png", "003.png", "004.png"]
    assert [r["label"] for r in records] == [int(expected[i]) for i in (0, 1, 3, 4)]
    code, out, err = cli("predict", world["exports"]["multitask"], "--task", "gamma", d)  # table: same
    assert code == 2 and len(out.splitlines()) == 2 + 4 and len(err.splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = cli("predict", world["exports"]["multitask"], "--task", "gamma", empty)
    assert one_line_error(code, out, err) == f"error: {empty}: no image or .npy files in this directory"


# ----------------------------------------------------------------------------- runtime-only install
def _runtime_only_venv(tmp_path_factory) -> Path:
    """A fresh venv with `pip install <checkout>` (no extras): what a device gets. Skips when offline."""
    root = tmp_path_factory.mktemp("device")
    env_dir = root / "venv"
    try:
        venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    except Exception as exc:  # no ensurepip / offline
        pytest.skip(f"cannot create a venv here ({exc})")
    src = root / "src"  # a clean copy of what the package is built from (no .venv, no build/ in the checkout)
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "pbexport", src / "pbexport", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                        "-q", str(src)], capture_output=True, text=True, timeout=900)
    if r.returncode:
        offline = ("connection", "network", "no matching distribution", "could not find a version", "temporary failure")
        if any(w in r.stderr.lower() for w in offline):
            pytest.skip(f"pip cannot reach a package index: {r.stderr.strip().splitlines()[-1]}")
        raise AssertionError(f"runtime-only install failed:\n{r.stderr}")
    return env_dir


def test_runtime_only_install_predicts(world, tmp_path_factory):
    env_dir = _runtime_only_venv(tmp_path_factory)
    py = env_dir / "bin" / "python"
    probe = subprocess.run([str(py), "-c", "import importlib.util as u, json; print(json.dumps("
                            "[m for m in ('torch', 'torchvision', 'onnx', 'safetensors', 'zstandard') "
                            "if u.find_spec(m)]))"], capture_output=True, text=True)
    assert probe.returncode == 0 and json.loads(probe.stdout) == [], probe.stdout + probe.stderr  # device-sized
    imgs, files = world["images"]["alpha"]
    expected = [int(v) for v in _torch_logits(world["bundle"], "alpha", to_model_input(imgs, 32).numpy()).argmax(1)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    for mode in ("baked file", "shared", "multitask"):
        r = subprocess.run([str(env_dir / "bin" / "pbexport"), "predict", str(world["exports"][mode]), "--task",
                            "alpha", str(files[0].parent), "--json"], capture_output=True, text=True, env=env,
                           cwd=tmp_path_factory.getbasetemp())
        assert r.returncode == 0, r.stderr
        assert [json.loads(line)["label"] for line in r.stdout.splitlines()] == expected, mode
    r = subprocess.run([str(env_dir / "bin" / "pbexport"), "train", "--backbone", "x", "--data", "x", "--task", "x",
                        "--out", "x"], capture_output=True, text=True, env=env, cwd=tmp_path_factory.getbasetemp())
    assert r.returncode == 2 and r.stderr.strip() == ('error: this command needs the training extra (torch is '
                                                      'missing): pip install "pbexport[train]"'), r.stderr
