"""Static int8 quantization of a baked export (onnxruntime.quantization, QDQ), with a measured report.

Only baked graphs qualify: their weights are constants that the quantizer can turn into int8
initializers. A shared-backbone graph computes each weight as W * unpack(mask) in-graph (folded only
when a session is created), and a multitask graph takes the task's tensors as inputs, so in both the
quantizer sees no constant conv/gemm weights to quantize, and a quantized copy would also duplicate
the backbone that those modes exist to share.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import PbexportError
from .fileio import atomic_write

QUANTIZATION_KEY = "quantization"


@dataclass
class QuantizeReport:
    float_path: str
    int8_path: str
    float_bytes: int
    int8_bytes: int
    samples: int
    float_accuracy: float
    int8_accuracy: float
    top1_agreement: float
    float_latency_ms: float  # batch 1, median
    int8_latency_ms: float

    @property
    def size_ratio(self) -> float:
        return self.float_bytes / self.int8_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "size_ratio": self.size_ratio}


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over preprocessed NCHW batches."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int):
        self._batches = iter([{input_name: images[i:i + batch]} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self._batches, None)

    def rewind(self):  # not needed for MinMax, part of the protocol in newer onnxruntime
        pass


def _images(data_spec: str, size: int, split: str, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from .data import load_data, to_model_input

    data = load_data(data_spec, size)
    s = data.train if split == "train" else data.test
    idx = np.sort(np.random.default_rng(seed).permutation(len(s))[:limit])
    return to_model_input(s.images[idx], size).numpy(), s.labels[idx]


def _median_latency_ms(session, name: str, x: np.ndarray, repeats: int = 30) -> float:
    session.run(None, {name: x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _preprocess(model: Path, out: Path) -> Path:
    """onnxruntime's recommended pre-pass (shape inference, graph cleanup); the raw model if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(model), str(out))
        return out
    except Exception:  # seen failing on some exporter outputs; quantizing without it still works
        return model


def quantize_model(model: str | Path, output: str | Path, calib: str, *, per_channel: bool = False,
                   calib_samples: int = 256, eval_samples: int = 1000, force: bool = False,
                   seed: int = 0) -> QuantizeReport:
    """Quantize baked ``model`` to int8 (calibrated on ``calib``'s train split) and compare on its test split."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .runtime import read_onnx_metadata

    model, output = Path(model), Path(output)
    meta = read_onnx_metadata(model)
    mode = meta.get("mode")
    if mode is None:
        raise PbexportError("an ONNX model without pbexport metadata (export it with `pbexport onnx`)", str(model))
    if mode != "baked":
        raise PbexportError(f"only baked exports can be quantized (this is a {mode} export: its weights are "
                            "computed in-graph or fed as inputs, so there are no constant weights to quantize "
                            "and a quantized copy would duplicate the shared backbone)", str(model))
    if QUANTIZATION_KEY in meta:
        raise PbexportError("already quantized", str(model))
    if output.exists() and not force:
        raise PbexportError("output exists (use --force to overwrite)", str(output))
    size = int(meta["input_size"])
    calib_x, _ = _images(calib, size, "train", calib_samples, seed)
    test_x, test_y = _images(calib, size, "test", eval_samples, seed)
    num_classes = int(meta.get("num_classes", 0))
    if num_classes and test_y.max() >= num_classes:
        raise PbexportError(f"dataset has labels up to {test_y.max()}, the model has {num_classes} classes", calib)

    def write(tmp: Path) -> None:
        with tempfile.TemporaryDirectory() as work:
            source = _preprocess(model, Path(work) / "pre.onnx")
            # uint8 activations x int8 weights: the combination onnxruntime's x86 int8 kernels are built for
            quantize_static(str(source), str(tmp), _Calibration("image", calib_x, 32), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        q = onnx.load(str(tmp))
        del q.metadata_props[:]
        scheme = "int8-static-qdq" + ("-per-channel" if per_channel else "")
        for key, value in {**meta, QUANTIZATION_KEY: scheme}.items():
            q.metadata_props.add(key=key, value=value)
        onnx.save(q, str(tmp))

    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, write)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sessions = [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in (model, output)]
    preds = []
    for s in sessions:
        logits = np.concatenate([s.run(None, {"image": test_x[i:i + 64]})[0] for i in range(0, len(test_x), 64)])
        preds.append(logits.argmax(1))
    latency = [_median_latency_ms(s, "image", test_x[:1]) for s in sessions]
    return QuantizeReport(str(model), str(output), model.stat().st_size, output.stat().st_size, len(test_y),
                          float((preds[0] == test_y).mean()), float((preds[1] == test_y).mean()),
                          float((preds[0] == preds[1]).mean()), latency[0], latency[1])
