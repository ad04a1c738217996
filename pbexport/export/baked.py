"""Baked mode: one standalone graph per task, W * mask folded into the weights, the task's head and BN.

Nothing but the backbone's own graph with some initializer values replaced: it runs in plain
onnxruntime (which fuses Conv + BN at load, exactly as for the plain backbone) and quantizes like any
exported CNN.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx

from .graph import BaseGraph, TaskData, check_task_tensors, finish, metadata, replace_initializer, set_num_classes

MODE = "baked"


def baked_model(base: BaseGraph, task: TaskData) -> onnx.ModelProto:
    check_task_tensors(base, task)
    model = copy.deepcopy(base.model)
    g = model.graph
    for name, mask in task.masks.items():
        replace_initializer(g, name, base.array(name) * base.to_graph_layout(name, mask))
    for name, value in task.tensors.items():
        replace_initializer(g, name, base.to_graph_layout(name, np.asarray(value, np.float32)))
    set_num_classes(model, base, task.num_classes)
    return finish(model, metadata(base, MODE, task))
