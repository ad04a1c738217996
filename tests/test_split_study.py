"""tools/split_study.py: how many validation images have a near copy among the training images, per split."""

import json

import numpy as np
from conftest import import_tool


def _tracks(rng, classes, tracks, frames):
    """Per class, ``tracks`` runs of ``frames`` consecutive near-identical images (one random scene each)."""
    images, labels = [], []
    for c in range(classes):
        for _ in range(tracks):
            scene = rng.integers(0, 256, (32, 32, 3))
            for _ in range(frames):
                images.append(np.clip(scene + rng.integers(-6, 7, scene.shape), 0, 255))
                labels.append(c)
    return np.asarray(images, dtype=np.uint8), np.asarray(labels)


def test_a_contiguous_split_holds_out_whole_tracks(tmp_path, capsys):
    rng = np.random.default_rng(0)
    train_images, train_labels = _tracks(rng, classes=3, tracks=20, frames=3)
    test_images, test_labels = _tracks(rng, classes=3, tracks=4, frames=3)  # scenes never seen in train
    np.savez(tmp_path / "tracks.npz", train_images=train_images, train_labels=train_labels,
             test_images=test_images, test_labels=test_labels)
    study = import_tool("split_study")
    out = tmp_path / "splits.json"
    assert study.main(["--datasets", str(tmp_path / "tracks.npz"), "--val-fraction", "0.25", "--seeds", "2",
                       "--out", str(out)]) == 0
    shares = json.loads(out.read_text())["datasets"]["tracks"]
    # a random split holds out frames whose neighbours it trains on; a contiguous one leaks at most the
    # two tracks it cuts at its ends (4 of its 15 frames per class); test shares no scene with train
    assert min(shares["random"]["validation"]) > 0.8
    assert max(shares["contiguous"]["validation"]) <= 4 / 15
    assert shares["random"]["test"] == shares["contiguous"]["test"] == [0.0, 0.0]
    assert "contiguous  validation" in capsys.readouterr().out


def test_a_missing_dataset_is_one_line_and_exit_2(tmp_path, capsys):
    study = import_tool("split_study")
    assert study.main(["--datasets", str(tmp_path / "none.npz"), "--out", str(tmp_path / "s.json")]) == 2
    assert "none.npz" in capsys.readouterr().err and not (tmp_path / "s.json").exists()
