import torch
from torch import nn

from pbexport import masking
from pbexport.backbones import build_architecture, load_backbone
from pbexport.taskmodel import build_task_model


def test_ste_gradient_is_upstream_gradient_times_weight():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    masking.attach_masks(layer)
    scores = masking.mask_scores(layer)["weight"]
    with torch.no_grad():  # scores on both sides of the threshold
        scores.copy_(torch.rand_like(scores) * 2 * masking.THRESHOLD)
    x = torch.randn(5, 6)
    target = torch.randn(5, 4)
    ((layer(x) - target) ** 2).sum().backward()

    w = layer.parametrizations.weight.original.detach()
    effective = (w * (scores.detach() > masking.THRESHOLD)).requires_grad_(True)
    ((nn.functional.linear(x, effective, layer.bias.detach()) - target) ** 2).sum().backward()
    torch.testing.assert_close(scores.grad, effective.grad * w, rtol=0, atol=0)


def test_all_scores_above_threshold_equals_the_plain_backbone_exactly():
    torch.manual_seed(0)
    plain = build_architecture("cifar_resnet20", 10).eval()
    masked = build_architecture("cifar_resnet20", 10).eval()
    masked.load_state_dict(plain.state_dict())
    names = masking.attach_masks(masked, exclude="linear")
    assert masking.mask_density(masked) == 1.0 and len(names) == 19
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(masked(x), plain(x))


def test_masks_cover_first_depthwise_and_attention_weights_never_biases_or_head():
    mobilenet = build_architecture("mobilenet_v3_small", 10)
    names = masking.maskable_names(mobilenet, exclude="classifier.3")
    assert names[0] == "features.0.0.weight"  # the first conv
    depthwise = [n for n, m in mobilenet.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(f"{n}.weight" in names for n in depthwise)
    assert "classifier.0.weight" in names and "classifier.3.weight" not in names
    assert not any(n.endswith("bias") for n in names)

    vit = build_architecture("vit_b_16", 10, input_size=32)
    vit_names = masking.maskable_names(vit, exclude="heads.head")
    block = "encoder.layers.encoder_layer_0"
    for expected in (f"{block}.self_attention.in_proj_weight", f"{block}.self_attention.out_proj.weight",
                     f"{block}.mlp.0.weight", "conv_proj.weight"):
        assert expected in vit_names
    assert not any("pos_embedding" in n or "class_token" in n or n.startswith("heads.") for n in vit_names)


def test_attention_weights_are_really_masked_in_the_forward_pass():
    torch.manual_seed(0)
    vit = build_architecture("vit_b_16", 10, input_size=32).eval()
    nn.init.normal_(vit.heads.head.weight)  # torchvision zero-inits it: logits would not depend on x
    x = torch.rand(2, 3, 32, 32)
    masking.attach_masks(vit, exclude="heads.head")
    with torch.no_grad():
        before = vit(x)
        masking.mask_scores(vit)["encoder.layers.encoder_layer_0.self_attention.out_proj.weight"].zero_()
        assert not torch.equal(vit(x), before)


def _train_steps(model, steps=3):
    opt = torch.optim.Adam([p for g in model.trainable_groups().values() for p in g], lr=1e-2)
    model.train()
    torch.manual_seed(1)
    for _ in range(steps):
        x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 5, (8,))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_backbone_and_base_logits_bitwise_unchanged_by_piggyback_training():
    backbone = load_backbone("cifar_resnet20")
    before_state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        before_logits = backbone.model(x)
    model = build_task_model(backbone, 5, "piggyback", train_bn=True)
    originals = {n: m.parametrizations.weight.original.clone()
                 for n, m in model.net.named_modules() if hasattr(m, "parametrizations")}
    _train_steps(model)
    assert masking.mask_density(model.net) < 1.0  # training did flip some mask bits
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, before_state[key]), key
    for n, m in model.net.named_modules():
        if n in originals:
            assert torch.equal(m.parametrizations.weight.original, originals[n]), n
    with torch.no_grad():
        assert torch.equal(backbone.model(x), before_logits)


def test_batchnorm_frozen_unless_per_task_bn():
    backbone = load_backbone("cifar_resnet20")
    frozen = build_task_model(backbone, 5, "piggyback", train_bn=False)
    per_task = build_task_model(backbone, 5, "piggyback", train_bn=True)
    ref = backbone.model.bn1.running_mean.clone()
    _train_steps(frozen)
    _train_steps(per_task)
    assert torch.equal(frozen.net.bn1.running_mean, ref)
    assert torch.equal(frozen.net.bn1.weight, backbone.model.bn1.weight)
    assert not torch.equal(per_task.net.bn1.running_mean, ref)
    assert "bn" in per_task.trainable_groups() and "bn" not in frozen.trainable_groups()


def test_init_and_threshold_move_the_masks_only_as_the_mask_lr_does():
    """Under Adam, (init - threshold) and the mask lr are one knob: the STE gradient does not depend on the
    score and Adam's step does not depend on the gradient's scale, so scaling both by k gives the same
    masks at every step (docs/TRAINING.md: why init and threshold were not tuned apart from the lr)."""
    torch.manual_seed(0)
    weight = torch.randn(48, 24)
    drift = torch.randn(48, 24).sign()  # a steady sign per weight, as training gives many, plus noise
    grads = [drift + torch.randn(48, 24) for _ in range(40)]
    history = {}
    for k, lr_k in ((1.0, 1.0), (4.0, 4.0), (0.25, 0.25), ("init only", 1.0)):
        gap = 4.0 if k == "init only" else k
        mask = masking.WeightMask(weight.shape, init=masking.THRESHOLD + gap * (masking.SCORE_INIT - masking.THRESHOLD))
        opt = torch.optim.Adam([mask.scores], lr=lr_k * 3e-4)
        seen = []
        for g in grads:
            opt.zero_grad()
            (mask(weight) * g).sum().backward()
            opt.step()
            seen.append(mask.mask().clone())
        history[k] = torch.stack(seen)
    flipped = (~history[1.0][-1]).float().mean()
    assert 0.05 < flipped < 0.95  # the steps did switch weights off
    for k in (4.0, 0.25):
        assert torch.equal(history[k], history[1.0])
    assert not torch.equal(history["init only"], history[1.0])  # the init alone does change them
