import contextlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pbexport import PbexportError
from pbexport.backbones import load_backbone
from pbexport.data import ImageSet, split_validation
from pbexport.runs import RunDir, load_run
from pbexport.taskmodel import SCORES_PREFIX, build_task_model
from pbexport.training import TrainConfig, evaluate, make_optimizer, scheduled_lr, train, train_or_reuse

ARCHS = [
    pytest.param("cifar_resnet20", id="cifar_resnet20"),
    pytest.param("resnet18", id="resnet18"),
    pytest.param("mobilenet_v3_small", id="mobilenet_v3_small"),
    pytest.param("efficientnet_b0", id="efficientnet_b0"),
    pytest.param("vgg11_bn", id="vgg11_bn", marks=pytest.mark.slow),
    pytest.param("densenet121", id="densenet121", marks=pytest.mark.slow),
    pytest.param("convnext_tiny", id="convnext_tiny", marks=pytest.mark.slow),
    pytest.param("vit_b_16", id="vit_b_16", marks=pytest.mark.slow),
]


def _cfg(tiny_npz, **kw):
    """One training per run (a fixed BN lr): the per-task BN lr choice (lr_bn auto) has its own tests."""
    base = dict(backbone="cifar_resnet20", data=str(tiny_npz), task="tiny", epochs=1, batch_size=8,
                max_train_samples=8, val_fraction=0.25, input_size=32, lr_bn=1e-2)
    base.update(kw)
    return TrainConfig(**base)


def _counting(step, calls: list):
    def counted(self, *a, **kw):
        calls.append(1)
        return step(self, *a, **kw)
    return counted


@contextlib.contextmanager
def killed_at_step(n: int, monkeypatch):
    """Training inside dies (KeyboardInterrupt) at its n-th optimizer step, as if killed there."""
    real_step, calls = torch.optim.Adam.step, []

    def crashing_step(self, *a, **kw):
        if len(calls) + 1 == n:
            raise KeyboardInterrupt("simulated kill")
        return _counting(real_step, calls)(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        yield
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)


@pytest.mark.parametrize("method", ["piggyback", "classifier", "finetune"])
@pytest.mark.parametrize("arch", ARCHS)
def test_one_step_and_eval_for_every_family(tmp_path, tiny_npz, arch, method):
    metrics = train(_cfg(tiny_npz, backbone=arch, method=method), tmp_path / "run", progress=False)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert (metrics["mask_density"] is not None) == (method == "piggyback")
    run = load_run(tmp_path / "run")
    assert run.model.method == method
    reloaded = evaluate(run.model, __import__("pbexport.data", fromlist=["load_data"]).load_data(
        str(tiny_npz)).test)
    assert reloaded == metrics["test_accuracy"]


