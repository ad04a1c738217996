"""InputSpec: how images must be fed to a backbone (torch-free: bundles and devices read it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """How images must look when they reach the model: RGB in [0, 1], then (x - mean) / std."""

    size: int
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(int(d["size"]), int(d["channels"]), tuple(d["mean"]), tuple(d["std"]))
