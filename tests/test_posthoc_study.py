"""tools/posthoc_study.py: levers applied after training (precise BN, averaged epochs, shifted validation),
recomputed from a set of real (tiny) training runs."""

import json
import shutil

import pytest
import torch
from conftest import flip_recorded_bn_lr, import_tool, study_then_restore

from pbexport import masking
from pbexport.backbones import load_backbone
from pbexport.data import batches, load_data
from pbexport.taskmodel import build_task_model
from pbexport.training import TrainConfig, train

CELL = "cifar_resnet20/tiny"


@pytest.fixture(scope="module")
def runs_root(tiny_npz, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    # the default (BN lr chosen among two candidates) and fine-tuning
    for name, settings in {"piggyback-bn": {}, "finetune": {"method": "finetune"}}.items():
        train(_config(tiny_npz, name, **settings), root / CELL / f"{name}-s0", progress=False)
    return root


def _config(tiny_npz, task, **settings):
    return TrainConfig(backbone="cifar_resnet20", data=str(tiny_npz), task=task, epochs=3, batch_size=8,
                       max_train_samples=32, val_fraction=0.25, input_size=32, **settings)


def _metrics(root, name):
    return json.loads((root / CELL / name / "metrics.json").read_text())


def test_levers_as_trained_and_averaged_reproduce_the_recorded_epochs(runs_root, tmp_path, monkeypatch, capsys):
    study = import_tool("posthoc_study")
    monkeypatch.setattr(study, "AVERAGED_EPOCHS", 1)  # the average of one epoch is that epoch
    out = tmp_path / "posthoc.json"
    assert study.main(["--runs", str(runs_root), "--out", str(out), "--seeds", "1"]) == 0
    result = json.loads(out.read_text())
    ours, ft = _metrics(runs_root, "piggyback-bn-s0"), _metrics(runs_root, "finetune-s0")
    as_trained = result["levers"]["as trained"]["cells"][CELL]
    assert as_trained["lead"] == pytest.approx(100 * (ft["test_accuracy"] - ours["test_accuracy"]), abs=1e-3)
    # the last epoch of each candidate, chosen between on its validation score
    cache = result["cache"]
    candidates = [cache[f"{CELL}/piggyback-bn-s0/candidates/lr-bn-{lr:g}"]["levers"] for lr in (1e-2, 3e-3)]
    last = [_metrics(runs_root, f"piggyback-bn-s0/candidates/lr-bn-{lr:g}")["epochs"][-1] for lr in (1e-2, 3e-3)]
    for evaluated, recorded in zip(candidates, last, strict=True):
        averaged = evaluated["average of the last epochs"]
        assert (averaged["val_accuracy"], averaged["test_accuracy"]) == \
            pytest.approx((recorded["val_accuracy"], recorded["test_accuracy"]))
    assert result["levers"]["average of the last epochs"]["cells"][CELL]["lead"] == pytest.approx(
        100 * (ft["epochs"][-1]["test_accuracy"] -
               max((c["average of the last epochs"] for c in candidates),
                   key=lambda r: (r["val_accuracy"], -r["val_loss"]))["test_accuracy"]), abs=1e-3)
    # shifted validation changes the validation score only
    for evaluated in candidates:
        assert evaluated["BN lr chosen on a grid of shifts"]["test_accuracy"] == \
            evaluated["as trained"]["test_accuracy"]
    assert "precise BN, shifted" in capsys.readouterr().out
    # BENCHMARKS.md renders it, with the command that reproduces it
    text = import_tool("write_benchmarks").section_posthoc(tmp_path)
    assert f"| as trained | {CELL} |" in text and "python tools/posthoc_study.py --seeds 1\n" in text

    # a second study reuses the cached evaluations
    def no_evaluation(*a, **kw):
        raise AssertionError("evaluated a run whose results are cached")

    monkeypatch.setattr(study, "evaluate_run", no_evaluation)
    assert study.main(["--runs", str(runs_root), "--out", str(out), "--seeds", "1"]) == 0
    assert json.loads(out.read_text())["levers"] == result["levers"]


def test_the_averaged_lever_is_what_average_epochs_trains(runs_root, tmp_path, tiny_npz):
    study = import_tool("posthoc_study")
    out = tmp_path / "posthoc.json"
    assert study.main(["--runs", str(runs_root), "--out", str(out), "--seeds", "1"]) == 0
    cache = json.loads(out.read_text())["cache"]
    for run, task, settings in (("piggyback-bn-s0/candidates/lr-bn-0.01", "piggyback-bn", {"lr_bn": 1e-2}),
                                ("finetune-s0", "finetune", {"method": "finetune"})):
        trained = train(_config(tiny_npz, task, average_epochs=study.AVERAGED_EPOCHS, **settings),
                        tmp_path / task, progress=False)
        lever = cache[f"{CELL}/{run}"]["levers"]["average of the last epochs"]
        assert (lever["val_accuracy"], lever["test_accuracy"]) == (trained["val_accuracy"], trained["test_accuracy"])


def test_precise_bn_is_the_plain_average_over_the_training_split(tiny_npz):
    study = import_tool("posthoc_study")
    backbone = load_backbone("cifar_resnet20", None, 32)
    data = load_data(str(tiny_npz), 32)
    model = build_task_model(backbone, data.num_classes, "piggyback", True, 0)
    images = data.train
    study._recompute_bn(model, images, 8, "none")
    # the first BN sees the stem conv's output: its running mean is that output's per-channel mean
    # (batches of equal size: the average of the batch means is the overall mean)
    assert len(images) % 8 == 0
    with torch.no_grad():
        x = torch.cat([x for x, _ in batches(images, 8, 32)])
        stem = model.net.conv1((x - model.mean) / model.std)
    first_bn = next(bn for _, bn in masking.batchnorms(model.net))
    assert torch.allclose(first_bn.running_mean, stem.mean((0, 2, 3)), atol=1e-5)
    assert not model.training


def test_a_tampered_choice_and_a_damaged_result_are_refused(runs_root, tmp_path):
    study = import_tool("posthoc_study")
    copy = tmp_path / "runs"
    shutil.copytree(runs_root, copy)
    flip_recorded_bn_lr(copy / CELL / "piggyback-bn-s0")
    with pytest.raises(SystemExit, match="piggyback-bn-s0: chose BN lr"):
        study.main(["--runs", str(copy), "--out", str(tmp_path / "posthoc.json"), "--seeds", "1"])
    damaged = tmp_path / "damaged.json"
    damaged.write_text("{not json")
    with pytest.raises(SystemExit, match="damaged.json: not a post-hoc study result"):
        study.main(["--runs", str(runs_root), "--out", str(damaged), "--seeds", "1"])
    assert damaged.read_text() == "{not json"


def test_restored_runs_are_read_from_the_cache_or_left_out_by_name(runs_root, tmp_path, capsys):
    """Runs restored from bench-record/ have no weights or checkpoints: the study's cache serves them, else
    they are left out, by name."""
    study = import_tool("posthoc_study")
    first, restored = study_then_restore(study, runs_root, tmp_path, "posthoc.json")
    again = restored / "posthoc.json"
    assert study.main(["--runs", str(restored / "accuracy" / "runs"), "--out", str(again), "--seeds", "1"]) == 0
    assert json.loads(again.read_text())["levers"] == json.loads(first.read_text())["levers"]

    again.unlink()  # no cache: the default's runs cannot be evaluated, so no cell is complete
    capsys.readouterr()
    assert study.main(["--runs", str(restored / "accuracy" / "runs"), "--out", str(again), "--seeds", "1"]) == 2
    assert "finetune-s0: no checkpoints (restored from bench-record/) and not in the cache: left out" in \
        capsys.readouterr().err