def test_run_directory_contents(tmp_path, tiny_npz):
    out = tmp_path / "run"
    metrics = train(_cfg(tiny_npz, epochs=2, max_train_samples=None), out, progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "epoch-0001.json", "epoch-0001.safetensors", "epoch-0002.json", "epoch-0002.safetensors"]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["test_accuracy"] == metrics["test_accuracy"]
    assert [e["epoch"] for e in on_disk["epochs"]] == [1, 2]
    assert all({"val_accuracy", "test_accuracy", "mask_density"} <= set(e) for e in on_disk["epochs"])
    # where each epoch ran: results are bitwise reproducible on one machine and torch build only
    env = on_disk["epochs"][0]["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert env["cpu"] and env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert on_disk["epochs"][1]["environment"] == env
    assert 0.0 < on_disk["mask_density"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["method"] == "piggyback" and config["config"]["train_bn"] is True
    assert config["task"]["num_classes"] == 3
    state = load_file(str(out / "model.safetensors"))
    assert any(k.startswith("scores.") for k in state) and "linear.weight" in state
    assert not any(k.startswith("layer1.0.conv1.weight") for k in state)  # backbone weights are not copied


def test_best_epoch_is_chosen_on_validation(tmp_path, tiny_npz):
    metrics = train(_cfg(tiny_npz, epochs=3, max_train_samples=None), tmp_path / "run", progress=False)
    best = max(metrics["epochs"], key=lambda e: (e["val_accuracy"], -e["epoch"]))
    assert metrics["best_epoch"] == best["epoch"]
    assert metrics["test_accuracy"] == best["test_accuracy"]


def test_resume_after_an_interrupted_epoch_reproduces_the_run(tmp_path, tiny_npz, monkeypatch):
    cfg = _cfg(tiny_npz, epochs=3, max_train_samples=None, method="piggyback", train_bn=True)
    full = train(cfg, tmp_path / "full", progress=False)

    with killed_at_step(10, monkeypatch):  # in the middle of epoch 3 (4 steps per epoch)
        train(cfg, tmp_path / "resumed", progress=False)
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    resumed = train(cfg, tmp_path / "resumed", resume=True, progress=False)

    def strip(m):
        return {**m, "epochs": [{k: v for k, v in e.items() if k not in ("seconds", "images_per_second")}
                                for e in m["epochs"]]}

    assert strip(resumed) == strip(full)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_settings_and_missing_checkpoints(tmp_path, tiny_npz):
    train(_cfg(tiny_npz), tmp_path / "run", progress=False)
    with pytest.raises(PbexportError, match=r"--resume with different settings \(epochs\)"):
        train(_cfg(tiny_npz, epochs=2), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(PbexportError, match="not a pbexport run directory"):
        train(_cfg(tiny_npz), tmp_path / "other", resume=True, progress=False)
    with pytest.raises(PbexportError, match="already exists and is not empty"):
        train(_cfg(tiny_npz), tmp_path / "run", progress=False)


def test_head_lr_default_depends_on_the_method():
    def cfg(**kw):
        return TrainConfig(backbone="cifar_resnet20", data="synthetic:x", task="t", **kw)
    assert cfg().lr_head == 1e-2  # piggyback: the frozen backbone leaves the head and BN to adapt
    assert cfg(method="classifier").lr_head == cfg(method="finetune").lr_head == 1e-3
    assert cfg(lr_head=3e-3).lr_head == 3e-3
    # stored resolved: a run trained before the default changed reads back with the value it used
    assert TrainConfig.from_dict(cfg(method="finetune").to_dict()).lr_head == 1e-3


def test_bn_lr_is_chosen_for_piggyback_and_follows_the_head_lr_otherwise():
    def cfg(**kw):
        return TrainConfig(backbone="cifar_resnet20", data="synthetic:x", task="t", **kw)
    assert cfg().lr_bn == "auto" and [c.lr_bn for c in cfg().bn_candidates()] == [1e-2, 3e-3]
    assert cfg(train_bn=False).lr_bn == 1e-2 and cfg(val_fraction=0.0).lr_bn == 1e-2  # nothing to choose with
    assert cfg(method="classifier", train_bn=True).lr_bn == 1e-3
    assert cfg(method="classifier", train_bn=True, lr_bn="auto").lr_bn == "auto"
    with pytest.raises(PbexportError, match="--lr-bn auto needs per-task BN"):
        cfg(train_bn=False, lr_bn="auto")
    with pytest.raises(PbexportError, match="--lr-bn auto chooses on the validation split"):
        cfg(val_fraction=0.0, lr_bn="auto")
    with pytest.raises(PbexportError, match="--lr-bn must be a number or 'auto', got 'fast'"):
        cfg(lr_bn="fast")
    assert TrainConfig.from_dict(cfg().to_dict()).settings() == cfg().settings()
    # a config stored before lr_bn existed trained BN at its head lr, and reads back so
    old = {k: v for k, v in cfg(lr_head=3e-3).to_dict().items() if k != "lr_bn"}
    assert TrainConfig.from_dict(old).settings() == cfg(lr_head=3e-3, lr_bn=3e-3).settings()
    model = build_task_model(load_backbone("cifar_resnet20", None), 3, "piggyback", True, 0)
    lrs = {g["name"]: g["lr"] for g in make_optimizer(model, cfg(lr_bn=1e-3)).param_groups}
    assert lrs == {"head": 1e-2, "bn": 1e-3, "mask": 3e-4}
    with pytest.raises(PbexportError, match=r"--lr-bn must be positive, got -0.001"):
        cfg(lr_bn=-1e-3)


def test_train_or_reuse_keeps_a_finished_run_while_its_settings_match(tmp_path, tiny_npz, monkeypatch):
    import pbexport.training as training

    run = tmp_path / "run"
    first = train_or_reuse(_cfg(tiny_npz, method="finetune"), run, progress=False)
    calls = []
    monkeypatch.setattr(training, "train", lambda cfg, out, **kw: calls.append(kw) or {"retrained": True})
    # a setting fine-tuning never reads (the mask lr) does not make the run stale; one it reads does
    assert train_or_reuse(_cfg(tiny_npz, method="finetune", lr_mask=1.0), run, progress=False) == first
    assert calls == []
    retrained = train_or_reuse(_cfg(tiny_npz, method="finetune", lr_backbone=1.0), run, progress=False)
    assert retrained == {"retrained": True}
    assert calls == [{"resume": False, "progress": False, "data": None}] and not run.exists()  # stale: replaced
    # a directory that is not a run is never deleted: training refuses it, its files intact
    monkeypatch.undo()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(PbexportError, match="already exists and is not empty"):
        train_or_reuse(_cfg(tiny_npz), other, progress=False)
    assert (other / "keep.txt").read_text() == "mine"


def test_train_or_reuse_continues_an_interrupted_run(tmp_path, tiny_npz, monkeypatch):
    cfg = _cfg(tiny_npz, epochs=2)
    with killed_at_step(2, monkeypatch):  # in epoch 2 (1 step per epoch)
        train_or_reuse(cfg, tmp_path / "run", progress=False)
    steps = []
    monkeypatch.setattr(torch.optim.Adam, "step", _counting(torch.optim.Adam.step, steps))
    metrics = train_or_reuse(cfg, tmp_path / "run", progress=False)
    assert len(steps) == 1 and [e["epoch"] for e in metrics["epochs"]] == [1, 2]  # epoch 1 was not redone


def test_finetune_run_serves_as_backbone_weights(tmp_path, tiny_npz):
    train(_cfg(tiny_npz, method="finetune"), tmp_path / "ft", progress=False)
    backbone = load_backbone("cifar_resnet20", tmp_path / "ft")
    assert backbone.num_classes == 3
    ft = load_run(tmp_path / "ft")
    for key, value in ft.model.net.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[key], value)
    train(_cfg(tiny_npz), tmp_path / "pb", progress=False)
    with pytest.raises(PbexportError, match="only a finetune run can serve as --weights"):
        load_backbone("cifar_resnet20", tmp_path / "pb")


def test_classifier_baseline_trains_only_the_head(tmp_path, tiny_npz):
    train(_cfg(tiny_npz, method="classifier"), tmp_path / "run", progress=False)
    state = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert sorted(state) == ["linear.bias", "linear.weight"]


def test_grayscale_npz_and_resizing(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "gray.npz"
    np.savez(path, train_images=rng.integers(0, 255, (12, 28, 28, 1), dtype=np.uint8),
             train_labels=np.arange(12) % 2, test_images=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
             test_labels=np.arange(4) % 2)
    metrics = train(TrainConfig(backbone="cifar_resnet20", data=str(path), task="g", epochs=1, batch_size=4),
                    tmp_path / "run", progress=False)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0


def test_mask_decay_holds_weights_switched_on(tmp_path, tiny_npz):
    # at lr 3e-3 a score crosses the threshold after two Adam steps; a pull of 1.0 toward keep
    # outweighs any loss gradient here, so every weight must stay on
    free = train(_cfg(tiny_npz, epochs=2, max_train_samples=None, lr_mask=3e-3), tmp_path / "free",
                 progress=False)
    held = train(_cfg(tiny_npz, epochs=2, max_train_samples=None, lr_mask=3e-3, mask_decay=1.0),
                 tmp_path / "held", progress=False)
    assert free["mask_density"] < 0.99
    assert held["mask_density"] == 1.0
    with pytest.raises(PbexportError, match="--mask-decay must be at least 0"):
        _cfg(tiny_npz, mask_decay=-1e-5)


def test_mask_eps_slows_only_the_mask_scores(tmp_path, tiny_npz):
    # Adam moves a score by about lr * g / (rms(g) + eps): an eps far above any score gradient here (1.0)
    # leaves every score where it started, where Adam's default lets them cross the threshold
    free = train(_cfg(tiny_npz, epochs=2, max_train_samples=None, lr_mask=3e-3), tmp_path / "free", progress=False)
    held = train(_cfg(tiny_npz, epochs=2, max_train_samples=None, lr_mask=3e-3, mask_eps=1.0), tmp_path / "held",
                 progress=False)
    assert free["mask_density"] < 0.99
    assert held["mask_density"] == 1.0
    cfg = _cfg(tiny_npz, mask_eps=1e-5)
    model = build_task_model(load_backbone("cifar_resnet20", None, 32), 2, "piggyback", True, 0)
    eps = {g["name"]: g["eps"] for g in make_optimizer(model, cfg).param_groups}
    assert eps == {"head": 1e-8, "mask": 1e-5, "bn": 1e-8}  # the head and BN keep Adam's default
    for bad in (0.0, -1e-5):
        with pytest.raises(PbexportError, match=f"--mask-eps must be positive, got {bad}"):
            _cfg(tiny_npz, mask_eps=bad)
    # a config stored before --mask-eps existed trained at Adam's default, and reads back so (not stale)
    old = {k: v for k, v in _cfg(tiny_npz).to_dict().items() if k != "mask_eps"}
    assert TrainConfig.from_dict(old).settings() == _cfg(tiny_npz).settings()
    for method in ("classifier", "finetune"):  # no mask scores: the setting shapes nothing there
        assert "mask_eps" not in _cfg(tiny_npz, method=method).settings()


def _state(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


def test_auto_bn_lr_keeps_the_candidate_that_scores_best_on_validation(tmp_path, tiny_npz, monkeypatch):
    import torch.nn.functional as F

    import pbexport.training as training
    from pbexport.data import load_data

    # a BN lr of 10 wrecks the per-task BN: listed first, it must still lose on validation
    monkeypatch.setattr(training, "AUTO_LR_BN", (10.0, 1e-2))
    cfg = _cfg(tiny_npz, lr_bn="auto", epochs=2, max_train_samples=None)
    out = tmp_path / "run"
    metrics = train(cfg, out, progress=False)
    _, val = training.split_for_run(cfg, load_data(str(tiny_npz)))
    scores = {}
    for lr in (10.0, 1e-2):
        where = training.candidate_dir(out, lr)
        assert json.loads((where / "config.json").read_text())["config"]["lr_bn"] == lr
        run = load_run(where)
        logits = training.predict_logits(run.model, val)
        scores[lr] = (run.metrics["val_accuracy"], -float(F.cross_entropy(logits, torch.as_tensor(val.labels))))
    assert scores[1e-2] > scores[10.0] and metrics["lr_bn"] == 1e-2
    chosen = training.candidate_dir(out, 1e-2)
    assert metrics["test_accuracy"] == load_run(chosen).metrics["test_accuracy"]
    a, b = _state(out), _state(chosen)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the run directory reads like any other, with lr_bn auto in its config and both trainings' time
    reloaded = load_run(out)
    assert reloaded.info["config"]["lr_bn"] == "auto"
    assert evaluate(reloaded.model, load_data(str(tiny_npz)).test) == metrics["test_accuracy"]
    assert training.train_seconds(metrics) == pytest.approx(
        sum(training.train_seconds(load_run(training.candidate_dir(out, lr)).metrics) for lr in (10.0, 1e-2)))


def test_an_interrupted_auto_run_continues_without_redoing_a_finished_candidate(tmp_path, tiny_npz, monkeypatch):
    cfg = _cfg(tiny_npz, lr_bn="auto", epochs=2)
    with killed_at_step(3, monkeypatch):  # in the second candidate's first epoch (1 step per epoch)
        train_or_reuse(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "candidates" / "lr-bn-0.01" / "metrics.json").exists()
    assert not (tmp_path / "run" / "metrics.json").exists()
    steps = []
    monkeypatch.setattr(torch.optim.Adam, "step", _counting(torch.optim.Adam.step, steps))
    metrics = train_or_reuse(cfg, tmp_path / "run", progress=False)
    assert len(steps) == 2 and [t["lr_bn"] for t in metrics["lr_bn_candidates"]] == [1e-2, 3e-3]
    fresh = train(cfg, tmp_path / "fresh", progress=False)
    assert {k: v for k, v in metrics.items() if k != "epochs" and k != "lr_bn_candidates"} == \
        {k: v for k, v in fresh.items() if k != "epochs" and k != "lr_bn_candidates"}


def test_validation_split_random_or_contiguous():
    labels = np.repeat([0, 1], [40, 20])
    train_set = ImageSet(np.arange(60, dtype=np.uint8).reshape(60, 1, 1, 1), labels)
    for how in ("random", "contiguous"):
        keep, val = split_validation(train_set, 0.25, seed=3, how=how)
        assert np.bincount(val.labels).tolist() == [10, 5]  # stratified: a quarter of each class
        assert sorted(keep.images.ravel().tolist() + val.images.ravel().tolist()) == list(range(60))
        again = split_validation(train_set, 0.25, seed=3, how=how)[1]
        assert np.array_equal(again.images, val.images)  # seeded
    # contiguous: each class holds out one run of consecutive images, at a seeded offset
    runs = [split_validation(train_set, 0.25, seed=s, how="contiguous")[1].images.ravel() for s in range(6)]
    for ids in runs:
        for part in (ids[ids < 40], ids[ids >= 40]):
            assert np.array_equal(np.diff(part.astype(int)), np.ones(len(part) - 1))
    assert len({r.tobytes() for r in runs}) > 1
    random_ids = split_validation(train_set, 0.25, seed=3)[1].images.ravel().astype(int)
    assert not np.array_equal(np.diff(random_ids[random_ids < 40]), np.ones(9))
    with pytest.raises(PbexportError, match="unknown validation split 'blocks'; choose from random, contiguous"):
        split_validation(train_set, 0.25, seed=3, how="blocks")
    with pytest.raises(PbexportError, match="unknown validation split 'blocks'"):
        TrainConfig(backbone="cifar_resnet20", data="synthetic:x", task="t", val_split="blocks")
    # a config stored before --val-split existed had the random split, and reads back so
    old = {k: v for k, v in TrainConfig(backbone="cifar_resnet20", data="synthetic:x", task="t").to_dict().items()
           if k != "val_split"}
    assert TrainConfig.from_dict(old).val_split == "random"


def _without_timings(history):
    return [{k: v for k, v in e.items() if k not in ("seconds", "images_per_second")} for e in history]


@pytest.mark.parametrize("method", ["piggyback", "finetune"])
def test_average_epochs_keeps_the_mean_of_the_last_epochs(tmp_path, tiny_npz, method):
    cfg = _cfg(tiny_npz, epochs=3, max_train_samples=None, method=method)
    best = train(cfg, tmp_path / "best", progress=False)
    averaged = train(_cfg(tiny_npz, epochs=3, max_train_samples=None, method=method, average_epochs=2),
                     tmp_path / "avg", progress=False)
    # the same training; only what is kept differs
    assert _without_timings(averaged["epochs"]) == _without_timings(best["epochs"])
    assert averaged["averaged_epochs"] == [2, 3] and averaged["best_epoch"] is None
    ckpts = [{k.removeprefix("model."): v for k, v in load_file(str(tmp_path / "avg" / "checkpoints" /
                                                                     f"epoch-000{e}.safetensors")).items()
              if k.startswith("model.")} for e in (2, 3)]
    kept = load_file(str(tmp_path / "avg" / "model.safetensors"))
    assert kept.keys() == ckpts[1].keys()
    for k, v in kept.items():
        a, b = ckpts[0][k], ckpts[1][k]
        expected = ((a.double() + b.double()) / 2).to(v.dtype) if v.is_floating_point() else b
        assert torch.equal(v, expected), k
    assert any(not torch.equal(ckpts[0][k], ckpts[1][k]) for k in kept)  # a real average, not a copy
    # the metrics score the kept (averaged) model
    run = load_run(tmp_path / "avg")
    data = __import__("pbexport.data", fromlist=["load_data"]).load_data(str(tiny_npz))
    assert evaluate(run.model, data.test) == averaged["test_accuracy"]
    if method == "piggyback":
        from pbexport import masking
        assert averaged["mask_density"] == masking.mask_density(run.model.net)
    # N = 1 keeps the last epoch
    last = train(_cfg(tiny_npz, epochs=3, max_train_samples=None, method=method, average_epochs=1),
                 tmp_path / "last", progress=False)
    assert last["test_accuracy"] == best["epochs"][-1]["test_accuracy"]


def test_average_epochs_applies_to_each_bn_lr_candidate(tmp_path, tiny_npz):
    cfg = _cfg(tiny_npz, epochs=2, max_train_samples=None, lr_bn="auto", average_epochs=2)
    metrics = train(cfg, tmp_path / "run", progress=False)
    for t in metrics["lr_bn_candidates"]:
        candidate = json.loads((tmp_path / "run" / t["run"] / "metrics.json").read_text())
        assert candidate["averaged_epochs"] == [1, 2] and candidate["test_accuracy"] == t["test_accuracy"]
    assert metrics["averaged_epochs"] == [1, 2]


def test_average_epochs_bounds_and_old_configs():
    def cfg(**kw):
        return TrainConfig(backbone="cifar_resnet20", data="synthetic:x", task="t", epochs=4, **kw)
    for bad in (0, 5, -1):
        with pytest.raises(PbexportError, match=f"--average-epochs must be between 1 and --epochs \\(4\\), got {bad}"):
            cfg(average_epochs=bad)
    assert cfg(average_epochs=4).average_epochs == 4
    # a config stored before --average-epochs existed kept the best epoch, and reads back so (not stale)
    old = {k: v for k, v in cfg().to_dict().items() if k != "average_epochs"}
    assert TrainConfig.from_dict(old).settings() == cfg().settings()


def test_scheduled_lr_holds_the_backbone_side_during_warmup():
    total, warmup = 100, 20
    for group in ("head", "bn"):  # a plain cosine over the whole run
        assert [scheduled_lr(group, 1e-2, s, total, warmup) for s in (0, 50, 100)] == [1e-2, 0.5e-2, 0.0]
    for group in ("mask", "backbone"):  # still until the warmup ends, then its own cosine over the rest
        assert scheduled_lr(group, 1e-3, 0, total, warmup) == scheduled_lr(group, 1e-3, 19, total, warmup) == 0.0
        assert scheduled_lr(group, 1e-3, 20, total, warmup) == 1e-3
        assert scheduled_lr(group, 1e-3, 60, total, warmup) == pytest.approx(0.5e-3)
        assert scheduled_lr(group, 1e-3, 100, total, warmup) == 0.0
    assert scheduled_lr("mask", 1e-3, 0, total, 0) == 1e-3  # no warmup: the plain cosine


@pytest.mark.parametrize("method", ["piggyback", "finetune"])
def test_warmup_trains_only_the_head_and_bn_for_its_epochs(tmp_path, tiny_npz, method):
    metrics = train(_cfg(tiny_npz, epochs=2, max_train_samples=None, method=method, warmup_epochs=1),
                    tmp_path / "run", progress=False)
    run = RunDir(tmp_path / "run")
    checkpoints = [run.read_checkpoint(run.checkpoint_path(e)) for e in (1, 2)]
    after = [state for state, _, _ in checkpoints]
    model = build_task_model(load_backbone("cifar_resnet20", None, 32), 3, method, method == "piggyback", 0)
    # Adam keeps no moments for the waiting parameters: they start fresh after the warmup
    groups = model.trainable_groups()
    waiting = sum(len(ps) for name, ps in groups.items() if name in ("mask", "backbone"))
    assert waiting and len(checkpoints[0][1]["state"]) == sum(len(ps) for ps in groups.values()) - waiting
    assert len(checkpoints[1][1]["state"]) == sum(len(ps) for ps in groups.values())
    start = model.task_state()  # what train starts from: the same seeded backbone and head

    def changed(names, state):
        return [k for k in names if not torch.equal(state[k], start[k])]
    head = [k for k in start if k.startswith(model.head_name + ".")]
    held = [k for k in start if k.startswith(SCORES_PREFIX) or (method == "finetune" and k.endswith("conv1.weight"))]
    assert head and held
    assert changed(head, after[0]) == head  # the head trains from the start
    assert changed(held, after[0]) == []  # the backbone side waits for the warmup epoch
    assert changed(held, after[1])  # and trains after it
    if method == "piggyback":
        assert metrics["epochs"][0]["mask_density"] == 1.0
        assert changed([k for k in start if k.endswith("bn1.weight")], after[0])  # per-task BN trains in warmup


def test_warmup_bounds_and_old_configs():
    def cfg(**kw):
        return TrainConfig(backbone="cifar_resnet20", data="synthetic:x", task="t", epochs=4, **kw)
    for bad in (-1, 4, 5):
        with pytest.raises(PbexportError, match=f"--warmup-epochs must be at least 0 and below --epochs \\(4\\), "
                                                f"got {bad}"):
            cfg(warmup_epochs=bad)
    assert cfg(warmup_epochs=3).warmup_epochs == 3
    # a config stored before --warmup-epochs existed trained without one, and reads back so (not stale)
    old = {k: v for k, v in cfg().to_dict().items() if k != "warmup_epochs"}
    assert TrainConfig.from_dict(old).settings() == cfg().settings()
    # the classifier never trains the backbone side: a warmup does not change what it trains
    classifier = TrainConfig(backbone="cifar_resnet20", data="synthetic:x", task="t", method="classifier")
    assert "warmup_epochs" not in classifier.settings()
