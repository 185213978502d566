import pytest
import torch

from ttp_ray.models import (ModelError, PRETRAIN_RECIPE, build_finetune_model, functional_model, load_backbone,
                            load_pretrained_digits, pretrain_backbone, state_dict_hash)

# Stated accuracy of the embedded backbones on held-out digits-0to4 images (recipe in models.py).
MIN_HOLDOUT_ACCURACY = 0.95


@pytest.mark.parametrize("name", ["digits-cnn", "digits-resnet"])
def test_pretrained_backbone_accuracy_and_bit_identical_rebuild(name):
    cached, report = load_pretrained_digits(name)
    assert report["holdout_accuracy"] >= MIN_HOLDOUT_ACCURACY
    assert report["train_accuracy"] >= MIN_HOLDOUT_ACCURACY
    prev = torch.get_num_threads()
    torch.set_num_threads(1 if prev > 1 else 2)  # the rebuild must not depend on the thread count
    try:
        rebuilt, report2 = pretrain_backbone(name, PRETRAIN_RECIPE)
    finally:
        torch.set_num_threads(prev)
    assert state_dict_hash(rebuilt.state_dict()) == state_dict_hash(cached.state_dict())
    assert report2["holdout_accuracy"] == report["holdout_accuracy"]


def test_digits_resnet_uses_torchvision_blocks():
    from torchvision.models.resnet import BasicBlock, ResNet

    net = load_backbone("digits-resnet")
    assert isinstance(net, ResNet)
    assert any(isinstance(m, BasicBlock) for m in net.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_finetune_model_head_is_new_seeded_and_bn_frozen():
    a = build_finetune_model("digits-resnet", 7, head_seed=3)
    b = build_finetune_model("digits-resnet", 7, head_seed=3)
    c = build_finetune_model("digits-resnet", 7, head_seed=4)
    assert a.head.out_features == 7
    assert torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, c.head.weight)
    a.train()
    assert not a.training and all(not m.training for m in a.modules())
    bn = next(m for m in a.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    a(torch.randn(16, 1, 8, 8) * 5)
    assert torch.equal(before, bn.running_mean)


def test_functional_pair_matches_module_and_supports_torch_func():
    model = build_finetune_model("digits-cnn", 5)
    x = torch.randn(6, 1, 8, 8)
    params, apply = functional_model(model, "all")
    assert torch.allclose(apply(params, x), model(x))
    head_params, head_apply = functional_model(model, "head")
    assert set(head_params) == {"head.weight", "head.bias"}
    jac = torch.func.jacrev(lambda p: head_apply(p, x[:1]))(head_params)
    assert jac["head.weight"].shape == (1, 5, 5, 64)
    per_sample = torch.func.vmap(lambda xi: head_apply(head_params, xi[None])[0])(x)
    assert torch.allclose(per_sample, model(x), atol=1e-6)


def test_checkpoint_and_user_factory(tmp_path):
    net = load_backbone("digits-cnn")
    torch.save(net.state_dict(), tmp_path / "ok.pt")
    loaded = load_backbone(f"digits-cnn:{tmp_path / 'ok.pt'}")
    assert state_dict_hash(loaded.state_dict()) == state_dict_hash(net.state_dict())
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ModelError, match="not a state dict"):
        load_backbone(f"digits-cnn:{tmp_path / 'list.pt'}")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="not a loadable weights-only checkpoint"):
        load_backbone(f"digits-cnn:{tmp_path / 'junk.pt'}")
    with pytest.raises(ModelError, match="does not exist"):
        load_backbone(f"digits-cnn:{tmp_path / 'missing.pt'}")
    m = build_finetune_model("tests.helpers:tiny_factory", 4)
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    with pytest.raises(ModelError, match="not an nn.Module"):
        load_backbone("tests.helpers:not_a_module")


def test_imagenet_weights_absent_is_a_clear_error():
    with pytest.raises(ModelError) as info:
        load_backbone("resnet18")
    msg = str(info.value)
    assert "resnet18" in msg and "not found" in msg and "--download" in msg and "\n" not in msg


def test_unknown_model():
    with pytest.raises(ModelError, match="unknown name 'vgg'"):
        load_backbone("vgg")


def test_every_backbone_kind_declares_its_input(tmp_path):
    from ttp_ray.inputs import IMAGENET_MEAN, IMAGENET_STD, InputSpec
    from ttp_ray.models import DIGITS_INPUT, input_spec

    for name in ("digits-cnn", "digits-resnet"):
        spec = input_spec(name)
        assert spec == DIGITS_INPUT and (spec.channels, spec.size, spec.input_range()) == (1, 8, (-1.0, 1.0))
    r = input_spec("resnet18")  # from the weights' transforms, without the weights file
    assert (r.channels, r.size, r.mean, r.std) == (3, 224, IMAGENET_MEAN, IMAGENET_STD)
    net = load_backbone("digits-cnn")
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    plain = input_spec(f"digits-cnn:{tmp_path / 'plain.pt'}")  # unknown but for the first conv's channels
    assert (plain.channels, plain.size, plain.mean) == (1, None, None)
    torch.save({"state_dict": net.state_dict(), "input_spec": {"channels": 1, "size": 16, "mean": 0.5, "std": 0.25}},
               tmp_path / "declared.pt")
    declared = input_spec(f"digits-cnn:{tmp_path / 'declared.pt'}")
    assert declared == InputSpec(channels=1, size=16, mean=(0.5,), std=(0.25,))
    assert input_spec("tests.helpers:tiny_factory").known is False  # no conv, nothing declared: used as is
    assert input_spec("tests.helpers:four_channel_factory").channels == 4
    with pytest.raises(ModelError, match="unknown name 'vgg'"):
        input_spec("vgg")


def test_a_factory_that_initialises_at_random_gives_one_network_in_every_process():
    """tiny_factory never seeds: the sweep's actors and ground-truth tasks each call it in their own process."""
    import subprocess
    import sys

    code = ("import torch; from ttp_ray.models import load_backbone, state_dict_hash; torch.manual_seed({s}); "
            "print(state_dict_hash(load_backbone('tests.helpers:tiny_factory').state_dict()))")
    hashes = [subprocess.run([sys.executable, "-c", code.format(s=s)], capture_output=True, text=True, check=True,
                             timeout=120).stdout.strip() for s in (1, 2)]
    assert hashes[0] and hashes[0] == hashes[1]
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_backbone("tests.helpers:tiny_factory")
    assert torch.equal(torch.rand(3), expected)  # the caller's generator is left as it was
