"""The run directory: what `pbexport train` writes and `eval`, `pack` and `--resume` read.

    RUN_DIR/config.json                  training config, backbone identity, classes (written first)
    RUN_DIR/checkpoints/epoch-NNNN.safetensors   task state + Adam moments after epoch NNNN
    RUN_DIR/checkpoints/epoch-NNNN.json          history so far; written last, marks the epoch complete
    RUN_DIR/model.safetensors            task state of the selected (best validation) epoch
    RUN_DIR/metrics.json                 per-epoch and final metrics (written last)
    RUN_DIR/candidates/lr-bn-LR/         with --lr-bn auto: one run per per-task BN lr; RUN_DIR holds
                                         the chosen one's model and metrics (and no checkpoints of its own)

Only safetensors and JSON: nothing here is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .backbones import Backbone, InputSpec, load_backbone
from .errors import PbexportError
from .fileio import atomic_write, atomic_write_json

RUN_FORMAT = "pbexport-run"
RUN_FORMAT_VERSION = 1


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise PbexportError(f"cannot read checkpoint ({str(exc).splitlines()[0][:200]})", str(path)) from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PbexportError("file not found", str(path)) from None
    except (OSError, ValueError) as exc:
        raise PbexportError(f"cannot read JSON ({exc})", str(path)) from None


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ------------------------------------------------------------ creation and config
    def create(self, cfg, backbone: Backbone, data, head_name: str) -> None:
        if self.path.exists() and any(self.path.iterdir()):
            raise PbexportError("run directory already exists and is not empty (use --resume to "
                                "continue it, or choose another --out)", str(self.path))
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / "config.json", {
            "format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, "pbexport_version": __version__,
            "config": cfg.to_dict(),
            "backbone": {"name": backbone.name, "fingerprint": backbone.fingerprint,
                         "input_spec": backbone.spec.to_dict(), "weights": backbone.weights},
            "task": {"name": cfg.task, "num_classes": data.num_classes,
                     "class_names": list(data.class_names), "head_name": head_name},
            "data": data.source,
        })

    def info(self) -> dict:
        path = self.path / "config.json"
        if not path.exists():
            raise PbexportError("not a pbexport run directory (no config.json)", str(self.path))
        info = _read_json(path)
        if info.get("format") != RUN_FORMAT:
            raise PbexportError("not a pbexport run config", str(path))
        if info.get("format_version") != RUN_FORMAT_VERSION:
            raise PbexportError(f"run format version {info.get('format_version')} is not supported "
                                f"(this pbexport reads version {RUN_FORMAT_VERSION})", str(path))
        return info

    def config(self):
        from .training import TrainConfig

        return TrainConfig.from_dict(self.info()["config"])

    def check_config(self, cfg) -> None:
        stored = self.config().settings()  # settings added since the run was made read as their defaults
        differ = [k for k, v in cfg.settings().items() if stored.get(k) != v]
        if differ:
            raise PbexportError(f"--resume with different settings ({', '.join(differ)}); the run "
                                "was trained with its config.json", str(self.path))

    # ------------------------------------------------------------ checkpoints
    def checkpoint_path(self, epoch: int) -> Path:
        return self.path / "checkpoints" / f"epoch-{epoch:04d}.safetensors"

    def latest_checkpoint(self) -> Path | None:
        """The newest epoch whose JSON marker exists (a checkpoint written after its tensors)."""
        done = sorted((self.path / "checkpoints").glob("epoch-*.json"))
        for marker in reversed(done):
            tensors = marker.with_suffix(".safetensors")
            if tensors.exists():
                return tensors
        return None

    def write_checkpoint(self, epoch: int, state: dict, optim_state: dict, history: list[dict]) -> None:
        tensors = {f"model.{k}": v for k, v in state.items()}
        for pid, slots in optim_state["state"].items():
            for key, value in slots.items():
                tensors[f"optim.{pid}.{key}"] = torch.as_tensor(value).contiguous()
        path = self.checkpoint_path(epoch)
        _save_tensors(path, tensors)
        groups = [{k: v for k, v in g.items()} for g in optim_state["param_groups"]]
        atomic_write_json(path.with_suffix(".json"), {"epoch": epoch, "history": history,
                                                      "param_groups": groups})

    def read_checkpoint(self, path: Path) -> tuple[dict, dict, dict]:
        """(task state, optimizer state dict, info) of one checkpoint."""
        tensors = _load_tensors(path)
        info = _read_json(path.with_suffix(".json"))
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        optim: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, pid, slot = key.split(".", 2)
                optim.setdefault(int(pid), {})[slot] = value
        return state, {"state": optim, "param_groups": info["param_groups"]}, info

    # ------------------------------------------------------------ final artefacts
    def write_final(self, state: dict, metrics: dict) -> None:
        _save_tensors(self.path / "model.safetensors", state)
        atomic_write_json(self.path / "metrics.json", metrics)

    def final_state(self) -> dict[str, torch.Tensor]:
        path = self.path / "model.safetensors"
        if not path.exists():
            raise PbexportError("run has not finished (no model.safetensors); continue it with "
                                "`pbexport train ... --resume`", str(self.path))
        return _load_tensors(path)

    def metrics(self) -> dict:
        return _read_json(self.path / "metrics.json")


@dataclass
class TrainedRun:
    path: Path
    info: dict
    backbone: Backbone
    model: object  # TaskModel, in eval mode
    metrics: dict

    @property
    def task(self) -> str:
        return self.info["task"]["name"]

    @property
    def class_names(self) -> list[str]:
        return self.info["task"]["class_names"]


def load_run(path: str | Path, weights: str | Path | None = None) -> TrainedRun:
    """Rebuild a finished run's task model (backbone weights checked against their fingerprint).

    ``weights`` overrides where the backbone weights are read from (when they moved).
    """
    from .taskmodel import build_task_model

    run = RunDir(path)
    info = run.info()
    cfg = run.config()
    bb_info = info["backbone"]
    state = run.final_state()
    if cfg.method == "finetune":  # the run holds the whole network: the original weights are not needed
        backbone = load_backbone(bb_info["name"], None, cfg.input_size)
    else:
        source = weights if weights is not None else bb_info["weights"]
        backbone = load_backbone(bb_info["name"], source, cfg.input_size)
        if backbone.fingerprint != bb_info["fingerprint"]:
            raise PbexportError(f"backbone weights {source} do not match the ones this run was trained "
                                f"on (fingerprint {backbone.fingerprint[:12]} != {bb_info['fingerprint'][:12]})",
                                str(run.path))
    model = build_task_model(backbone, info["task"]["num_classes"], cfg.method, cfg.train_bn, cfg.seed)
    model.load_task_state(state, str(run.path / "model.safetensors"))
    model.eval()
    metrics = run.metrics() if (run.path / "metrics.json").exists() else {}
    return TrainedRun(run.path, info, backbone, model, metrics)


def read_finetune_weights(path: Path, backbone_name: str) -> tuple[dict[str, torch.Tensor], InputSpec]:
    """A finetune run's whole network as backbone weights (how the demo gets its backbone)."""
    run = RunDir(path)
    info = run.info()
    if info["config"]["method"] != "finetune":
        raise PbexportError(f"only a finetune run can serve as --weights (this run is "
                            f"{info['config']['method']})", str(path))
    if info["backbone"]["name"] != backbone_name:
        raise PbexportError(f"run was trained on backbone {info['backbone']['name']!r}, not "
                            f"{backbone_name!r}", str(path))
    return run.final_state(), InputSpec.from_dict(info["backbone"]["input_spec"])
