"""Datasets: ImageFolder directories, .npz arrays, or the built-in ``synthetic:NAME`` tasks.

Everything is held in memory as uint8 NHWC images at the source's own size; batches are turned
into what every pbexport model takes as input (float32 NCHW RGB in [0, 1] at the backbone's input
size) on the fly, so a 28x28 MNIST set feeds a 224x224 backbone without a 224x224 copy in memory.
Normalization (mean/std) is part of the model, not of the data, exactly as in the ONNX graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import PbexportError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".gif", ".tif", ".tiff", ".webp"}
AUGMENTATIONS = ("none", "crop", "crop+flip")
# How the validation split picks each class's images: at random, or as one run of consecutive images
# (file order), so that near-duplicates stored together (video frames, GTSRB's tracks) stay on one side.
VAL_SPLITS = ("random", "contiguous")


@dataclass
class ImageSet:
    """uint8 images (N, H, W, C) with int64 labels; C is 1 or 3."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index])


@dataclass
class TaskData:
    train: ImageSet
    test: ImageSet
    class_names: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_data(spec: str, image_size: int | None = None) -> TaskData:
    """Load ``spec``: a directory (ImageFolder), a ``.npz`` file, or ``synthetic:NAME``.

    ``image_size`` only matters for ImageFolder, whose images of mixed sizes are resized once
    at load time; arrays keep their size and are resized per batch.
    """
    if spec.startswith("synthetic:"):
        from .synthetic import make_synthetic

        arrays = make_synthetic(spec.split(":", 1)[1])
        data = _from_arrays(arrays, spec, arrays.get("class_names"))
    else:
        path = Path(spec)
        if not path.exists():
            raise PbexportError("dataset not found", spec)
        if path.is_dir():
            data = _load_image_folder(path, image_size or 224)
        elif path.suffix == ".npz":
            data = _load_npz(path)
        else:
            raise PbexportError("unsupported dataset (expected a directory, a .npz file or "
                                "synthetic:NAME)", spec)
    _check(data)
    return data


def _load_npz(path: Path) -> TaskData:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise PbexportError(f"cannot read .npz ({str(exc).splitlines()[0][:200]})", str(path)) from None
    need = ("train_images", "train_labels", "test_images", "test_labels")
    missing = [k for k in need if k not in arrays]
    if missing:
        raise PbexportError(f"missing arrays {', '.join(missing)} (need {', '.join(need)})", str(path))
    names = arrays.get("class_names")
    return _from_arrays(arrays, str(path), None if names is None else [str(n) for n in names])


def _from_arrays(arrays: dict, source: str, class_names: list[str] | None) -> TaskData:
    sets = []
    for split in ("train", "test"):
        images = np.asarray(arrays[f"{split}_images"])
        labels = np.asarray(arrays[f"{split}_labels"])
        if images.ndim == 3:  # (N, H, W) grayscale
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise PbexportError(f"{split}_images must be (N, H, W, C) with C in (1, 3), got shape "
                                f"{list(images.shape)}", source)
        if images.dtype != np.uint8:
            raise PbexportError(f"{split}_images must be uint8, got {images.dtype}", source)
        if labels.ndim != 1 or len(labels) != len(images):
            raise PbexportError(f"{split}_labels must be one label per image ({len(images)}), got "
                                f"shape {list(labels.shape)}", source)
        if not np.issubdtype(labels.dtype, np.integer):
            raise PbexportError(f"{split}_labels must be integers, got {labels.dtype}", source)
        sets.append(ImageSet(images, labels.astype(np.int64)))
    num_classes = int(max(sets[0].labels.max(initial=-1), sets[1].labels.max(initial=-1))) + 1
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    return TaskData(sets[0], sets[1], list(class_names), source)


