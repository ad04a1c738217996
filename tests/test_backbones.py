import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pbexport import PbexportError
from pbexport.backbones import build_architecture, fingerprint, list_backbones, load_backbone
from pbexport.data import to_model_input
from pbexport.taskmodel import TaskModel


def test_registry_lists_cifar_and_torchvision_models():
    names = list_backbones()
    for name in ("cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56", "resnet18",
                 "resnet50", "vgg16_bn", "densenet121", "mobilenet_v2", "mobilenet_v3_small",
                 "efficientnet_b0", "convnext_tiny", "vit_b_16"):
        assert name in names


@pytest.mark.parametrize("name,params", [("cifar_resnet20", 0.27e6), ("cifar_resnet56", 0.85e6)])
def test_cifar_resnet_sizes_match_the_paper(name, params):
    model = build_architecture(name, 10)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.03


def test_pretrained_resnet20_scores_on_real_cifar10(resnet20_weights, shared_data):
    backbone = load_backbone("cifar_resnet20", resnet20_weights)
    z = np.load(shared_data / "cifar10_test2k.npz")
    model = TaskModel(backbone.model, backbone.spec, "classifier", False, "linear").eval()
    with torch.no_grad():
        logits = model(to_model_input(z["test_images"], 32))
    acc = float((logits.argmax(1).numpy() == z["test_labels"]).mean())
    assert acc >= 0.80, acc


def _state(name="cifar_resnet20"):
    torch.manual_seed(0)
    return build_architecture(name, 10).state_dict()


@pytest.mark.parametrize("fmt", ["pth", "nested_module_th", "safetensors"])
def test_weight_formats_load_to_the_same_fingerprint(tmp_path, fmt):
    state = _state()
    reference = load_backbone("cifar_resnet20", _save(tmp_path, state, "pth")).fingerprint
    path = _save(tmp_path, state, fmt)
    assert load_backbone("cifar_resnet20", path).fingerprint == reference


def _save(tmp_path, state, fmt):
    if fmt == "pth":
        path = tmp_path / "w.pth"
        torch.save(state, path)
    elif fmt == "nested_module_th":
        path = tmp_path / "w.th"
        torch.save({"best_prec1": 91.0, "state_dict": {f"module.{k}": v for k, v in state.items()
                                                       if not k.endswith("num_batches_tracked")}}, path)
    else:
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_fingerprint_changes_with_any_weight():
    model = build_architecture("cifar_resnet20", 10)
    before = fingerprint(model)
    with torch.no_grad():
        model.layer2[1].conv1.weight[0, 0, 0, 0] += 1e-6
    assert fingerprint(model) != before


def test_shape_mismatch_names_the_key(tmp_path):
    state = _state()
    state["layer1.0.conv1.weight"] = torch.zeros(16, 16, 5, 5)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(PbexportError, match=r"layer1\.0\.conv1\.weight has shape \[16, 16, 5, 5\], "
                                             r"expected \[16, 16, 3, 3\]"):
        load_backbone("cifar_resnet20", path)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "r20.pth"
    torch.save(_state("cifar_resnet20"), path)
    with pytest.raises(PbexportError, match="do not fit the backbone: missing"):
        load_backbone("cifar_resnet32", path)


def test_unknown_backbone_and_missing_file(tmp_path):
    with pytest.raises(PbexportError, match="unknown backbone 'resnet19'"):
        load_backbone("resnet19")
    with pytest.raises(PbexportError, match="weights file not found"):
        load_backbone("cifar_resnet20", tmp_path / "nope.pth")


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch pwned-by-pickle",))


# the hand-made pickle uses protocol 4, which torch's weights-only reader warns about before refusing it
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_pickled_code_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"state_dict": {"x": _Evil()}}))
    with pytest.raises(PbexportError, match="cannot read weights"):
        load_backbone("cifar_resnet20", path)
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_garbage_weights_file(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(PbexportError, match=r"w\.safetensors: cannot read weights"):
        load_backbone("cifar_resnet20", path)
