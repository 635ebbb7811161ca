"""The model zoo against RepDistiller's state-dict fixture, the feature interface and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.mobilenetv2 import MobileNetV2 as TVMobileNetV2

from kcd_ray.models import (
    MODELS,
    CheckpointError,
    build_model,
    feature_shapes,
    list_models,
    load_checkpoint,
    load_model,
    save_model,
)
from kcd_ray.models.layers import global_pool
from kcd_ray.registry import Registry

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "cifar_model_state_dicts.json").read_text())
CIFAR = list(FIXTURE)
IMAGENET = ["imagenet_resnet18", "imagenet_resnet34", "imagenet_resnet50", "imagenet_mobilenet_v2"]
# Architectures whose RepDistiller forward has no separate pre-activation features.
NO_PREACT = {"MobileNetV2"}

_CACHE: dict[str, nn.Module] = {}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cached(name: str) -> nn.Module:
    """One 100-class instance per architecture for the shape-only tests (building ResNet50 costs seconds)."""
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = build_model(name, 100)
    return _CACHE[name]


def test_registry_holds_every_architecture():
    assert isinstance(MODELS, Registry)
    assert set(CIFAR) | set(IMAGENET) == set(list_models())
    assert len(CIFAR) == 22


@pytest.mark.parametrize("name", CIFAR)
def test_state_dict_params_and_feature_shapes_match_fixture(name):
    spec = FIXTURE[name]
    model = cached(name)
    assert model.arch == name and model.num_classes == spec["num_classes"] == 100
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert got == spec["state_dict"]  # same keys, same order, same shapes
    assert sum(p.numel() for p in model.parameters()) == spec["num_parameters"]
    want = [tuple(s) for s in spec["feature_shapes_for_32x32_input"]]
    assert feature_shapes(name) == want


@pytest.mark.parametrize("name", CIFAR)
def test_forward_backward_and_preact(name):
    model = cached(name).train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    feats, logits = model(x, is_feat=True)
    assert [tuple(f.shape[1:]) for f in feats] == [tuple(s) for s in FIXTURE[name]["feature_shapes_for_32x32_input"]]
    assert logits.shape == (2, 100)
    assert feats[-1].dim() == 2  # the pooled vector is last
    nn.functional.cross_entropy(logits, torch.tensor([3, 7])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    model.eval()
    with torch.no_grad():
        plain = model(x)
        post, _ = model(x, is_feat=True)
        pre, pre_logits = model(x, is_feat=True, preact=True)
    torch.testing.assert_close(pre_logits, plain)
    assert [f.shape for f in pre] == [f.shape for f in post]
    differs = [not torch.equal(a, b) for a, b in zip(pre, post)]
    if name in NO_PREACT:
        assert not any(differs)
    else:
        assert any(differs) and any((f < 0).any() for f in pre)


@pytest.mark.parametrize("size", [16, 64])
@pytest.mark.parametrize("name", CIFAR)
def test_other_input_sizes(name, size):
    model = cached(name).eval()
    with torch.no_grad():
        feats, logits = model(torch.randn(1, 3, size, size), is_feat=True)
    assert logits.shape == (1, 100) and torch.isfinite(logits).all()
    assert [tuple(f.shape[1:]) for f in feats] == feature_shapes(name, image_size=size)
    assert feats[-1].shape[1] == FIXTURE[name]["feature_shapes_for_32x32_input"][-1][0]


def test_adaptive_pool_equals_fixed_pool_at_32px():
    x = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(global_pool(x), nn.AvgPool2d(8)(x).flatten(1))


@pytest.mark.parametrize("name", CIFAR)
def test_num_classes_10_changes_only_the_classifier(name):
    with torch.device("meta"):
        model = build_model(name, 10)
    assert model.num_classes == 10
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    want = dict((k, s) for k, s in FIXTURE[name]["state_dict"])
    assert list(got) == list(want)
    changed = sorted(k for k in got if got[k] != want[k])
    assert len(changed) == 2 and all(got[k][0] == 10 and want[k][0] == 100 for k in changed)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"])
def test_num_classes_10_forward(name):
    model = build_model(name, 10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_name_and_bad_num_classes():
    with pytest.raises(KeyError, match="resnet8x4"):
        build_model("resnet9", 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet8", 0)


# --------------------------------------------------------------------------- checkpoints


def _trained_like(name: str, num_classes: int = 100) -> nn.Module:
    """A model with non-trivial BN statistics, so a lost buffer would change the output."""
    torch.manual_seed(2)
    model = build_model(name, num_classes)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    return model.eval()


def _outputs(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(3)
    with torch.no_grad():
        return model.eval()(torch.randn(4, 3, 32, 32))


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_2"])
def test_save_load_round_trip(tmp_path, name):
    model = _trained_like(name, 10)
    path = save_model(tmp_path / "ckpt" / "model.pt", model, extra={"epoch": 3, "acc": 71.5})
    assert not [p for p in path.parent.iterdir() if p.name != "model.pt"]  # no temp file left
    for source in (path, path.parent):  # the file, and the directory holding model.pt
        loaded = load_model(source)
        assert loaded.arch == name and loaded.num_classes == 10 and not loaded.training
        torch.testing.assert_close(_outputs(loaded), _outputs(model), rtol=0, atol=0)
    raw = load_checkpoint(path)
    assert raw["format"] == "kcd_ray" and raw["epoch"] == 3 and raw["acc"] == 71.5
    with pytest.raises(CheckpointError, match="resnet14"):
        load_model(path, name="resnet14")
    with pytest.raises(CheckpointError, match="num_classes"):
        load_model(path, num_classes=100)


def test_repdistiller_file_loads_and_infers_num_classes(tmp_path):
    model = _trained_like("resnet8", 100)
    path = tmp_path / "resnet8_cifar100.pth"
    # RepDistiller's train_teacher.py layout, plus a numpy scalar as other scripts store.
    torch.save({"epoch": 240, "model": model.state_dict(), "accuracy": torch.tensor(73.1),
                "best_acc": np.float64(73.2)}, path)
    loaded = load_model(path, name="resnet8")
    assert loaded.num_classes == 100 and loaded.arch == "resnet8"
    torch.testing.assert_close(_outputs(loaded), _outputs(model), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"name=") as e:
        load_model(path)
    assert str(path) in str(e.value)


def test_ddp_prefixed_state_dict_loads(tmp_path):
    model = _trained_like("vgg8", 100)
    path = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    torch.testing.assert_close(_outputs(load_model(path, name="vgg8")), _outputs(model), rtol=0, atol=0)
    # save_model unwraps the wrapper itself, so the file has plain keys and records the arch.
    saved = save_model(tmp_path / "wrapped.pt", nn.DataParallel(model))
    assert not any(k.startswith("module.") for k in load_checkpoint(saved)["model"])
    torch.testing.assert_close(_outputs(load_model(saved)), _outputs(model), rtol=0, atol=0)


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    state = build_model("resnet8", 100).state_dict()
    state["extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "teacher.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as e:
        load_model(path, name="resnet14", num_classes=10)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing keys (36)" in msg and "layer1.1.conv1.weight" in msg and "and 28 more" in msg
    assert "unexpected keys (1): extra_head.weight" in msg
    assert "fc.weight: file (100, 64) vs model (10, 64)" in msg


def test_garbage_and_wrong_layout_name_the_file(tmp_path):
    junk = tmp_path / "junk.pt"
    for garbage in (np.random.default_rng(0).bytes(4096), b"hello world garbage", b""):
        junk.write_bytes(garbage)
        with pytest.raises(CheckpointError, match="junk.pt.*not a readable torch checkpoint"):
            load_model(junk, name="resnet8")
    no_model = tmp_path / "weights.pt"
    torch.save({"state_dict": build_model("resnet8", 10).state_dict()}, no_model)
    with pytest.raises(CheckpointError,
                       match=r"weights.pt.*state_dict.*expected a dict with the state dict under key 'model'"):
        load_model(no_model, name="resnet8")
    with pytest.raises(CheckpointError, match="no model.pt"):
        load_model(tmp_path, name="resnet8")
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")
    pickled = tmp_path / "module.pt"
    torch.save({"model": nn.Linear(2, 2)}, pickled)  # a whole module: needs unsafe unpickling
    with pytest.raises(CheckpointError, match="module.pt"):
        load_model(pickled, name="resnet8")


# --------------------------------------------------------------------------- ImageNet models


@pytest.mark.parametrize("name", ["imagenet_resnet18", "imagenet_resnet50"])
def test_imagenet_resnet_features_match_torchvision(name):
    torch.manual_seed(4)
    model = build_model(name, 10).eval()
    assert model.arch == name and model.num_classes == 10
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, logits = model(x, is_feat=True)
        pre, _ = model(x, is_feat=True, preact=True)
        reference = tv_resnet.ResNet.forward(model, x)  # torchvision's own forward
    torch.testing.assert_close(logits, reference)
    width = 1 if name == "imagenet_resnet18" else 4
    assert [tuple(f.shape[1:]) for f in feats] == [
        (64, 16, 16), (64 * width, 16, 16), (128 * width, 8, 8), (256 * width, 4, 4), (512 * width, 2, 2),
        (512 * width,)
    ]
    assert feature_shapes(name, 10, image_size=64) == [tuple(f.shape[1:]) for f in feats]
    for a, b in zip(pre[1:5], feats[1:5]):
        torch.testing.assert_close(torch.relu(a), b)
        assert (a < 0).any()


def test_imagenet_mobilenet_v2_features_match_torchvision():
    torch.manual_seed(5)
    model = build_model("imagenet_mobilenet_v2", 10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, logits = model(x, is_feat=True)
        reference = TVMobileNetV2.forward(model, x)
    torch.testing.assert_close(logits, reference)
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 32, 32), (24, 16, 16), (32, 8, 8), (96, 4, 4), (320, 2, 2),
                                                   (1280,)]


def test_imagenet_models_take_torchvision_weights_and_224px_shapes():
    import torchvision

    model = build_model("imagenet_resnet18", 10)
    model.load_state_dict(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), strict=True)
    assert feature_shapes("imagenet_resnet34", 1000, image_size=224) == [
        (64, 56, 56), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7), (512,)
    ]
    assert feature_shapes("imagenet_mobilenet_v2", 1000, image_size=224)[-2:] == [(320, 7, 7), (1280,)]
