"""Training: Piggyback masks and the two baselines (classifier-only, full fine-tune), and eval.

Reproducibility is by construction: every epoch reseeds its own shuffling, augmentation and
dropout from (seed, epoch), and a checkpoint holds the task state and Adam's moments, so a run
resumed after any epoch ends exactly where the uninterrupted run ends.
"""

from __future__ import annotations

import math
import platform
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import masking, runs
from .backbones import load_backbone
from .data import AUGMENTATIONS, VAL_SPLITS, ImageSet, TaskData, batches, load_data, split_validation
from .errors import PbexportError
from .taskmodel import METHODS, TaskModel, build_task_model

# Head (and per-task BN) lr by method. Piggyback's 1e-2 beat 1e-3 and 3e-3 on the accuracy benchmark;
# fine-tuning keeps 1e-3 (its head lr at 1e-2 is measured there too, as finetune-head1e-2).
DEFAULT_LR_HEAD = {"piggyback": 1e-2, "classifier": 1e-3, "finetune": 1e-3}
_UNUSED_SETTINGS = {"classifier": ("lr_mask", "mask_decay", "mask_eps", "lr_backbone", "warmup_epochs"),
                    "finetune": ("lr_mask", "mask_decay", "mask_eps", "lr_bn"),
                    "piggyback": ("lr_backbone",)}
# --lr-bn auto trains the task once per per-task BN lr here (the same seed, so the same data and
# initialisation) and keeps the run that scores best on validation: on the accuracy benchmark MNIST
# wanted the slower BN and ResNet-20 / GTSRB the faster one (docs/TRAINING.md).
AUTO = "auto"
AUTO_LR_BN = (1e-2, 3e-3)


