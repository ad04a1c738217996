"""tools/selection_study.py: the epoch-selection rules and the per-task recipe choice, recomputed from the
checkpoints a set of real (tiny) training runs kept."""

import json
import shutil

import pytest
from conftest import flip_recorded_bn_lr, import_tool, study_then_restore

from pbexport.training import TrainConfig, train


@pytest.fixture(scope="module")
def runs_root(tiny_npz, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    # the default (BN lr chosen among two candidates), one fixed BN lr, and fine-tuning (keeping its best
    # epoch, and averaging its last two, which the studies leave out)
    recipes = {"piggyback-bn": {}, "piggyback-bn-bn3e-3": {"lr_bn": 3e-3}, "finetune": {"method": "finetune"},
               "finetune-avg2": {"method": "finetune", "average_epochs": 2}}
    for name, settings in recipes.items():
        cfg = TrainConfig(backbone="cifar_resnet20", data=str(tiny_npz), task=name, epochs=3, batch_size=8,
                          max_train_samples=32, val_fraction=0.25, input_size=32, **settings)
        train(cfg, root / "cifar_resnet20" / "tiny" / f"{name}-s0", progress=False)
    return root


def _metrics(root, name):
    return json.loads((root / "cifar_resnet20" / "tiny" / f"{name}-s0" / "metrics.json").read_text())


def test_the_rules_reproduce_the_kept_epoch_and_the_last(runs_root, tmp_path, capsys):
    study = import_tool("selection_study")
    out = tmp_path / "selection.json"
    assert study.main(["--runs", str(runs_root), "--out", str(out), "--seeds", "1",
                       "--choose", "piggyback-bn", "piggyback-bn-bn3e-3"]) == 0
    result = json.loads(out.read_text())
    ours, ft = _metrics(runs_root, "piggyback-bn"), _metrics(runs_root, "finetune")
    kept = result["rules"]["best val acc, earliest tie"]["cells"]["cifar_resnet20/tiny"]["lead"]
    assert kept == pytest.approx(100 * (ft["test_accuracy"] - ours["test_accuracy"]), abs=1e-3)
    # the default chooses its BN lr on validation: under another rule the choice is made again, among the
    # candidates' epochs that rule keeps
    cache = result["val_loss_cache"]
    candidates = [cache[f"cifar_resnet20/tiny/piggyback-bn-s0/candidates/lr-bn-{lr:g}"] for lr in (1e-2, 3e-3)]
    last_kept = max((records[-1] for records in candidates), key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    last = result["rules"]["last epoch"]["cells"]["cifar_resnet20/tiny"]["lead"]
    assert last == pytest.approx(100 * (ft["epochs"][-1]["test_accuracy"] - last_kept["test_accuracy"]), abs=1e-3)
    # the recipe chosen on validation is the one whose kept epoch scored higher there
    other = _metrics(runs_root, "piggyback-bn-bn3e-3")
    chosen = result["choice"]["cifar_resnet20/tiny"]["chosen"][0]
    assert {"piggyback-bn": ours, "piggyback-bn-bn3e-3": other}[chosen]["val_accuracy"] == \
        max(ours["val_accuracy"], other["val_accuracy"])
    assert all(len(records) == 3 and all(r["val_loss"] > 0 for r in records) for records in candidates)
    assert "lowest val loss" in capsys.readouterr().out
    # BENCHMARKS.md renders it: the chosen recipe per cell, and the command that reproduces it
    text = import_tool("write_benchmarks").section_selection(tmp_path)
    assert f"| cifar_resnet20/tiny | {chosen} |" in text
    assert "selection_study.py --seeds 1 --choose piggyback-bn piggyback-bn-bn3e-3" in text


def test_runs_that_average_epochs_are_left_out(runs_root):
    found = import_tool("selection_study").accuracy_runs(runs_root, 1, {"piggyback-bn"})
    assert sorted(variant for _, variant, *_ in found) == ["finetune", "piggyback-bn"]


def test_cached_losses_are_reused_and_a_mismatched_checkpoint_is_refused(runs_root, tmp_path, monkeypatch):
    study = import_tool("selection_study")
    out = tmp_path / "selection.json"
    assert study.main(["--runs", str(runs_root), "--out", str(out), "--seeds", "1"]) == 0
    first = json.loads(out.read_text())

    def no_evaluation(*a, **kw):
        raise AssertionError("evaluated a run whose losses are cached")

    monkeypatch.setattr(study, "accuracy_and_loss", no_evaluation)
    assert study.main(["--runs", str(runs_root), "--out", str(out), "--seeds", "1"]) == 0
    assert json.loads(out.read_text())["rules"] == first["rules"]
    other = tmp_path / "selection-other.json"  # a second study beside it reuses the losses too
    assert study.main(["--runs", str(runs_root), "--out", str(other), "--seeds", "1"]) == 0
    assert json.loads(other.read_text())["rules"] == first["rules"]
    monkeypatch.undo()

    # a run whose checkpoint is not what training evaluated (here: a record that no checkpoint can score)
    copy = tmp_path / "runs"
    shutil.copytree(runs_root, copy)
    run = copy / "cifar_resnet20" / "tiny" / "piggyback-bn-s0"
    metrics_path = run / "candidates" / "lr-bn-0.01" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["epochs"][0]["val_accuracy"] = 1.5
    metrics_path.write_text(json.dumps(metrics))
    with pytest.raises(SystemExit, match="lr-bn-0.01: epoch 1 evaluates to"):
        study.main(["--runs", str(copy), "--out", str(tmp_path / "fresh.json"), "--seeds", "1"])
    # a run whose recorded BN lr is not the one its candidates' validation scores choose
    shutil.copy(runs_root / "cifar_resnet20" / "tiny" / "piggyback-bn-s0" / "candidates" / "lr-bn-0.01" /
                "metrics.json", metrics_path)
    flip_recorded_bn_lr(run)
    with pytest.raises(SystemExit, match="piggyback-bn-s0: chose BN lr"):
        study.main(["--runs", str(copy), "--out", str(tmp_path / "fresh.json"), "--seeds", "1"])

    # a damaged result file beside --out is named, and left as it is
    damaged = tmp_path / "selection-damaged.json"
    damaged.write_text("{not json")
    with pytest.raises(SystemExit, match="selection-damaged.json: not a selection study result"):
        study.main(["--runs", str(runs_root), "--out", str(out), "--seeds", "1"])
    assert damaged.read_text() == "{not json" and json.loads(out.read_text())["rules"] == first["rules"]


def test_restored_runs_are_read_from_the_cache_or_left_out_by_name(runs_root, tmp_path, capsys):
    """Runs restored from bench-record/ have no weights or checkpoints: the study's cache serves them, else
    they are left out, by name."""
    study = import_tool("selection_study")
    first, restored = study_then_restore(study, runs_root, tmp_path, "selection.json")
    again = restored / "selection.json"
    assert study.main(["--runs", str(restored / "accuracy" / "runs"), "--out", str(again), "--seeds", "1"]) == 0
    assert json.loads(again.read_text())["rules"] == json.loads(first.read_text())["rules"]

    again.unlink()  # no cache: the default's runs cannot be evaluated, so no cell is complete
    capsys.readouterr()
    assert study.main(["--runs", str(restored / "accuracy" / "runs"), "--out", str(again), "--seeds", "1"]) == 2
    assert "piggyback-bn-s0/candidates/lr-bn-0.01: no checkpoints (restored from bench-record/) and not in the " \
           "cache: left out" in capsys.readouterr().err
