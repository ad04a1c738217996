"""The CI-sized accuracy benchmark: on real GTSRB with the real CIFAR-10 ResNet-20, piggyback (the
default recipe) must beat classifier-only by a clear margin, and the base task must stay bitwise
untouched after its tasks are packed (tools/bench_accuracy.py --quick)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, import_tool

from pbexport.errors import PbexportError
from pbexport.runs import RUN_FORMAT, RUN_FORMAT_VERSION, RunDir


def test_piggyback_clearly_beats_classifier_only_on_real_data(resnet20_weights, shared_data, tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "tools" / "bench_accuracy.py"), "--quick", "--quiet",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "accuracy.json").read_text())
    acc = {s["variant"]: s["accuracy_mean"] for s in result["summary"]}
    assert acc["piggyback-bn"] - acc["classifier"] >= 20.0, acc
    assert result["base_task"]["cifar_resnet20"]["bitwise_identical"] is True
    assert (tmp_path / "accuracy.png").stat().st_size > 0


def test_recipes_beside_the_grid_run_alone(resnet20_weights, tiny_npz, tmp_path):
    """A fine-tune recipe on its own: nothing to pack, no grid method to chart, still a result."""
    r = subprocess.run([sys.executable, str(REPO / "tools" / "bench_accuracy.py"), "--quiet", "--backbones",
                        "cifar_resnet20", "--datasets", str(tiny_npz), "--variants", "finetune-contig", "--seeds", "0",
                        "--epochs", "1", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "accuracy.json").read_text())
    assert [(s["variant"], s["seeds"]) for s in result["summary"]] == [("finetune-contig", 1)]
    assert result["rows"][0]["bytes_per_task"] > 0 and result["base_task"] == {}
    assert not (tmp_path / "accuracy.png").exists() and not (tmp_path / "bundles" / "cifar_resnet20").exists()


def test_a_fixed_bn_lr_recipe_is_the_defaults_candidate_copied(resnet20_weights, tiny_npz, tmp_path):
    """piggyback-bn-head1e-2 and -bn3e-3 train the BN lrs the default chooses between: they are copied from
    its candidates, under their own task names, and the copies are what training them afresh gives."""
    def bench(out, *variants):
        r = subprocess.run([sys.executable, str(REPO / "tools" / "bench_accuracy.py"), "--quiet", "--backbones",
                            "cifar_resnet20", "--datasets", str(tiny_npz), "--variants", *variants, "--seeds", "0",
                            "--epochs", "1", "--out", str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout, json.loads((out / "accuracy.json").read_text())

    log, result = bench(tmp_path / "a", "piggyback-bn", "piggyback-bn-head1e-2", "piggyback-bn-bn3e-3",
                        "piggyback-bn-bn5e-3")
    assert log.count("copied, not trained again") == 2  # BN lr 5e-3 is no candidate: trained
    assert "the same run as piggyback-bn-s0/candidates/lr-bn-0.003: copied, not trained again" in log
    copied = RunDir(tmp_path / "a" / "runs" / "cifar_resnet20" / "tiny" / "piggyback-bn-head1e-2-s0")
    assert copied.config().task == copied.info()["task"]["name"] == "tiny-piggyback-bn-head1e-2-s0"
    assert copied.metrics()["copied_from"] == "piggyback-bn-s0/candidates/lr-bn-0.01"
    _, fresh = bench(tmp_path / "b", "piggyback-bn-head1e-2")
    trained = RunDir(tmp_path / "b" / "runs" / "cifar_resnet20" / "tiny" / "piggyback-bn-head1e-2-s0")
    assert copied.config().settings() == trained.config().settings()
    a, b = copied.final_state(), trained.final_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    row = {r["variant"]: r for r in result["rows"]}["piggyback-bn-head1e-2"]
    assert (row["test_accuracy"], row["bytes_per_task"]) == (fresh["rows"][0]["test_accuracy"],
                                                             fresh["rows"][0]["bytes_per_task"])
    # the four tasks were packed into one bundle side by side
    assert result["base_task"]["cifar_resnet20"]["tasks"] == 4


def test_a_candidate_is_copied_only_where_it_matches_and_nothing_else_is_in_the_way(tmp_path):
    ba = import_tool("bench_accuracy")

    class Args:
        epochs, max_train_samples = 10, None

    def run(path, cfg, finished=True):
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps({"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION,
                                                      "config": cfg.to_dict(), "task": {"name": cfg.task}}))
        if finished:
            (path / "metrics.json").write_text(json.dumps({"task": cfg.task, "test_accuracy": 0.9}))
            (path / "model.safetensors").write_bytes(b"weights")

    cell = tmp_path / "runs" / "cifar_resnet20" / "gtsrb"
    default = ba.make_config("cifar_resnet20", "gtsrb", "piggyback-bn", 0, Args)
    for candidate in default.bn_candidates():
        run(cell / "piggyback-bn-s0" / "candidates" / f"lr-bn-{candidate.lr_bn:g}", candidate)
    slow = ba.make_config("cifar_resnet20", "gtsrb", "piggyback-bn-bn3e-3", 0, Args)
    (cell / "piggyback-bn-bn3e-3-s0").mkdir()
    (cell / "piggyback-bn-bn3e-3-s0" / "notes.txt").write_text("mine")
    assert ba.copy_candidate(slow, cell / "piggyback-bn-bn3e-3-s0") is None  # not a run: left alone
    assert (cell / "piggyback-bn-bn3e-3-s0" / "notes.txt").read_text() == "mine"
    assert ba.copy_candidate(ba.make_config("cifar_resnet20", "gtsrb", "piggyback-bn-bn5e-3", 0, Args),
                             cell / "piggyback-bn-bn5e-3-s0") is None  # no candidate trained BN lr 5e-3
    assert ba.copy_candidate(ba.make_config("cifar_resnet20", "gtsrb", "piggyback-bn-head1e-2", 1, Args),
                             cell / "piggyback-bn-head1e-2-s1") is None  # no default run of seed 1
    fast = ba.make_config("cifar_resnet20", "gtsrb", "piggyback-bn-head1e-2", 0, Args)
    run(cell / "piggyback-bn-head1e-2-s0", fast, finished=False)  # interrupted: the finished candidate wins
    assert ba.copy_candidate(fast, cell / "piggyback-bn-head1e-2-s0") == "piggyback-bn-s0/candidates/lr-bn-0.01"
    copied = RunDir(cell / "piggyback-bn-head1e-2-s0")
    assert copied.config().settings() == fast.settings() and copied.metrics()["task"] == fast.task
    assert ba.copy_candidate(fast, cell / "piggyback-bn-head1e-2-s0") is None  # done: nothing to copy
    assert sorted(p.name for p in cell.iterdir()) == ["piggyback-bn-bn3e-3-s0", "piggyback-bn-head1e-2-s0",
                                                      "piggyback-bn-s0"]  # no staging left behind
    # a damaged candidate is named, and nothing is written
    (cell / "piggyback-bn-s0" / "candidates" / "lr-bn-0.003" / "metrics.json").write_text("{not json")
    shutil.rmtree(cell / "piggyback-bn-bn3e-3-s0")
    with pytest.raises(PbexportError, match="lr-bn-0.003/metrics.json: cannot read JSON"):
        ba.copy_candidate(slow, cell / "piggyback-bn-bn3e-3-s0")
    assert sorted(p.name for p in cell.iterdir()) == ["piggyback-bn-head1e-2-s0", "piggyback-bn-s0"]


def test_a_finished_run_is_reused_only_while_its_settings_match(tmp_path):
    ba = import_tool("bench_accuracy")

    class Args:
        epochs, max_train_samples = 10, None

    def stored(variant, **changes):
        cfg = ba.make_config("cifar_resnet20", "gtsrb", variant, 0, Args).to_dict()
        cfg.pop("mask_decay")  # a run made before the setting existed reads it as its default
        cfg.update(changes)
        run = tmp_path / "-".join([variant, *changes])
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION,
                                                     "config": cfg}))
        return ba.run_settings(run) == ba.make_config("cifar_resnet20", "gtsrb", variant, 0, Args).settings()

    assert stored("piggyback-bn")
    assert not stored("piggyback-bn", lr_mask=1e-3)  # trained under an older default: train again
    assert stored("finetune", lr_mask=1e-3)  # the mask lr never touches a fine-tune run
    assert not stored("finetune", lr_backbone=1e-2)
    # a recipe beside the default has runs of its own
    assert not stored("piggyback-bn", augment="none")
    assert stored("piggyback-bn-none", augment="none")
    # the frontier never repeats the default recipe under another name
    defaults = ba.make_config("cifar_resnet20", "gtsrb", "piggyback-bn", 0, Args).settings()
    recipes = [ba.make_config("cifar_resnet20", "gtsrb", v, 0, Args).settings() for v in ba.FRONTIER]
    assert all({**r, "task": ""} != {**defaults, "task": ""} for r in recipes)
    assert len(ba.FRONTIER) == len(ba.FRONTIER_RECIPES)
    # the default chooses its BN lr; the recipes beside it train one, so their runs outlive a default change
    assert defaults["lr_bn"] == "auto" and all(isinstance(r["lr_bn"], float) for r in recipes)
    old = ba.make_config("cifar_resnet20", "gtsrb", "piggyback-bn-head1e-3", 0, Args).to_dict()
    old.pop("lr_bn")  # a run from before --lr-bn trained BN at its head lr: still this recipe's run
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps({"format": RUN_FORMAT,
                                                              "format_version": RUN_FORMAT_VERSION, "config": old}))
    assert ba.run_settings(tmp_path / "old") == \
        ba.make_config("cifar_resnet20", "gtsrb", "piggyback-bn-head1e-3", 0, Args).settings()


def test_earlier_rows_are_read_from_the_run_directories(tmp_path):
    """Results accumulate across invocations: every finished run that still matches today's settings
    gives a row, with the numbers its own metrics.json holds; a stale one gives none."""
    ba = import_tool("bench_accuracy")

    class Args:
        epochs, max_train_samples = 10, None

    def finished(variant, accuracy, **changes):
        cfg = {**ba.make_config("cifar_resnet20", "gtsrb", variant, 0, Args).to_dict(), **changes}
        run = tmp_path / "runs" / "cifar_resnet20" / "gtsrb" / f"{variant}-s0"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION,
                                                     "config": cfg}))
        (run / "metrics.json").write_text(json.dumps({"test_accuracy": accuracy, "mask_density": 0.7,
                                                      "epochs": [{"seconds": 5.0}, {"seconds": 6.0}]}))

    finished("piggyback-bn", 0.97)
    finished("finetune-none", 0.96)
    finished("classifier", 0.4, lr_head=3e-3)  # trained under another head lr: stale
    rows = ba.earlier_rows(tmp_path, set(), Args)
    assert [(r["variant"], r["method"], r["dataset"], r["data"], r["test_accuracy"], r["train_seconds"])
            for r in rows] == [("finetune-none", "finetune", "gtsrb", "gtsrb", 0.96, 11.0),
                               ("piggyback-bn", "piggyback", "gtsrb", "gtsrb", 0.97, 11.0)]
    planned = {("cifar_resnet20", "gtsrb", "piggyback-bn", 0)}  # left to the invocation that plans them
    assert [r["variant"] for r in ba.earlier_rows(tmp_path, planned, Args)] == ["finetune-none"]
