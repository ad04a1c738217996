"""A task model: the shared backbone with a new head, and (per method) masks and per-task BN.

Input contract, identical to the ONNX graphs: float32 NCHW RGB in [0, 1] at the backbone's
input size; normalization happens inside the model.

The *task state* is what a task adds to the backbone, keyed by plain network names:
``scores.<weight>`` (piggyback mask scores), the head's tensors, per-task BN tensors, or, for
finetune, the whole network.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from . import masking
from .backbones import Backbone, InputSpec, replace_classifier
from .errors import PbexportError

Method = Literal["piggyback", "classifier", "finetune"]
METHODS: tuple[str, ...] = ("piggyback", "classifier", "finetune")
SCORES_PREFIX = "scores."


class TaskModel(nn.Module):
    def __init__(self, net: nn.Module, spec: InputSpec, method: str, train_bn: bool, head_name: str):
        super().__init__()
        self.net = net
        self.spec = spec
        self.method = method
        self.train_bn = train_bn
        self.head_name = head_name
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def train(self, mode: bool = True) -> TaskModel:
        super().train(mode)
        # a frozen backbone keeps its BN statistics unless the task learns its own BN
        if mode and self.method != "finetune" and not self.train_bn:
            for _, bn in masking.batchnorms(self.net):
                bn.eval()
        return self

    # ----------------------------------------------------------------- task state
    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters to optimize, grouped by which learning rate they take."""
        head = list(self.net.get_submodule(self.head_name).parameters())
        head_ids = {id(p) for p in head}
        if self.method == "finetune":
            rest = [p for p in self.net.parameters() if id(p) not in head_ids]
            return {"head": head, "backbone": rest}
        groups = {"head": head}
        if self.method == "piggyback":
            groups["mask"] = list(masking.mask_scores(self.net).values())
        if self.train_bn:
            groups["bn"] = [p for _, bn in masking.batchnorms(self.net) for p in bn.parameters()]
        return groups

    def task_state(self) -> dict[str, torch.Tensor]:
        """The tensors this task adds to the backbone (detached copies), by canonical name."""
        if self.method == "finetune":
            state = dict(self.net.state_dict())
        else:
            head = self.net.get_submodule(self.head_name)
            state = {f"{self.head_name}.{k}": v for k, v in head.state_dict().items()}
            if self.train_bn:
                state.update(masking.batchnorm_state(self.net))
            for name, scores in masking.mask_scores(self.net).items():
                state[SCORES_PREFIX + name] = scores
        return {k: v.detach().clone().contiguous() for k, v in state.items()}

    @torch.no_grad()
    def load_task_state(self, state: dict[str, torch.Tensor], source: str = "task state") -> None:
        expected = self.task_state()
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            raise PbexportError(f"task state does not match the model (missing {missing[:3]}, "
                                f"unexpected {extra[:3]})", source)
        scores = masking.mask_scores(self.net)
        plain = {}
        for key, value in state.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise PbexportError(f"{key} has shape {list(value.shape)}, expected "
                                    f"{list(expected[key].shape)}", source)
            if key.startswith(SCORES_PREFIX):
                scores[key[len(SCORES_PREFIX):]].copy_(value)
            else:
                plain[key] = value
        if self.method == "finetune":
            self.net.load_state_dict(plain)
        else:
            own = self.net.state_dict(keep_vars=True)
            for key, value in plain.items():
                own[key].data.copy_(value)


def build_task_model(backbone: Backbone, num_classes: int, method: str = "piggyback",
                     train_bn: bool = False, seed: int = 0) -> TaskModel:
    """A fresh task model over a copy of ``backbone`` (the backbone object is never modified)."""
    if method not in METHODS:
        raise PbexportError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    net = copy.deepcopy(backbone.model)
    torch.manual_seed(seed)  # the new head's init is part of the run's reproducible state
    head_name = replace_classifier(net, num_classes)
    if method == "piggyback":
        masking.attach_masks(net, exclude=head_name)
    trainable = method == "finetune"
    for p in net.parameters():
        p.requires_grad_(trainable)
    model = TaskModel(net, backbone.spec, method, train_bn, head_name)
    for group in model.trainable_groups().values():
        for p in group:
            p.requires_grad_(True)
    return model.eval()
