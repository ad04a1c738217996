import pytest
from conftest import import_tool

from pbexport.backbones import load_backbone
from pbexport.taskmodel import build_task_model
from pbexport.training import TrainConfig, make_optimizer


@pytest.mark.parametrize("variant", import_tool("bench_train").VARIANTS)
def test_every_timed_method_takes_a_training_step(variant):
    # the default recipe chooses its BN lr ("auto"): the step is timed at a candidate's BN lr
    step = import_tool("bench_train")._step_fn(load_backbone("cifar_resnet20", None, 32), *variant, batch_size=2)
    step()


def test_the_optimizer_needs_a_bn_lr_not_auto():
    cfg = TrainConfig(backbone="cifar_resnet20", data="-", task="t")
    assert cfg.lr_bn == "auto"
    model = build_task_model(load_backbone("cifar_resnet20", None, 32), 2, "piggyback", True, 0)
    with pytest.raises(ValueError, match="bn_candidates"):
        make_optimizer(model, cfg)
    groups = make_optimizer(model, cfg.bn_candidates()[1]).param_groups
    assert {g["name"]: g["lr"] for g in groups}["bn"] == 3e-3
    assert all(isinstance(g["lr"], float) for g in groups)
