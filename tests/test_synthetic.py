"""Tests for the built-in synthetic tasks (numpy only, no torch)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from pbexport.errors import PbexportError
from pbexport.synthetic import BASE_TASK, make_synthetic, new_task_names, synthetic_task_names

ALL_TASKS = synthetic_task_names()


@pytest.fixture(scope="module")
def default_data() -> dict[str, dict]:
    """Each task at its default sizes, generated once for the module (~1.5 s in total)."""
    return {name: make_synthetic(name) for name in ALL_TASKS}


def test_task_lists():
    assert ALL_TASKS[0] == BASE_TASK == "base"
    assert new_task_names() == ALL_TASKS[1:]
    assert len(new_task_names()) >= 3
    assert len(set(ALL_TASKS)) == len(ALL_TASKS)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_format_and_balance(default_data, name):
    d = default_data[name]
    assert set(d) == {"train_images", "train_labels", "test_images", "test_labels", "class_names", "description"}
    k = len(d["class_names"])
    assert k >= 2 and len(set(d["class_names"])) == k
    assert isinstance(d["description"], str) and d["description"]
    default_train = 6000 if name == BASE_TASK else 3000
    for split, n in (("train", default_train), ("test", 1000)):
        images, labels = d[f"{split}_images"], d[f"{split}_labels"]
        assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        counts = np.bincount(labels, minlength=k)
        assert len(counts) == k and counts.max() - counts.min() <= 1
        # images use the dynamic range and are not constant
        assert images.std() > 20


def test_grayscale_glyphs_are_gray(default_data):
    images = default_data["glyphs"]["test_images"]
    assert np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 1], images[..., 2])


@pytest.mark.parametrize("name", ALL_TASKS)
def test_deterministic_and_seeded(name):
    a = make_synthetic(name, n_train=40, n_test=30, seed=3)
    b = make_synthetic(name, n_train=40, n_test=30, seed=3)
    c = make_synthetic(name, n_train=40, n_test=30, seed=4)
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        assert np.array_equal(a[key], b[key])
    assert not np.array_equal(a["train_images"], c["train_images"])
    assert not np.array_equal(a["test_images"], c["test_images"])
    # train and test come from separate streams
    assert not np.array_equal(a["train_images"][:30], a["test_images"])


def test_test_split_independent_of_train_size():
    a = make_synthetic("count", n_train=10, n_test=20)
    b = make_synthetic("count", n_train=50, n_test=20)
    assert np.array_equal(a["test_images"], b["test_images"])


# Fingerprints of fixed outputs (crc32 of the uint8 bytes): the data must be bitwise identical
# on every machine, and an accidental rendering change would silently shift every demo
# figure. Update these deliberately when the rendering is changed on purpose.
FINGERPRINTS = {
    "base": ([0, 3, 4, 5, 7, 2, 1, 6], 4152609140, 1737458203),
    "stripes": ([1, 3, 5, 2, 7, 6, 4, 0], 176895494, 2246762990),
    "count": ([3, 4, 1, 1, 2, 0, 5, 0], 2487050416, 3086186949),
    "glyphs": ([2, 3, 5, 7, 1, 4, 0, 6], 4043524586, 2022418586),
    "outline": ([5, 0, 7, 6, 3, 2, 4, 1], 2640666020, 4161146072),
}


@pytest.mark.parametrize("name", ALL_TASKS)
def test_known_fingerprint(name):
    d = make_synthetic(name, n_train=8, n_test=4, seed=0)
    labels, train_crc, test_crc = FINGERPRINTS[name]
    assert d["train_labels"].tolist() == labels
    assert zlib.crc32(d["train_images"].tobytes()) == train_crc
    assert zlib.crc32(d["test_images"].tobytes()) == test_crc


@pytest.mark.parametrize("size", [16, 28, 64])
@pytest.mark.parametrize("name", ALL_TASKS)
def test_size(name, size):
    d = make_synthetic(name, n_train=12, n_test=5, size=size)
    assert d["train_images"].shape == (12, size, size, 3)
    assert d["test_images"].shape == (5, size, size, 3)


def test_unknown_name_lists_known_tasks():
    with pytest.raises(PbexportError) as info:
        make_synthetic("nope")
    message = str(info.value)
    assert "nope" in message and "\n" not in message
    for name in ALL_TASKS:
        assert name in message


@pytest.mark.parametrize(
    "kwargs",
    [{"n_train": 0}, {"n_test": -1}, {"size": 4}, {"size": 32.0}, {"seed": -1}, {"n_train": True}],
)
def test_bad_arguments(kwargs):
    with pytest.raises(PbexportError):
        make_synthetic(BASE_TASK, **kwargs)


# --------------------------------------------------------------------------- learnability


def _probe_features(images: np.ndarray) -> np.ndarray:
    """Simple fixed features that ignore colour and polarity (as the tasks do).

    Gradient structure tensor (gx^2, gy^2, gx*gy) pooled over 1x1, 2x2 and 4x4 cells,
    normalised by image contrast, plus a histogram of |pixel - median| (an ink-area cue).
    """
    g = images.astype(np.float32).mean(-1) / 255
    gx = g[:, 1:-1, 2:] - g[:, 1:-1, :-2]
    gy = g[:, 2:, 1:-1] - g[:, :-2, 1:-1]
    maps = np.stack([gx * gx, gy * gy, gx * gy], -1)
    maps /= maps[..., :2].mean((1, 2), keepdims=True).sum(-1, keepdims=True) + 1e-6
    n, h, w, c = maps.shape
    feats = []
    for k in (1, 2, 4):
        hh, ww = h // k * k, w // k * k
        feats.append(maps[:, :hh, :ww].reshape(n, k, hh // k, k, ww // k, c).mean((2, 4)).reshape(n, -1))
    flat = g.reshape(n, -1)
    dev = np.abs(flat - np.median(flat, axis=1, keepdims=True))
    dev /= np.quantile(dev, 0.995, axis=1, keepdims=True) + 1e-6
    feats.append(np.stack([(dev > e).mean(1) for e in np.linspace(0.1, 0.9, 9)], 1))
    return np.hstack(feats)


PROBE_TRAIN = 3000  # training images the probes use (keeps the base task's probe fast)


def _ridge_accuracy(d: dict) -> float:
    """Least-squares linear classifier (one-hot targets, small ridge) on the probe features."""
    k = len(d["class_names"])
    xtr, xte = _probe_features(d["train_images"][:PROBE_TRAIN]), _probe_features(d["test_images"])
    ytr = d["train_labels"][:PROBE_TRAIN]
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    a = np.hstack([(xtr - mu) / sd, np.ones((len(xtr), 1))])
    b = np.hstack([(xte - mu) / sd, np.ones((len(xte), 1))])
    w = np.linalg.solve(a.T @ a + np.eye(a.shape[1]), a.T @ np.eye(k)[ytr])
    return float(((b @ w).argmax(1) == d["test_labels"]).mean())


def _raw_pixel_ncm_accuracy(d: dict) -> float:
    """Nearest class mean on raw pixels: random colour/polarity/position should defeat it."""
    k = len(d["class_names"])
    xtr = d["train_images"][:PROBE_TRAIN].reshape(-1, d["train_images"][0].size).astype(np.float32)
    xte = d["test_images"].reshape(len(d["test_images"]), -1).astype(np.float32)
    ytr = d["train_labels"][:PROBE_TRAIN]
    means = np.stack([xtr[ytr == c].mean(0) for c in range(k)])
    dist = (xte * xte).sum(1)[:, None] - 2 * xte @ means.T + (means * means).sum(1)[None]
    return float((dist.argmin(1) == d["test_labels"]).mean())


@pytest.mark.parametrize("name", ALL_TASKS)
def test_learnable_but_not_trivial(default_data, name):
    d = default_data[name]
    chance = 1.0 / len(d["class_names"])
    acc = _ridge_accuracy(d)
    # measured at defaults (chance 0.10-0.17): base 0.72, stripes 0.53, count 0.48, glyphs 0.75,
    # outline 0.68; raw-pixel nearest class mean stays near chance except stripes (0.37)
    assert 2 * chance < acc < 0.9, f"{name}: linear probe accuracy {acc:.3f} (chance {chance:.3f})"
    ncm = _raw_pixel_ncm_accuracy(d)
    assert ncm < 0.5, f"{name}: raw-pixel nearest-class-mean accuracy {ncm:.3f}"


@pytest.mark.parametrize("name", ["count", "glyphs"])
def test_label_content_clear_of_border(monkeypatch, name):
    """Blobs and digit segments stay size/8 from the border: a shifted-crop augmentation with
    size/8 padding must not push them out and change the label."""
    import pbexport.synthetic as synthetic

    # flat background, no noise: any pixel that differs from the corner is ink
    monkeypatch.setattr(synthetic, "_add_noise", lambda rng, img, amp, gray=False: img)
    monkeypatch.setattr(
        synthetic, "_gradient_background", lambda rng, paper, grid: paper[:, None, None, :] + 0 * grid[0][..., None]
    )
    images = make_synthetic(name, n_train=600, n_test=1)["train_images"].astype(np.int16)
    ink = (images != images[:, :1, :1, :]).any(-1).any(0)
    margin = 32 // 8
    assert ink[margin:-margin, margin:-margin].any()
    assert not ink[:margin].any() and not ink[-margin:].any()
    assert not ink[:, :margin].any() and not ink[:, -margin:].any()
