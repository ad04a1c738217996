"""Piggyback masks: real-valued scores, binarized in the forward pass, trained straight-through.

Effective weight = W * (scores > threshold). The mask is attached with
``torch.nn.utils.parametrize`` so every read of ``module.weight`` sees the masked weight, even
when another module reads it as a plain attribute (``nn.MultiheadAttention`` reads
``out_proj.weight`` and ``in_proj_weight`` directly, never calling ``out_proj.forward``).

Masked tensors are named by the plain network's parameter names (``layer1.0.conv1.weight``),
in ``named_modules`` order: that ordered table is what binds a packed mask to a backbone.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

SCORE_INIT = 1e-2  # the paper's initial score: every weight starts switched on
THRESHOLD = 5e-3   # the paper's binarization threshold

_MASKED_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
                   nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# nn.MultiheadAttention keeps its input projections as bare Parameters used as matrices.
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_BATCHNORMS = nn.modules.batchnorm._BatchNorm


class _BinarizeSTE(torch.autograd.Function):
    """mask = scores > threshold; backward passes the gradient through unchanged."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class WeightMask(nn.Module):
    """Parametrization ``W -> W * binarize(scores)``; holds the task's trainable scores."""

    def __init__(self, shape: torch.Size, init: float = SCORE_INIT, threshold: float = THRESHOLD):
        super().__init__()
        self.scores = nn.Parameter(torch.full(shape, float(init)))
        self.threshold = float(threshold)

    def mask(self) -> torch.Tensor:
        return self.scores.detach() > self.threshold

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * _BinarizeSTE.apply(self.scores, self.threshold)


def _maskable(net: nn.Module, exclude: str | None):
    """(name, module, attr) of every weight Piggyback masks, in canonical order."""
    for mod_name, module in net.named_modules():
        if exclude is not None and (mod_name == exclude or mod_name.startswith(exclude + ".")):
            continue
        attrs = ()
        if isinstance(module, _MASKED_MODULES):
            attrs = ("weight",)
        elif isinstance(module, nn.MultiheadAttention):
            attrs = _ATTENTION_WEIGHTS
        for attr in attrs:
            if isinstance(getattr(module, attr, None), nn.Parameter):
                yield (f"{mod_name}.{attr}" if mod_name else attr), module, attr


def maskable_names(net: nn.Module, exclude: str | None = None) -> list[str]:
    """Names of the weights :func:`attach_masks` would mask, without changing ``net``."""
    return [name for name, _, _ in _maskable(net, exclude)]


def attach_masks(net: nn.Module, exclude: str | None = None, init: float = SCORE_INIT,
                 threshold: float = THRESHOLD) -> list[str]:
    """Mask every conv/linear/attention weight of ``net`` except under module ``exclude``.

    The masked weights are frozen (``requires_grad=False``); only the scores train.
    """
    names = []
    for name, module, attr in list(_maskable(net, exclude)):
        weight = getattr(module, attr)
        parametrize.register_parametrization(module, attr, WeightMask(weight.shape, init, threshold),
                                             unsafe=True)
        module.parametrizations[attr].original.requires_grad_(False)
        names.append(name)
    return names


def _mask_modules(net: nn.Module):
    """(name, WeightMask) of every attached mask, in canonical order."""
    for mod_name, module in net.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, WeightMask):
                    yield (f"{mod_name}.{attr}" if mod_name else attr), p


def mask_scores(net: nn.Module) -> dict[str, nn.Parameter]:
    return {name: m.scores for name, m in _mask_modules(net)}


def binary_masks(net: nn.Module) -> dict[str, torch.Tensor]:
    """The current binary masks (bool tensors), by masked weight name."""
    return {name: m.mask() for name, m in _mask_modules(net)}


@torch.no_grad()
def set_binary_masks(net: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Set scores so the forward pass uses exactly ``masks`` (True -> init score, False -> 0)."""
    modules = dict(_mask_modules(net))
    if set(modules) != set(masks):
        missing = sorted(set(modules) - set(masks))
        extra = sorted(set(masks) - set(modules))
        raise ValueError(f"mask names do not match the network (missing {missing[:3]}, extra {extra[:3]})")
    for name, module in modules.items():
        mask = masks[name].to(torch.bool)
        if mask.shape != module.scores.shape:
            raise ValueError(f"mask {name} has shape {list(mask.shape)}, expected {list(module.scores.shape)}")
        module.scores.copy_(torch.where(mask, SCORE_INIT, 0.0))


def mask_density(net: nn.Module) -> float:
    """Fraction of masked weights that are kept (1.0 when nothing is masked)."""
    ones = total = 0
    for _, m in _mask_modules(net):
        mask = m.mask()
        ones += int(mask.sum())
        total += mask.numel()
    return ones / total if total else 1.0


def batchnorms(net: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in net.named_modules() if isinstance(m, _BATCHNORMS)]


def batchnorm_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """Per-task BN tensors (affine and running statistics) by plain state-dict name."""
    out = {}
    for name, bn in batchnorms(net):
        for key in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(bn, key, None)
            if t is not None:
                out[f"{name}.{key}"] = t
    return out
