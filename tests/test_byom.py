"""Bring your own model: torchvision classification models by name, a user's factory, weights from plain state dicts,
feature taps through FX, and the engine (no Ray) distilling them: KD, a feature method with taps, KCD, resume."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from engine_harness import config, feeds, make_engine, prepare_tiny
from kcd_ray.cache.store import CacheSpec, teacher_cache_key
from kcd_ray.cli import main as cli_main
from kcd_ray.config import ConfigError, load_config
from kcd_ray.engine import Hook
from kcd_ray.engine.build import build_student, check_models
from kcd_ray.models import CheckpointError, ModelSourceError, build_model, feature_shapes, load_model, save_model
from kcd_ray.models.taps import TapError, tap_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MBV3, REGNET = "torchvision/mobilenet_v3_small", "torchvision/regnet_x_400mf"
VIT = "byom_pkg.models:tiny_vit"


def _x(n=2, size=16, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- sources and taps


@pytest.mark.parametrize("name,maps,pooled", [
    (MBV3, [(16, 8, 8), (16, 4, 4), (24, 2, 2), (48, 1, 1), (96, 1, 1)], 1024),
    (REGNET, [(32, 8, 8), (32, 4, 4), (64, 2, 2), (160, 1, 1), (400, 1, 1)], 400),
])
def test_torchvision_models_by_name_give_taps_and_their_own_logits(name, maps, pooled):
    torch.manual_seed(0)
    model = build_model(name, 7).eval()
    assert (model.arch, model.num_classes) == (name, 7)
    with torch.no_grad():
        feats, logits = model(_x(), is_feat=True)
        plain = model(_x())
    assert [tuple(f.shape[1:]) for f in feats] == maps + [(pooled,)]
    torch.testing.assert_close(logits, plain, rtol=0, atol=0)  # the taps' graph computes the model's own logits
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    torch.testing.assert_close(last(feats[-1]), logits)  # feats[-1] is the classifier's input
    assert feature_shapes(name, 7, 16) == [tuple(f.shape[1:]) for f in feats]  # on the meta device


def test_a_vit_from_a_user_factory_taps_token_maps_and_its_class_token():
    model = build_model(VIT, 5, kwargs={"image_size": 16, "patch_size": 4}).eval()
    with torch.no_grad():
        feats, logits = model(_x(), is_feat=True)
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 4, 4)] * 5 + [(16,)]  # conv_proj + 4 encoder blocks, cls
    assert logits.shape == (2, 5) and model.model_kwargs == {"image_size": 16, "patch_size": 4}
    plan = tap_plan(*model._kcd_tap_key, False)
    assert plan.maps[0] == "conv_proj" and plan.layouts[1:] == ("tokens",) * 4
    # a token map is the encoder block's patch tokens (the class token dropped), laid out on the patch grid
    with torch.no_grad():
        tokens = model.encoder.layers.encoder_layer_0(model.encoder.dropout(
            torch.cat([model.class_token.expand(2, -1, -1), model._process_input(_x())], 1)
            + model.encoder.pos_embedding))
    torch.testing.assert_close(feats[1][:, :, 1, 2], tokens[:, 1 + 1 * 4 + 2], rtol=1e-5, atol=1e-6)


def test_a_user_cnn_and_own_taps_and_the_meta_device():
    model = build_model("byom_pkg.models:small_cnn", 3, kwargs={"width": 4})
    feats, _ = model.eval()(_x(), is_feat=True)
    assert [tuple(f.shape[1:]) for f in feats] == [(4, 16, 16), (8, 8, 8), (16, 4, 4), (32, 2, 2), (32,)]
    own = build_model("byom_pkg.models:small_cnn", 3, kwargs={"width": 4}, taps=["stages.0.1", "stages.2"])
    feats, _ = own.eval()(_x(), is_feat=True)
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 8, 8), (32, 2, 2), (32,)]
    with torch.device("meta"):  # the ledger and feature_shapes build on meta: taps run there too
        meta = build_model(MBV3, 4)
    feats, logits = meta.train()(torch.zeros(2, 3, 32, 32, device="meta"), is_feat=True)
    assert logits.device.type == "meta" and feats[0].shape == (2, 16, 16, 16)


def test_taps_follow_channels_last_and_train_mode_and_the_plain_path_is_untouched():
    torch.manual_seed(1)
    model = build_model(REGNET, 4).train()
    assert type(model).__name__ == "RegNet"  # the model keeps its class: only an instance-level forward is added
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = _x(4).to(memory_format=torch.channels_last)
    feats, logits = cl(x, is_feat=True)
    torch.testing.assert_close(logits, cl(x), rtol=0, atol=0)  # the same train-mode computation as its own forward
    assert feats[1].is_contiguous(memory_format=torch.channels_last)
    (logits.sum() + sum(f.sum() for f in feats)).backward()
    assert all(p.grad is not None for p in cl.parameters())


def test_pre_activation_taps_for_resnet_and_a_one_line_refusal_elsewhere():
    res = build_model("torchvision/resnet18", 4).eval()
    with torch.no_grad():
        post, _ = res(_x(size=32), is_feat=True)
        pre, _ = res(_x(size=32), is_feat=True, preact=True)
    assert (pre[2] < 0).any() and not (post[2] < 0).any()  # the residual sum before the stage's last ReLU
    torch.testing.assert_close(torch.relu(pre[2]), post[2])
    cnn = build_model("byom_pkg.models:small_cnn", 3)
    with pytest.raises(TapError, match=r"small_cnn: pre-activation taps .* generic family; name pre-activation nodes "
                                       r"in distill.student_taps / distill.teacher_taps$"):
        cnn(_x(), is_feat=True, preact=True)


def test_one_line_errors_name_the_source():
    with pytest.raises(ConfigError, match=r"^model: 'torchvision/convnext_tinyy' is not one of: .*torchvision/<name>"):
        load_config(None, ["model=torchvision/convnext_tinyy"])
    assert load_config(None, ["model=torchvision/convnext_tiny", "distill.teacher_model=pkg.mod:fn"]).model
    cases = [("byom_pkg.broken:build", r"cannot import byom_pkg.broken \(ModuleNotFoundError: No module named "
                                       r"'kcd_ray_no_such_dependency'\); the module must be importable on every node"),
             ("byom_pkg.models:nothing_here", "has no attribute 'nothing_here'"),
             ("byom_pkg.models:not_a_module", r"returned a dict, expected a torch.nn.Module"),
             (MBV3 + "x", "no such torchvision classification model")]
    for name, msg in cases:
        with pytest.raises(ModelSourceError, match=msg) as e:
            build_model(name, 3)
        assert "\n" not in str(e.value)
    with pytest.raises(ModelSourceError, match="weights"):
        build_model(MBV3, 3, kwargs={"weights": "IMAGENET1K_V1"})
    with pytest.raises(ModelSourceError, match="zoo model takes no constructor arguments"):
        build_model("resnet8", 3, kwargs={"width": 2})
    with pytest.raises(TapError, match=r"node: 'stages.9' is not present in model.*kcd-ray models --nodes"):
        build_model("byom_pkg.models:small_cnn", 3, taps=["stages.9"])
    with pytest.raises(TapError, match=r"tap 'head' gives shape \(2, 3\).*only the last tap may be"):
        build_model("byom_pkg.models:small_cnn", 3, taps=["head", "stages.1"])


def test_the_preflight_checks_a_factory_and_the_input_size_in_one_line():
    meta = {"num_classes": 4, "image_shape": [16, 16, 3]}
    cfg = load_config(None, ["model=byom_pkg.broken:build"])
    with pytest.raises(ConfigError, match=r"^model: byom_pkg.broken:build: cannot import byom_pkg.broken"):
        check_models(cfg, "teacher", meta)
    cfg = load_config(None, [f"model={VIT}", "model_kwargs={image_size: 32, patch_size: 4}"])
    with pytest.raises(ConfigError, match=r"^model: byom_pkg.models:tiny_vit does not run on \(3, 16, 16\) images "
                                          r"\(AssertionError: Wrong image height! Expected 32 but got 16!\)"):
        check_models(cfg, "teacher", meta)
    with pytest.raises(ConfigError, match=r"^distill.student_taps: resnet8: a zoo model has its own feature taps"):
        build_student(load_config(None, ["model=resnet8", "distill.student_taps=[layer1]"]), 4)
    cfg = load_config(None, ["model=byom_pkg.models:small_cnn", "distill.method=ab", "distill.teacher=t.pt"])
    with pytest.raises(ConfigError, match=r"^distill.student_taps: byom_pkg.models:small_cnn: pre-activation taps"):
        check_models(cfg, "distill", meta)


_DDP_SCRIPT = r"""
import sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from test_byom import ddp_case
rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
d, batch = ddp_case()
ddp = DDP(d)
sum(ddp({k: v[rank * 4:(rank + 1) * 4] for k, v in batch.items()}, 4.0, 0).losses.values()).backward()
torch.save({n: p.grad for n, p in d.student.named_parameters()}, out)
dist.barrier()
del ddp
dist.destroy_process_group()
"""


def ddp_case():
    """AT between a torchvision student and a factory teacher, both tapped, and a batch of 8 (eval mode)."""
    from kcd_ray.config import DistillConfig
    from kcd_ray.distill import build_distiller

    torch.manual_seed(0)
    student, teacher = build_model(MBV3, 4), build_model("byom_pkg.models:small_cnn", 4)
    d = build_distiller(DistillConfig(method="at"), student, teacher, 4, image_size=16).eval()
    batch = {"image": _x(8, seed=5), "label": torch.arange(8) % 4, "sample_id": torch.arange(8)}
    return d, batch


def test_a_tapped_student_under_ddp_gets_the_full_batch_gradient(tmp_path):
    """Two gloo ranks with half a batch each (eval mode: batch-independent features): DDP's averaged gradient of
    the feature method (AT on the taps) equals one process's gradient on the whole batch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp_taps.py"
    script.write_text(_DDP_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "tests")]), OMP_NUM_THREADS="1")
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [subprocess.Popen([sys.executable, str(script), str(r), init, str(tmp_path / f"r{r}.pt")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    d, batch = ddp_case()
    sum(d(batch, 4.0, 0).losses.values()).backward()
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out.decode()[-3000:]
    g0, g1 = (torch.load(tmp_path / f"r{r}.pt") for r in range(2))
    for name, p in d.student.named_parameters():
        torch.testing.assert_close(g0[name], g1[name], rtol=0, atol=0)
        torch.testing.assert_close(g0[name], p.grad, rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------- weights


def test_torchvision_state_dicts_load_and_checkpoints_load_back_into_torchvision(tmp_path):
    import torchvision

    torch.manual_seed(2)
    plain = torchvision.models.regnet_x_400mf(num_classes=6).eval()
    torch.save(plain.state_dict(), tmp_path / "tv.pth")  # what torchvision's weight files hold
    ours = load_model(tmp_path / "tv.pth", name=REGNET, num_classes=6)
    assert list(ours.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours(_x()), plain(_x()), rtol=0, atol=0)
    ckpt = save_model(tmp_path / "final_model.pt", ours)
    back = torchvision.models.regnet_x_400mf(num_classes=6)
    back.load_state_dict(torch.load(ckpt, weights_only=True)["model"])  # a kcd_ray file, read by torchvision alone
    torch.testing.assert_close(back.eval()(_x()), plain(_x()), rtol=0, atol=0)
    vit = save_model(tmp_path / "vit.pt", build_model(VIT, 3, kwargs={"patch_size": 8}))
    assert load_model(vit).model_kwargs == {"patch_size": 8}  # a factory's constructor arguments travel with it
    with pytest.raises(CheckpointError, match=r"tv.pth: state dict does not fit model 'torchvision/regnet_x_400mf' "
                                              r"\(num_classes=9\); first mismatch fc.weight: file \(6, 400\) vs model "
                                              r"\(9, 400\)") as e:
        load_model(tmp_path / "tv.pth", name=REGNET, num_classes=9)
    assert "\n" not in str(e.value)


def test_the_teacher_cache_key_follows_the_weights_of_a_torchvision_teacher(tmp_path):
    meta = {"num_classes": 6, "splits": {"train": {"num_rows": 10, "checksum": "abc"}}}
    spec = CacheSpec(dir="", mode="exact", views=0, topk=0, feat=True, seed=0, augment="cifar", epochs=1, plain=False)
    keys = []
    for seed in (0, 0, 1):  # the same weights written again, then other weights, to the same file
        torch.manual_seed(seed)
        torch.save(build_model(REGNET, 6).state_dict(), tmp_path / "t0.pth")
        cfg = load_config(None, [f"distill.teacher={tmp_path / 't0.pth'}", f"distill.teacher_model={REGNET}"])
        keys.append(teacher_cache_key(cfg, meta, spec))
    assert keys[0] == keys[1] and keys[0]["teacher_sha256"] != keys[2]["teacher_sha256"]
    with_kwargs = teacher_cache_key(load_config(None, [f"distill.teacher={tmp_path / 't0.pth'}",
                                                       f"distill.teacher_model={REGNET}",
                                                       "distill.teacher_kwargs={stem_width: 32}"]), meta, spec)
    assert with_kwargs != keys[0] and "teacher_kwargs" not in keys[0]  # caches built before the field still match


def test_the_ledger_counts_a_depthwise_backward_once_per_group():
    from kcd_ray.engine.ledger import measure_flops

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1))
    fwd, bwd = measure_flops(net, (3, 16, 16), backward=True, train=True)
    conv1, depthwise, pointwise = (2 * 16 * 16 * 8 * c for c in (3 * 9, 9, 8))  # 2 FLOPs per multiply-add
    assert fwd == conv1 + depthwise + pointwise
    assert bwd == conv1 + 2 * depthwise + 2 * pointwise  # no input gradient of the first conv; torch 2.14 said 8x
    fwd, bwd = measure_flops(build_model(MBV3, 10), (3, 32, 32), backward=True, train=True)
    assert fwd < bwd < 2 * fwd


def test_kcd_ray_models_lists_the_nodes_and_marks_the_taps(capsys):
    assert cli_main(["models", "--nodes", MBV3]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{MBV3}: family mobilenet_v3, default taps marked; pre-activation taps (AB): yes")
    marked = {line.split()[0]: line.split("<- ")[1] for line in out[1:] if "<- " in line}
    assert marked == {"features.0": "feats[0]", "features.1.block.2": "feats[1] (features.1)",
                      "features.3.add": "feats[2] (features.3)", "features.8.add": "feats[3] (features.8)",
                      "features.11.add": "feats[4] (features.11)", "classifier.1": "feats[-1] pooled pre-logit vector",
                      "classifier.3": "logits"}
    assert cli_main(["models"]) == 0
    assert "torchvision/<name>" in capsys.readouterr().out


# --------------------------------------------------------------------------- the engine, without Ray


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 16x16 synthetic set and a torchvision RegNet teacher saved as a plain state dict."""
    root = tmp_path_factory.mktemp("byom")
    torch.manual_seed(1)
    torch.save(build_model(REGNET, 4).state_dict(), root / "regnet.pth")
    base = {"model": MBV3,
            "data": {"name": "synthetic", "root": str(root / "data"),
                     "synthetic": {"num_train": 64, "num_test": 32, "num_classes": 4, "image_size": 16}},
            "optim": {"epochs": 2, "batch_size": 16, "lr": 0.05, "scheduler": "cosine", "threads": 1},
            "scaling": {"num_workers": 0}, "run": {"verbose": 0},
            "distill": {"teacher": str(root / "regnet.pth"), "teacher_model": REGNET},
            "kcd": {"enabled": False, "interval": 1, "stages": 2, "rho": 0.5}}
    return prepare_tiny(root, base)


def _run(tiny, folder, hooks=(), **over):
    engine = make_engine(tiny, folder, config(tiny, **over), hooks)
    return engine, engine.run(*feeds(tiny, engine))


def test_kd_from_a_torchvision_state_dict_teacher_into_a_torchvision_student(tiny, tmp_path):
    engine, summary = _run(tiny, tmp_path / "kd")
    rows = engine.history
    assert len(rows) == 2 and all(np.isfinite(r["loss_kd"]) and r["loss_kd"] > 0 for r in rows)
    assert rows[-1]["flops_teacher_forward"] > rows[-1]["flops_student_forward"] > 0  # the ledger measured both
    loaded = load_model(tmp_path / "kd" / "final_model.pt")
    assert loaded.arch == MBV3 and summary["final_top1"] >= 0


def test_a_feature_method_with_own_student_taps_and_default_teacher_taps(tiny, tmp_path):
    taps = ["features.1", "features.3", "features.8"]
    engine, _ = _run(tiny, tmp_path / "at", **{"distill.method": "at", "distill.student_taps": taps})
    assert [tuple(s) for s in engine.distiller.s_shapes] == [(16, 4, 4), (24, 2, 2), (48, 1, 1), (1024,)]
    assert len(engine.distiller.t_shapes) == 6 and engine.distiller.n_pairs == 2
    assert all(np.isfinite(r["loss_at"]) and r["loss_at"] > 0 for r in engine.history)


def test_kcd_condenses_a_factory_vit_student(tiny, tmp_path):
    engine, _ = _run(tiny, tmp_path / "kcd", **{"model": VIT, "model_kwargs": {"image_size": 16},
                                                 "kcd.enabled": True, "optim.epochs": 3, "distill.method": "crd",
                                                 "distill.options": {"nce_k": 16}})
    kept = [r["kept_fraction"] for r in engine.history]
    assert kept[0] == 1.0 and kept[-1] < 1.0 and all(np.isfinite(r["loss_crd"]) for r in engine.history)


def test_resume_of_a_torchvision_student_matches_the_uninterrupted_run(tiny, tmp_path):
    over = {"distill.method": "at", "kcd.enabled": True, "optim.epochs": 3}
    ref, ref_summary = _run(tiny, tmp_path / "ref", **over)

    class Stop(Hook):
        def after_checkpoint(self, engine, epoch, row):
            if epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tiny, tmp_path / "cut", hooks=[Stop()], **over)
    again = make_engine(tiny, tmp_path / "cut", config(tiny, **over))
    again.services.masks[:] = []
    again.restore(again.services.latest_checkpoint())
    assert again.start_epoch == 2
    summary = again.run(*feeds(tiny, again))
    for k, v in ref.distiller.student.state_dict().items():
        torch.testing.assert_close(v.float(), again.distiller.student.state_dict()[k].float(), atol=1e-5, rtol=0)
    assert summary["final_top1"] == ref_summary["final_top1"]
    assert summary["sample_passes"] == ref_summary["sample_passes"]
