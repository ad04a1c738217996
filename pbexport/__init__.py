"""pbexport: many task models from one frozen backbone via Piggyback masks, shipped with ONNX Runtime.

This module stays importable without torch: the training API is loaded on first use.
"""

from __future__ import annotations

from .errors import PbexportError

__version__ = "0.1.0"

# name -> submodule; resolved lazily so `import pbexport` on a device never pulls in torch.
_LAZY = {
    "load_backbone": "backbones",
    "list_backbones": "backbones",
    "TrainConfig": "training",
    "train": "training",
    "load_run": "runs",
    "evaluate": "training",
    "load_data": "data",
    "load_bundle": "bundle",
    "pack_runs": "bundle",
    "remove_task": "bundle",
    "open_model": "runtime",  # torch-free: the on-device engine
}

__all__ = ["PbexportError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'pbexport' has no attribute {name!r}")
