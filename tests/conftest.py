"""Shared fixtures: tiny datasets on disk and the optional real data in ../shared/data."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PBEXPORT_SHARED_DATA", REPO.parent / "shared" / "data"))
RESNET20 = SHARED_DATA / "resnet_cifar10" / "resnet20-12fca82f.th"


def import_tool(name: str):
    """A script of tools/ as a module (the tools import each other, e.g. benchlib, from that folder)."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "tools"))


def study_then_restore(study, runs_root: Path, tmp_path: Path, out_name: str) -> tuple[Path, Path]:
    """Run ``study`` (a tools/ study) over a copy of ``runs_root`` in a bench-out/, save that with
    tools/bench_record.py and restore it elsewhere, as a new checkout would: (the study's result, the
    restored results folder: runs without weights or checkpoints, and the study's cache)."""
    record = import_tool("bench_record")
    results = tmp_path / "bench-out"
    shutil.copytree(runs_root, results / "accuracy" / "runs")
    assert study.main(["--runs", str(results / "accuracy" / "runs"), "--out", str(results / out_name),
                       "--seeds", "1"]) == 0
    record.save(results, tmp_path / "bench-record")
    restored = tmp_path / "restored"
    record.restore(tmp_path / "bench-record", restored)
    assert not list(restored.rglob("*.safetensors")) and not list(restored.rglob("checkpoints"))
    return results / out_name, restored


def flip_recorded_bn_lr(run: Path) -> None:
    """Make an ``lr_bn="auto"`` run record the BN lr it did not choose: a study must refuse it."""
    path = run / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["lr_bn"] = 3e-3 if metrics["lr_bn"] == 1e-2 else 1e-2
    path.write_text(json.dumps(metrics))


def make_arrays(n_train: int = 48, n_test: int = 24, classes: int = 3, size: int = 32, channels: int = 3,
                seed: int = 0) -> dict:
    """Class k is a noisy image whose colour/brightness depends on k: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % classes
        base = (labels[:, None, None, None] * (200 // max(classes - 1, 1))).astype(np.int64)
        noise = rng.integers(0, 56, size=(n, size, size, channels))
        out[f"{split}_images"] = np.clip(base + noise, 0, 255).astype(np.uint8)
        out[f"{split}_labels"] = labels.astype(np.int16)
    return out


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, **make_arrays())
    return path


@pytest.fixture(scope="session")
def resnet20_weights() -> Path:
    if not RESNET20.exists():
        pytest.skip(f"real weights not available ({RESNET20})")
    return RESNET20


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available ({SHARED_DATA})")
    return SHARED_DATA
