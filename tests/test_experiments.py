"""experiments/: every recipe and sweep loads and validates, follows the paper's setup, and every pair trains a step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from kcd_ray.config import load_config
from kcd_ray.engine.build import check_model
from kcd_ray.models import build_model, is_model_name
from kcd_ray.sweeps.spec import load_sweep

EXP = Path(__file__).resolve().parent.parent / "experiments"
RECIPES = sorted(p for p in EXP.rglob("*.yaml") if not {"sweeps", "kuberay"} & set(p.parts))  # kuberay: manifests
SWEEPS = sorted((EXP / "sweeps").glob("*.yaml"))
PAIRS = [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("resnet56", "resnet20"), ("resnet110", "resnet32"),
         ("vgg13", "vgg8"), ("ResNet50", "MobileNetV2"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
         ("wrn_40_2", "ShuffleV1")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_generated_recipes_match_the_generator():
    spec = importlib.util.spec_from_file_location("make_recipes", EXP / "make_recipes.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    texts = gen.recipes()
    stale = [rel for rel, text in texts.items() if gen.is_stale(EXP / rel, text)]
    assert not stale, f"run `python experiments/make_recipes.py`; out of date: {stale}"
    assert {str(p.relative_to(EXP)) for p in RECIPES} == set(texts), "every recipe comes from the generator"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(EXP)))
def test_recipe_loads(path):
    cfg = load_config(path)
    assert is_model_name(cfg.model)  # a zoo name, torchvision/<name> or package.module:callable
    raw = yaml.safe_load(path.read_text())
    assert raw["run"]["name"], "recipes name their runs, so re-running resumes"
    if cfg.distill.teacher_model:
        assert is_model_name(cfg.distill.teacher_model)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_loads(path):
    sw = load_sweep(path)
    assert sw.dims, "a shipped sweep searches something"
    assert sw.base["data"]["name"] == "digits", "shipped sweeps run on a laptop; scale with base=..."
    plain_in_grid = any(d.key == "selection.strategy" and "none" in d.values for d in sw.dims)
    assert sw.include_kd_baseline or sw.pbt or plain_in_grid  # PBT: no fixed baseline; or plain KD is a grid point


def test_shipped_sweeps_cover_the_issue():
    keys = {d.key for p in SWEEPS for d in load_sweep(p).dims}
    for needed in ("kcd.rho", "kcd.interval", "kcd.stages", "kcd.value_fn", "distill.temperature"):
        assert needed in keys
    summary = next(d for p in SWEEPS for d in load_sweep(p).dims if d.key == "kcd")
    assert {v.get("summary") for v in summary.values} == {True, False} and any("lam_min" in v for v in summary.values)
    schedules = {v["schedule"] for p in SWEEPS for d in load_sweep(p).dims if d.key == "distill.temperature"
                 for v in d.values}
    assert schedules == {"constant", "linear", "cosine", "exponential", "step"}
    budget = {d.key: d for p in SWEEPS for d in load_sweep(p).dims if d.key.startswith("selection.")}
    assert set(budget["selection.strategy"].values) >= {"kcd", "infobatch", "random", "none"}
    assert min(budget["selection.budget"].values) <= 0.3 and max(budget["selection.budget"].values) == 1.0
    optuna = load_sweep(EXP / "sweeps" / "pareto_optuna.yaml")
    assert optuna.objectives == (("val_top1", "max"), ("compute_ratio", "min"))
    assert {load_sweep(p).search for p in SWEEPS} == {"grid", "random", "optuna"}


@pytest.mark.parametrize("teacher,student", PAIRS)
def test_cifar_pair_follows_the_paper(teacher, student):
    folder = EXP / "cifar100" / f"{teacher}-{student}"
    kd, kcd = load_config(folder / "kd.yaml"), load_config(folder / "kcd.yaml")
    for cfg in (kd, kcd):
        o = cfg.optim
        assert (cfg.model, cfg.data.name, o.epochs, o.batch_size, o.momentum, o.weight_decay) == (
            student, "cifar100", 240, 64, 0.9, 5e-4)
        assert o.lr == (0.01 if student in ("MobileNetV2", "ShuffleV1", "ShuffleV2") else 0.05)
        assert (o.scheduler, o.milestones, o.lr_decay) == ("multistep", [150, 180, 210], 0.1)
        d = cfg.distill
        assert (d.method, d.gamma, d.alpha, d.beta, d.temperature.schedule, d.temperature.T) == (
            "kd", 0.1, 0.9, 0.0, "constant", 4.0)
        # RepDistiller's fetch_pretrained_teachers.sh layout, loaded with the architecture named.
        assert d.teacher == f"./save/models/{teacher}_vanilla/ckpt_epoch_240.pth" and d.teacher_model == teacher
    k = kcd.kcd
    assert k.enabled and not kd.kcd.enabled
    assert (k.interval, k.rho, k.stages, k.value_fn, k.mode, k.lam, k.lam_min, k.summary) == (
        40, 0.7, 6, "entropy", "multiple", 0.03, 0.7, True)
    assert (EXP / "cifar100" / "teachers" / f"{teacher}.yaml").is_file()


def test_teacher_and_imagenet_recipes():
    t = load_config(EXP / "cifar100" / "teachers" / "resnet32x4.yaml")
    assert t.model == "resnet32x4" and t.optim.epochs == 240 and not t.kcd.enabled
    for v in ("kd", "kcd"):
        cfg = load_config(EXP / "imagenet" / "resnet34-resnet18" / f"{v}.yaml")
        assert (cfg.model, cfg.distill.teacher_model, cfg.data.name, cfg.data.image_size) == (
            "imagenet_resnet18", "imagenet_resnet34", "folder", 224)
        assert cfg.kcd.enabled == (v == "kcd")


@pytest.mark.parametrize("pair", ["convnext_tiny-resnet18", "vit_b_16-deit_tiny"])
def test_recipes_of_models_outside_the_zoo_build_and_take_224px_images(pair):
    """Documented, not run: their student and teacher build from their sources on the meta device and give logits
    and (for a feature method) taps at 224 px, as the preflight checks them."""
    for v in ("kd", "kcd"):
        cfg = load_config(EXP / "imagenet" / pair / f"{v}.yaml")
        assert cfg.data.image_size == 224 and cfg.kcd.enabled == (v == "kcd") and cfg.distill.teacher.endswith(".pth")
        for key, name, kwargs in (("model", cfg.model, cfg.model_kwargs),
                                  ("distill.teacher_model", cfg.distill.teacher_model, cfg.distill.teacher_kwargs)):
            check_model(key, "taps", name, 1000, kwargs, (), (3, 224, 224), features=True)


def _one_step(teacher_arch: str, student_arch: str, num_classes: int) -> None:
    from kcd_ray.config import DistillConfig
    from kcd_ray.distill import build_distiller

    torch.manual_seed(0)
    teacher, student = build_model(teacher_arch, num_classes), build_model(student_arch, num_classes)
    cfg = load_config(None, ["distill.method=kd"]).distill
    assert isinstance(cfg, DistillConfig)
    dist = build_distiller(cfg, student, teacher, num_classes, image_size=32)
    dist.train()
    batch = {"sample_id": torch.arange(4), "label": torch.randint(0, num_classes, (4,)),
             "image": torch.randn(4, 3, 32, 32)}
    opt = torch.optim.SGD([p for p in dist.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    before = [p.detach().clone() for p in student.parameters()]
    out = dist(batch, T=4.0, epoch=0)
    loss = sum(out.losses.values())
    assert set(out.losses) == {"ce", "kd"} and torch.isfinite(loss)
    assert out.logits.shape == (4, num_classes) and out.teacher_logits.shape == (4, num_classes)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters())), "the student did not move"
    assert not teacher.training and all(p.grad is None for p in teacher.parameters()), "the teacher stays frozen"


@pytest.mark.parametrize("teacher,student", PAIRS)
def test_cifar_pair_trains_one_step(teacher, student):
    _one_step(teacher, student, 100)


def test_imagenet_pair_trains_one_step():
    _one_step("imagenet_resnet34", "imagenet_resnet18", 10)  # 32x32 input is enough to run every stage
