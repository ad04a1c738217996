"""The CI-sized accuracy benchmark: on real GTSRB with the real CIFAR-10 ResNet-20, piggyback (the
default recipe) must beat classifier-only by a clear margin, and the base task must stay bitwise
untouched after its tasks are packed (tools/bench_accuracy.py --quick)."""

import json
import subprocess
import sys

from conftest import REPO


def test_piggyback_clearly_beats_classifier_only_on_real_data(resnet20_weights, shared_data, tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "tools" / "bench_accuracy.py"), "--quick", "--quiet",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "accuracy.json").read_text())
    acc = {s["variant"]: s["accuracy_mean"] for s in result["summary"]}
    assert acc["piggyback-bn"] - acc["classifier"] >= 20.0, acc
    assert result["base_task"]["cifar_resnet20"]["bitwise_identical"] is True
    assert (tmp_path / "accuracy.png").stat().st_size > 0