@dataclass
class TrainConfig:
    """Everything that determines a training run (stored as the run's config.json).

    Defaults are the recipe the accuracy benchmark chose (docs/TRAINING.md): Adam with a cosine
    decay, 3e-4 for the mask scores (a score must travel from 1e-2 to below 5e-3 to flip: ~17
    Adam steps at 3e-4, ~50 at the paper's 1e-4), per-task BN for piggyback, and a head lr of 1e-2
    for piggyback, 1e-3 for the baselines: with the backbone frozen, the head and BN must adapt
    alone, and adapting fast costs fewer stored bits. Piggyback's per-task BN lr is chosen per task
    on validation among AUTO_LR_BN (``lr_bn="auto"``): no single BN lr met fine-tuning on both tasks.
    """

    backbone: str
    data: str
    task: str
    weights: str | None = None
    method: str = "piggyback"
    epochs: int = 10
    batch_size: int = 64
    lr_mask: float = 3e-4
    lr_head: float | None = None  # None: DEFAULT_LR_HEAD[method]
    lr_bn: float | str | None = None  # per-task BN's lr or "auto"; None: auto for piggyback (see __post_init__)
    lr_backbone: float = 1e-3
    mask_decay: float = 0.0
    mask_eps: float = 1e-8  # Adam's epsilon for the mask scores (torch's default): see make_optimizer
    train_bn: bool | None = None  # None: on for piggyback, off for classifier (finetune trains all)
    seed: int = 0
    val_fraction: float = 0.1
    val_split: str = "random"  # a run from before --val-split had the random one
    average_epochs: int | None = None  # keep the mean of the last N epochs' task states; None: the best epoch
    warmup_epochs: int = 0  # the first N epochs train only the head (and per-task BN): see scheduled_lr
    augment: str = "crop"
    input_size: int | None = None
    max_train_samples: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise PbexportError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.augment not in AUGMENTATIONS:
            raise PbexportError(f"unknown augmentation {self.augment!r}; choose from {', '.join(AUGMENTATIONS)}")
        if self.val_split not in VAL_SPLITS:
            raise PbexportError(f"unknown validation split {self.val_split!r}; choose from {', '.join(VAL_SPLITS)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise PbexportError("--epochs and --batch-size must be at least 1")
        if self.mask_decay < 0:
            raise PbexportError("--mask-decay must be at least 0")
        if not self.mask_eps > 0:
            raise PbexportError(f"--mask-eps must be positive, got {self.mask_eps}")
        if self.average_epochs is not None and not 1 <= self.average_epochs <= self.epochs:
            raise PbexportError(f"--average-epochs must be between 1 and --epochs ({self.epochs}), "
                                f"got {self.average_epochs}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise PbexportError(f"--warmup-epochs must be at least 0 and below --epochs ({self.epochs}), "
                                f"got {self.warmup_epochs}")
        if self.train_bn is None:
            self.train_bn = self.method == "piggyback"
        if self.lr_head is None:
            self.lr_head = DEFAULT_LR_HEAD[self.method]
        if self.lr_bn is None:  # choosing needs a validation split; finetune trains BN with every weight
            chooses = self.method == "piggyback" and self.train_bn and self.val_fraction > 0
            self.lr_bn = AUTO if chooses else self.lr_head
        if self.lr_bn == AUTO:
            if not self.train_bn or self.method == "finetune":
                raise PbexportError("--lr-bn auto needs per-task BN (piggyback, or classifier --train-bn)")
            if not self.val_fraction > 0:
                raise PbexportError("--lr-bn auto chooses on the validation split: --val-fraction must be above 0")
        elif isinstance(self.lr_bn, str):
            raise PbexportError(f"--lr-bn must be a number or {AUTO!r}, got {self.lr_bn!r}")
        for name in ("lr_mask", "lr_head", "lr_bn", "lr_backbone"):
            value = getattr(self, name)
            if value != AUTO and not value > 0:
                raise PbexportError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.weights is not None:
            self.weights = str(Path(self.weights).resolve())

    def to_dict(self) -> dict:
        return asdict(self)

    def settings(self) -> dict:
        """The settings that shape a run of this method: those it never reads are left out, so a new
        mask default does not make a fine-tune run stale."""
        unused = _UNUSED_SETTINGS[self.method]
        return {k: v for k, v in self.to_dict().items() if k not in unused}

    def bn_candidates(self) -> list[TrainConfig]:
        """The runs ``lr_bn="auto"`` chooses among: this config at each of AUTO_LR_BN."""
        return [replace(self, lr_bn=lr) for lr in AUTO_LR_BN]

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        if "lr_bn" not in d:  # a run from before --lr-bn trained its BN at the head lr
            d = {**d, "lr_bn": d.get("lr_head")}
        return cls(**{k: v for k, v in d.items() if k in names})


def cosine_lr(base: float, step: int, total: int) -> float:
    return 0.5 * base * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


# The groups a warmup holds still: what adapts the backbone (mask scores, or every backbone weight).
DELAYED_GROUPS = ("mask", "backbone")


def scheduled_lr(group: str, base: float, step: int, total: int, warmup: int) -> float:
    """The lr of parameter group ``group`` at ``step`` of ``total``: a cosine decay to 0 over the run,
    except that the groups that adapt the backbone (DELAYED_GROUPS) wait for the first ``warmup`` steps,
    while a fresh head (and per-task BN) settle, and then take their own cosine over the steps left."""
    if group not in DELAYED_GROUPS:
        return cosine_lr(base, step, total)
    if step < warmup:
        return 0.0
    return cosine_lr(base, step - warmup, total - warmup)


@torch.no_grad()
def predict_logits(model: TaskModel, data: ImageSet, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    outs = [model(x) for x, _ in batches(data, batch_size, model.spec.size)]
    return torch.cat(outs)


def evaluate(model: TaskModel, data: ImageSet, batch_size: int = 256) -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    return _top1(predict_logits(model, data, batch_size), data.labels)


def accuracy_and_loss(model: TaskModel, data: ImageSet, batch_size: int = 256) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy: the two scores --lr-bn auto ranks its candidates by."""
    logits = predict_logits(model, data, batch_size)
    return _top1(logits, data.labels), float(F.cross_entropy(logits, torch.as_tensor(data.labels).long()))


def _top1(logits: torch.Tensor, labels: np.ndarray) -> float:
    return float((logits.argmax(1).numpy() == labels).mean())


def validation_score(record: dict) -> tuple[float, float]:
    """How --lr-bn auto ranks its candidates (higher is better): validation accuracy, then loss, since
    the nearly saturated validation split can tie on accuracy."""
    return record["val_accuracy"], -record["val_loss"]


def _subsample(data: ImageSet, n: int | None, seed: int) -> ImageSet:
    if n is None or n >= len(data):
        return data
    idx = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
    return data.subset(idx)


def split_for_run(cfg: TrainConfig, data: TaskData) -> tuple[ImageSet, ImageSet | None]:
    """The training and validation images a run of ``cfg`` uses (validation picks the epoch it keeps)."""
    return split_validation(_subsample(data.train, cfg.max_train_samples, cfg.seed), cfg.val_fraction, cfg.seed,
                            cfg.val_split)


def make_optimizer(model: TaskModel, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam with one parameter group per learning rate. The mask scores take their own epsilon: Adam moves
    a score by about lr * g / (rms(g) + eps) a step, so at the default 1e-8 every score with a steady
    gradient sign flips within ~17 steps however weak its gradient; a larger eps slows only the scores
    whose gradients are weaker than eps, so fewer flip and the mask stores in fewer bits."""
    if cfg.lr_bn == AUTO:
        raise ValueError("lr_bn='auto' trains one run per BN lr: make the optimizer of each of cfg.bn_candidates()")
    lrs = {"head": cfg.lr_head, "bn": cfg.lr_bn, "mask": cfg.lr_mask, "backbone": cfg.lr_backbone}
    groups = [{"params": ps, "lr": lrs[name], "base_lr": lrs[name], "name": name}
              | ({"eps": cfg.mask_eps} if name == "mask" else {})
              for name, ps in model.trainable_groups().items() if ps]
    return torch.optim.Adam(groups)


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
          data: TaskData | None = None) -> dict:
    """Train ``cfg`` into run directory ``out``; return the final metrics dict."""
    out = Path(out)
    backbone = load_backbone(cfg.backbone, cfg.weights, cfg.input_size)
    if data is None:
        data = load_data(cfg.data, backbone.spec.size)
    model = build_task_model(backbone, data.num_classes, cfg.method, cfg.train_bn, cfg.seed)
    if cfg.lr_bn == AUTO:
        return _train_choosing_bn_lr(cfg, out, model, backbone, data, resume=resume, progress=progress)
    train_set, val_set = split_for_run(cfg, data)
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs

    run = runs.RunDir(out)
    history: list[dict] = []
    start_epoch = 1
    if resume:
        run.check_config(cfg)
        ckpt = run.latest_checkpoint()
        if ckpt is None:
            raise PbexportError("nothing to resume: no complete checkpoint", str(out))
        state, optim_state, info = run.read_checkpoint(ckpt)
        model.load_task_state(state, str(ckpt))
        optimizer.load_state_dict(optim_state)
        history = info["history"]
        start_epoch = info["epoch"] + 1
    else:
        run.create(cfg, backbone, data, model.head_name)

    environment = training_environment()
    for epoch in range(start_epoch, cfg.epochs + 1):
        record = _train_epoch(model, optimizer, train_set, cfg, epoch, steps_per_epoch, total_steps,
                              progress)
        record.update(_scores(model, val_set, data.test, cfg), environment=environment)
        history.append(record)
        run.write_checkpoint(epoch, model.task_state(), optimizer.state_dict(), history)

    if cfg.average_epochs:
        last = [r["epoch"] for r in history][-cfg.average_epochs:]
        model.load_task_state(average_states([run.read_checkpoint(run.checkpoint_path(e))[0] for e in last]))
        metrics = _final_metrics(history, None, cfg)
        metrics.update(_scores(model, val_set, data.test, cfg), averaged_epochs=last)
    else:
        best = _best_epoch(history)
        if best != history[-1]["epoch"]:
            state, _, _ = run.read_checkpoint(run.checkpoint_path(best))
            model.load_task_state(state)
        metrics = _final_metrics(history, best, cfg)
    run.write_final(model.task_state(), metrics)
    return metrics


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of task states (mask scores, head, BN affine and statistics; every weight for
    finetune), in float64 so that the order does not matter; integer tensors (BN's batch count) from the
    last state. Mask scores are averaged before binarizing: a weight is kept where its mean score is."""
    return {k: torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[-1].items()}


def _scores(model: TaskModel, val_set: ImageSet | None, test: ImageSet, cfg: TrainConfig) -> dict:
    """The kept model's scores, as an epoch's record has them."""
    return {"val_accuracy": evaluate(model, val_set) if val_set is not None else None,
            "test_accuracy": evaluate(model, test),
            "mask_density": masking.mask_density(model.net) if cfg.method == "piggyback" else None}


def candidate_dir(out: str | Path, lr_bn: float) -> Path:
    """Where an ``lr_bn="auto"`` run in ``out`` trains its candidate at BN lr ``lr_bn``."""
    return Path(out) / "candidates" / f"lr-bn-{lr_bn:g}"


def _train_choosing_bn_lr(cfg: TrainConfig, out: Path, model: TaskModel, backbone, data: TaskData, *,
                          resume: bool, progress: bool) -> dict:
    """Train every BN-lr candidate in out/candidates/ and keep the one whose kept epoch scores best on
    validation (validation_score).

    ``out`` is a run like any other (config.json with ``lr_bn: auto``, the chosen model.safetensors,
    metrics.json with the chosen run's history and every candidate's scores), so eval, pack and export
    read it unchanged. Finished candidates are reused and interrupted ones continued on --resume.
    """
    run = runs.RunDir(out)
    if resume:
        run.check_config(cfg)
    else:
        run.create(cfg, backbone, data, model.head_name)
    _, val_set = split_for_run(cfg, data)
    tried = []
    for candidate in cfg.bn_candidates():
        where = candidate_dir(out, candidate.lr_bn)
        metrics = train_or_reuse(candidate, where, progress=progress, data=data)
        state = runs.RunDir(where).final_state()
        model.load_task_state(state, str(where / "model.safetensors"))
        _, val_loss = accuracy_and_loss(model, val_set)
        tried.append({"lr_bn": candidate.lr_bn, "run": where.relative_to(out).as_posix(), "val_accuracy":
                      metrics["val_accuracy"], "val_loss": val_loss, "test_accuracy": metrics["test_accuracy"],
                      "best_epoch": metrics["best_epoch"], "mask_density": metrics["mask_density"],
                      "train_seconds": train_seconds(metrics), "state": state, "metrics": metrics})
    chosen = max(tried, key=validation_score)  # the first candidate on a full tie
    metrics = {**chosen["metrics"], "task": cfg.task, "lr_bn": chosen["lr_bn"],
               "lr_bn_candidates": [{k: v for k, v in t.items() if k not in ("state", "metrics")} for t in tried]}
    run.write_final(chosen["state"], metrics)
    return metrics


def training_environment() -> dict:
    """What an epoch was trained on. A run is bitwise reproducible on one machine and library build only
    (another CPU's kernels round differently: docs/TRAINING.md), so every epoch records this; a run resumed
    elsewhere shows it."""
    return {"torch": torch.__version__, "cpu": _cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine() or "unknown"


def train_seconds(metrics: dict) -> float:
    """Seconds a run spent training: every candidate's for an ``lr_bn="auto"`` run."""
    if "lr_bn_candidates" in metrics:
        return sum(t["train_seconds"] for t in metrics["lr_bn_candidates"])
    return sum(e["seconds"] for e in metrics["epochs"])


def run_settings(out: str | Path) -> dict | None:
    """The settings (TrainConfig.settings) run directory ``out`` was trained with; None if it is no run."""
    try:
        return runs.RunDir(out).config().settings()
    except (PbexportError, TypeError):  # no run there, or not one this pbexport reads
        return None


def train_or_reuse(cfg: TrainConfig, out: str | Path, *, progress: bool = True,
                   data: TaskData | None = None) -> dict:
    """The metrics of run ``out``: reused if it finished with ``cfg``'s settings, continued from its last
    checkpoint (or, for ``lr_bn="auto"``, its candidates) if it was interrupted, trained afresh otherwise.
    A stale run is replaced; a directory that is not a run is left alone (train refuses it if it is not
    empty)."""
    out = Path(out)
    run = runs.RunDir(out)
    stored = run_settings(out)
    same = stored == cfg.settings()
    if same and (out / "metrics.json").exists():
        return run.metrics()
    resume = same and (cfg.lr_bn == AUTO or run.latest_checkpoint() is not None)
    if stored is not None and not resume:
        shutil.rmtree(out)
    return train(cfg, out, resume=resume, progress=progress, data=data)


def _train_epoch(model, optimizer, train_set, cfg, epoch, steps_per_epoch, total_steps, progress) -> dict:
    from tqdm import tqdm

    # every epoch draws its randomness from (seed, epoch) alone: resuming needs no RNG state
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    torch.manual_seed(cfg.seed * 100_003 + epoch)
    model.train()
    step = (epoch - 1) * steps_per_epoch
    seen = correct = 0
    loss_sum = 0.0
    started = time.perf_counter()
    bar = tqdm(batches(train_set, cfg.batch_size, model.spec.size, shuffle=True,
                       augmentation=cfg.augment, generator=generator),
               total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress,
               leave=False, dynamic_ncols=True)
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    for x, y in bar:
        for group in optimizer.param_groups:
            group["lr"] = scheduled_lr(group["name"], group["base_lr"], step, total_steps, warmup_steps)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step < warmup_steps:  # Adam skips a parameter without a gradient: its moments start after warmup
            for group in optimizer.param_groups:
                if group["name"] in DELAYED_GROUPS:
                    for param in group["params"]:
                        param.grad = None
        if cfg.mask_decay:
            _decay_toward_keep(optimizer, cfg.mask_decay)
        optimizer.step()
        step += 1
        seen += len(y)
        correct += int((logits.argmax(1) == y).sum())
        loss_sum += float(loss.detach()) * len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    bar.close()
    seconds = time.perf_counter() - started
    return {"epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
            "seconds": seconds, "images_per_second": seen / seconds}


def _decay_toward_keep(optimizer, decay: float) -> None:
    """Add the gradient of ``decay * sum(relu(SCORE_INIT - score))`` to every mask score.

    A score below its initial value is pulled back up by ``decay``, so a weight is switched off
    only where the loss gradient keeps outweighing the pull: fewer flips, which store
    in fewer bits (docs/TRAINING.md).
    """
    for group in optimizer.param_groups:
        if group["name"] != "mask":
            continue
        for score in group["params"]:
            if score.grad is not None:
                score.grad.sub_((score.detach() < masking.SCORE_INIT).to(score.grad.dtype), alpha=decay)


def _best_epoch(history: list[dict]) -> int:
    """Best validation accuracy (earliest on ties); the last epoch when there is no validation."""
    if history[0]["val_accuracy"] is None:
        return history[-1]["epoch"]
    return max(history, key=lambda r: (r["val_accuracy"], -r["epoch"]))["epoch"]


def _final_metrics(history: list[dict], best: int | None, cfg: TrainConfig) -> dict:
    """The run's metrics with the scores of epoch ``best`` (None: an average of epochs, scored by the caller)."""
    chosen = next((r for r in history if r["epoch"] == best), {})
    return {"task": cfg.task, "method": cfg.method, "train_bn": cfg.train_bn, "best_epoch": best,
            "val_accuracy": chosen.get("val_accuracy"), "test_accuracy": chosen.get("test_accuracy"),
            "mask_density": chosen.get("mask_density"), "epochs": history}