def _load_image_folder(root: Path, image_size: int) -> TaskData:
    from PIL import Image

    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise PbexportError("ImageFolder dataset needs train/ and test/ (or val/) subdirectories",
                            str(root))
    class_names = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if not class_names:
        raise PbexportError("train/ has no class subdirectories", str(root))
    index = {name: i for i, name in enumerate(class_names)}
    sets = []
    for split_dir in (root / "train", test_dir):
        images, labels = [], []
        for class_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
            if class_dir.name not in index:
                raise PbexportError(f"class {class_dir.name!r} is not in train/", str(class_dir))
            for file in sorted(class_dir.iterdir()):
                if file.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                try:
                    with Image.open(file) as im:
                        im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                        images.append(np.asarray(im, dtype=np.uint8))
                except Exception as exc:
                    raise PbexportError(f"cannot read image ({exc})", str(file)) from None
                labels.append(index[class_dir.name])
        if not images:
            raise PbexportError("no images found", str(split_dir))
        sets.append(ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64)))
    return TaskData(sets[0], sets[1], class_names, str(root))


def _check(data: TaskData) -> None:
    for split, s in (("train", data.train), ("test", data.test)):
        if len(s) == 0:
            raise PbexportError(f"the {split} split is empty", data.source)
        if s.labels.min() < 0 or s.labels.max() >= data.num_classes:
            raise PbexportError(f"{split} labels must lie in [0, {data.num_classes})", data.source)
    if data.num_classes < 2:
        raise PbexportError("a classification task needs at least 2 classes", data.source)


def split_validation(train: ImageSet, fraction: float, seed: int,
                     how: str = "random") -> tuple[ImageSet, ImageSet | None]:
    """Hold out ``fraction`` of each class of train (seeded; ``how`` in VAL_SPLITS) for picking the best
    epoch."""
    if not 0.0 <= fraction < 1.0:
        raise PbexportError(f"--val-fraction must be in [0, 1), got {fraction}")
    if how not in VAL_SPLITS:
        raise PbexportError(f"unknown validation split {how!r}; choose from {', '.join(VAL_SPLITS)}")
    if fraction == 0.0:
        return train, None
    rng = np.random.default_rng(seed)
    val_idx = []
    for c in np.unique(train.labels):
        idx = np.flatnonzero(train.labels == c)
        count = int(round(len(idx) * fraction))
        if how == "contiguous":
            start = rng.integers(0, len(idx) - count + 1)
            val_idx.append(idx[start:start + count])
        else:
            rng.shuffle(idx)
            val_idx.append(idx[:count])
    val = np.sort(np.concatenate(val_idx))
    keep = np.setdiff1d(np.arange(len(train)), val)
    if len(val) == 0 or len(keep) == 0:
        raise PbexportError(f"--val-fraction {fraction} leaves an empty split of {len(train)} images")
    return train.subset(keep), train.subset(val)


def to_model_input(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 NHWC (C = 1 or 3) -> float32 NCHW RGB in [0, 1] at ``size`` x ``size``."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > size)
    return x.contiguous()


def crop_padding(height: int) -> int:
    """The zero padding (on each side) of the shifted crop: a shift of up to size/8."""
    return max(1, height // 8)


def augment(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Random shifted crop (zero padding of size/8) and optional horizontal flip, seeded."""
    if mode == "none":
        return x
    n, _, h, w = x.shape
    pad = crop_padding(h)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad)
    x = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    x = x.gather(3, cols)
    if mode == "crop+flip":
        flip = torch.rand(n, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def batches(data: ImageSet, batch_size: int, size: int, *, shuffle: bool = False,
            augmentation: str = "none", generator: torch.Generator | None = None):
    """Yield (inputs, labels) batches; shuffle/augment draw only from ``generator``."""
    order = torch.randperm(len(data), generator=generator).numpy() if shuffle else np.arange(len(data))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        x = to_model_input(data.images[idx], size)
        if augmentation != "none":
            x = augment(x, augmentation, generator)
        yield x, torch.as_tensor(data.labels[idx])
