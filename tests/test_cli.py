import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pbexport.backbones import build_architecture


def pbexport(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pbexport", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]


def test_train_then_eval_json(tmp_path, tiny_npz):
    out = tmp_path / "run"
    r = pbexport("train", "--backbone", "cifar_resnet20", "--data", tiny_npz, "--task", "tiny", "--out", out,
                 "--epochs", "1", "--batch-size", "16", "--val-split", "contiguous", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "tiny (piggyback): test accuracy" in r.stdout
    assert json.loads((out / "config.json").read_text())["config"]["val_split"] == "contiguous"
    kept = [line for line in r.stdout.splitlines() if line.startswith("  BN lr")]  # chosen on validation
    assert len(kept) == 2 and sum(line.endswith("<- kept") for line in kept) == 1
    r = pbexport("eval", out, "--data", tiny_npz, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["test_accuracy"] == json.loads((out / "metrics.json").read_text())["test_accuracy"]


@pytest.fixture()
def train_args(tmp_path, tiny_npz):
    return ["train", "--data", tiny_npz, "--task", "t", "--out", tmp_path / "run", "--epochs", "1", "--quiet"]


def test_missing_backbone(train_args):
    assert_one_line_error(pbexport(*train_args), "Missing option '--backbone'")


def test_unknown_backbone(train_args):
    assert_one_line_error(pbexport(*train_args, "--backbone", "resnet19"), "unknown backbone 'resnet19'")


def test_unknown_method(train_args):
    assert_one_line_error(pbexport(*train_args, "--backbone", "cifar_resnet20", "--method", "lora"),
                          "'lora' is not one of 'piggyback', 'classifier', 'finetune'")


def test_unknown_validation_split(train_args, tmp_path):
    assert_one_line_error(pbexport(*train_args, "--backbone", "cifar_resnet20", "--val-split", "blocks"),
                          "'blocks' is not one of 'random', 'contiguous'")
    assert not (tmp_path / "run").exists()


def test_train_averaging_epochs(tmp_path, tiny_npz):
    out = tmp_path / "run"
    r = pbexport("train", "--backbone", "cifar_resnet20", "--data", tiny_npz, "--task", "tiny", "--out", out,
                 "--epochs", "2", "--batch-size", "16", "--lr-bn", "1e-2", "--average-epochs", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "(mean of epochs 1-2, mask density" in r.stdout
    assert json.loads((out / "config.json").read_text())["config"]["average_epochs"] == 2


def test_average_epochs_out_of_range(train_args, tmp_path):
    assert_one_line_error(pbexport(*train_args, "--backbone", "cifar_resnet20", "--average-epochs", "3"),
                          "--average-epochs must be between 1 and --epochs (1), got 3")
    assert not (tmp_path / "run").exists()


def test_train_warmup_epochs(tmp_path, tiny_npz):
    out = tmp_path / "run"
    r = pbexport("train", "--backbone", "cifar_resnet20", "--data", tiny_npz, "--task", "tiny", "--out", out,
                 "--epochs", "2", "--batch-size", "16", "--lr-bn", "1e-2", "--warmup-epochs", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["config"]["warmup_epochs"] == 1


def test_warmup_epochs_out_of_range(train_args, tmp_path):
    assert_one_line_error(pbexport(*train_args, "--backbone", "cifar_resnet20", "--warmup-epochs", "1"),
                          "--warmup-epochs must be at least 0 and below --epochs (1), got 1")
    assert not (tmp_path / "run").exists()


def test_mask_eps_must_be_positive(train_args, tmp_path):
    assert_one_line_error(pbexport(*train_args, "--backbone", "cifar_resnet20", "--mask-eps", "0"),
                          "--mask-eps must be positive, got 0.0")
    assert not (tmp_path / "run").exists()


def test_bn_lr_is_a_number_or_auto(train_args, tmp_path):
    assert_one_line_error(pbexport(*train_args, "--backbone", "cifar_resnet20", "--lr-bn", "fast"),
                          "'fast' is neither a number nor 'auto'")
    assert_one_line_error(pbexport(*train_args, "--backbone", "cifar_resnet20", "--lr-bn", "auto", "--no-train-bn"),
                          "--lr-bn auto needs per-task BN")
    assert not (tmp_path / "run").exists()


def test_weights_of_wrong_shape(train_args, tmp_path):
    path = tmp_path / "r32.pth"
    torch.save(build_architecture("cifar_resnet32", 10).state_dict(), path)
    assert_one_line_error(pbexport(*train_args, "--backbone", "cifar_resnet20", "--weights", path),
                          "r32.pth: weights do not fit the backbone: unexpected")


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.npz"
    np.savez(path, train_images=np.zeros((0, 8, 8, 3), np.uint8), train_labels=np.zeros(0, int),
             test_images=np.zeros((2, 8, 8, 3), np.uint8), test_labels=np.zeros(2, int))
    r = pbexport("train", "--backbone", "cifar_resnet20", "--data", path, "--task", "t", "--out",
                 tmp_path / "run")
    assert_one_line_error(r, "empty.npz: the train split is empty")
    assert not (tmp_path / "run").exists()


def test_malformed_datasets(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, train_images=np.zeros((2, 8, 8, 3), np.uint8))
    args = ["train", "--backbone", "cifar_resnet20", "--task", "t", "--out", tmp_path / "run", "--data"]
    assert_one_line_error(pbexport(*args, bad), "bad.npz: missing arrays train_labels, test_images, test_labels")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00garbage")
    assert_one_line_error(pbexport(*args, garbage), "garbage.npz: cannot read .npz")
    assert_one_line_error(pbexport(*args, tmp_path / "nope"), "nope: dataset not found")
    folder = tmp_path / "folder"
    (folder / "train").mkdir(parents=True)
    assert_one_line_error(pbexport(*args, folder), "ImageFolder dataset needs train/ and test/")
    assert_one_line_error(pbexport(*args, "synthetic:nope"), "nope")


def test_eval_of_a_non_run(tmp_path, tiny_npz):
    assert_one_line_error(pbexport("eval", tmp_path, "--data", tiny_npz), "not a pbexport run directory")


def test_help_lists_commands():
    r = pbexport("--help")
    assert r.returncode == 0
    for command in ("train", "eval", "demo", "backbones"):
        assert command in r.stdout
