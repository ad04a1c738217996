"""Backbone registry: CIFAR ResNets + every torchvision classifier, safe weight loading, fingerprints.

A backbone is a plain ``nn.Module`` that maps normalized images to logits, plus an
:class:`InputSpec` (size, channels, mean/std) that says how to feed it. Weights come from a file
(loaded without pickle execution) or from a finetune run directory; no weights means random init.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PbexportError
from .spec import IMAGENET_MEAN, IMAGENET_STD, InputSpec  # noqa: F401  (torch-free; re-exported here)

RANDOM_INIT_SEED = 0


# --------------------------------------------------------------------------- CIFAR ResNets
class _CifarBasicBlock(nn.Module):
    """He et al. 2016 sec. 4.2 block with the parameter-free "option A" shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if (stride != 1 or in_planes != planes) else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.pad:  # every second pixel, channels zero-padded on both sides
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64), start=1):
            layers = []
            for i in range(blocks_per_stage):
                stride = 2 if (i == 0 and stage > 1) else 1
                layers.append(_CifarBasicBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


_CIFAR_DEPTHS = {"cifar_resnet20": 3, "cifar_resnet32": 5, "cifar_resnet44": 7, "cifar_resnet56": 9}

# torchvision models whose constructor needs extra arguments to be a plain single-output classifier.
_TV_KWARGS = {"inception_v3": {"aux_logits": False, "init_weights": False},
              "googlenet": {"aux_logits": False, "init_weights": False}}
_TV_SIZES = {"inception_v3": 299}


def list_backbones() -> list[str]:
    """Every registered backbone name: the CIFAR ResNets, then torchvision's classifiers."""
    import torchvision

    return sorted(_CIFAR_DEPTHS) + sorted(torchvision.models.list_models(module=torchvision.models))


def default_input_spec(name: str) -> InputSpec:
    if name in _CIFAR_DEPTHS:
        return InputSpec(32)
    return InputSpec(_TV_SIZES.get(name, 224))


def build_architecture(name: str, num_classes: int, input_size: int | None = None) -> nn.Module:
    """Random-init architecture ``name`` with a ``num_classes``-way classifier."""
    if name in _CIFAR_DEPTHS:
        return CifarResNet(_CIFAR_DEPTHS[name], num_classes)
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise PbexportError(f"unknown backbone {name!r}; known: cifar_resnet20/32/44/56 or any "
                            "torchvision classification model (see `pbexport backbones`)")
    kwargs = dict(_TV_KWARGS.get(name, {}), num_classes=num_classes)
    if name.startswith(("vit_", "maxvit")) and input_size is not None:
        kwargs["image_size"] = input_size  # transformers fix their grid at construction time
    return torchvision.models.get_model(name, weights=None, **kwargs)


# --------------------------------------------------------------------------- classifier head
def classifier_name(model: nn.Module) -> str:
    """Dotted name of the module that produces the logits (the one a new task head replaces)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    # squeezenet ends in a 1x1 conv, not a Linear
    final_conv = getattr(model, "classifier", None)
    if last is None and isinstance(final_conv, nn.Sequential):
        for name, module in final_conv.named_children():
            if isinstance(module, nn.Conv2d):
                last = f"classifier.{name}"
    if last is None:
        raise PbexportError(f"cannot find the classifier layer of {type(model).__name__}")
    return last


def replace_classifier(model: nn.Module, num_classes: int) -> str:
    """Swap the classifier for a fresh ``num_classes``-way layer; return its dotted name."""
    name = classifier_name(model)
    old = model.get_submodule(name)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return name


def num_classes_of(model: nn.Module) -> int:
    head = model.get_submodule(classifier_name(model))
    return head.out_features if isinstance(head, nn.Linear) else head.out_channels


# --------------------------------------------------------------------------- weights
def _normalize_keys(state: dict) -> dict[str, torch.Tensor]:
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        out[key.removeprefix("module.")] = value
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from .pth/.pt/.th (``weights_only``: never runs pickled code) or .safetensors."""
    path = Path(path)
    if not path.exists():
        raise PbexportError("weights file not found", str(path))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for garbage input
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PbexportError(f"cannot read weights ({first[:200]})", str(path)) from None
    if not isinstance(state, dict):
        raise PbexportError("weights file does not hold a state dict", str(path))
    state = _normalize_keys(state)
    if not state:
        raise PbexportError("weights file holds no tensors", str(path))
    return state


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model`` after checking every key and shape; BN counters are optional."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
        raise PbexportError("weights do not fit the backbone: " + ", ".join(parts), source)
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise PbexportError(f"weights do not fit the backbone: {key} has shape "
                                f"{list(value.shape)}, expected {list(own[key].shape)}", source)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def fingerprint(model: nn.Module) -> str:
    """sha256 over the canonical tensors (sorted names, dtype, shape, bytes); BN counters excluded."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if key.endswith("num_batches_tracked"):
            continue
        t = value.detach().cpu().contiguous()
        h.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Backbone:
    """A frozen pretrained network and everything needed to feed and identify it."""

    name: str
    model: nn.Module
    spec: InputSpec
    fingerprint: str
    weights: str | None  # where the weights came from (None = random init)

    @property
    def num_classes(self) -> int:
        return num_classes_of(self.model)


def load_backbone(name: str, weights: str | Path | None = None, input_size: int | None = None) -> Backbone:
    """Build backbone ``name`` and load ``weights`` (file or finetune run directory) into it.

    Without weights the backbone is randomly initialized, always from the same seed.

    The classifier's class count is taken from the weights, so a CIFAR-10 ResNet keeps its
    10-way ``linear`` and a finetune run keeps its task head as the backbone's classifier.
    """
    if not name:
        raise PbexportError("no backbone given")
    spec = default_input_spec(name)
    if input_size is not None:
        spec = InputSpec(input_size, spec.channels, spec.mean, spec.std)
    state, source = None, None
    if weights is not None:
        wpath = Path(weights)
        if wpath.is_dir():
            from .runs import read_finetune_weights

            state, run_spec = read_finetune_weights(wpath, name)
            spec = run_spec if input_size is None else spec
        else:
            state = read_state_dict(wpath)
        source = str(wpath)
    # random init is seeded so a run on random weights can be rebuilt (and fingerprinted) later
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = build_architecture(name, 10 if name in _CIFAR_DEPTHS else 1000, spec.size)
    if state is not None:
        # the classifier's width comes from the weights (a finetune run keeps its task head)
        head_weight = state.get(classifier_name(model) + ".weight")
        if head_weight is not None and head_weight.shape[0] != num_classes_of(model):
            replace_classifier(model, int(head_weight.shape[0]))
        load_weights_into(model, state, source)
    model.eval()
    return Backbone(name, model, spec, fingerprint(model), source)
