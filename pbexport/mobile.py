"""ORT format (`.ort`) for onnxruntime-mobile builds, converted from a baked export and verified.

The conversion is onnxruntime's own: a session at the "basic" optimization level (the
platform-independent rewrites, as onnxruntime's convert_onnx_models_to_ort tool uses for mobile)
saves its optimized graph in ORT format. The result is loaded back and must give the same logits
as the .onnx on random inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import PbexportError
from .fileio import atomic_write

ORT_ATOL = 1e-4


def convert_to_ort(model: str | Path, output: str | Path | None = None, *, force: bool = False,
                   samples: int = 8, seed: int = 0) -> dict:
    """Write ``model`` (a baked, possibly int8, export) as ``output`` (default: same name, .ort)."""
    import onnxruntime as ort

    from .runtime import read_onnx_metadata

    model = Path(model)
    output = Path(output) if output is not None else model.with_suffix(".ort")
    meta = read_onnx_metadata(model)
    if meta.get("mode") != "baked":
        raise PbexportError(f"only baked exports convert to ORT format (this is a {meta.get('mode', 'non-pbexport')} "
                            "model; the ORT format embeds every weight, which would copy the shared backbone)",
                            str(model))
    if output.exists() and not force:
        raise PbexportError("output exists (use --force to overwrite)", str(output))

    def write(tmp: Path) -> None:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(tmp)
        opts.add_session_config_entry("session.save_model_format", "ORT")
        ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])

    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, write)

    size = int(meta["input_size"])
    x = np.random.default_rng(seed).random((samples, 3, size, size), dtype=np.float32)
    if meta.get("batch", "dynamic") != "dynamic":
        x = x[: int(meta["batch"])]
    # both at the level the .ort was saved at: int8 graphs fuse differently at higher levels
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    outs = [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
            for p in (model, output)]
    max_diff = float(np.abs(outs[0] - outs[1]).max())
    agree = float((outs[0].argmax(1) == outs[1].argmax(1)).mean())
    if max_diff > ORT_ATOL or agree < 1.0:
        output.unlink(missing_ok=True)
        raise PbexportError(f"ORT-format model differs from the .onnx (max |diff| {max_diff:.2e}, top-1 agreement "
                            f"{100 * agree:.1f}%); nothing written", str(model))
    return {"onnx": str(model), "ort": str(output), "onnx_bytes": model.stat().st_size,
            "ort_bytes": output.stat().st_size, "max_abs_diff": max_diff, "top1_agreement": agree}
