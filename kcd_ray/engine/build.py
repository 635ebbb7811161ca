"""Everything a worker builds before its first step: models, distiller, optimiser, LR and temperature schedules."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from kcd_ray.data import load_meta
from kcd_ray.data.groups import subset_num_classes
from kcd_ray.distill import build_distiller
from kcd_ray.distill.temperature import build_temperature
from kcd_ray.config import ConfigError
from kcd_ray.engine.plan.derive import method_class
from kcd_ray.models import ModelSourceError, build_model, input_channels
from kcd_ray.models.taps import TapError


@dataclass
class Components:
    distiller: torch.nn.Module
    model: torch.nn.Module  # the distiller, DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    amp_ctx: Any
    temperature: Callable[[int], float]  # epoch -> T (a learned temperature: its current value, see bind_temperature)
    params: list
    num_train: int
    num_classes: int
    fused: bool = False  # the optimiser skips non-finite steps on the device (``found_inf``)


def build_scheduler(optimizer, optim_cfg):
    """Epoch-indexed torch schedulers: KCD changes steps per epoch, so nothing here counts steps."""
    w = optim_cfg.warmup_epochs
    if optim_cfg.scheduler == "multistep":
        main = torch.optim.lr_scheduler.MultiStepLR(optimizer, [m - w for m in optim_cfg.milestones if m > w],
                                                    gamma=optim_cfg.lr_decay)
    elif optim_cfg.scheduler == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, optim_cfg.epochs - w))
    else:
        main = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if w == 0:
        return main
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (w + 1), total_iters=w)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, main], milestones=[w])


def build_optimizer(params, optim_cfg, device: torch.device):
    """SGD, fused where torch has the kernel for this device (CPU and CUDA): the fused step takes a
    ``found_inf`` flag, so a non-finite step is skipped without a host read. Returns (optimizer, fused)."""
    kw = dict(lr=optim_cfg.lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay,
              nesterov=optim_cfg.nesterov)
    if device.type in ("cpu", "cuda") and all(p.is_floating_point() and p.device.type == device.type for p in params):
        try:
            return torch.optim.SGD(params, fused=True, **kw), True
        except (RuntimeError, ValueError):  # a torch without the fused kernel for this device/dtype
            pass
    return torch.optim.SGD(params, **kw), False


def _amp(cfg, device):
    if not (cfg.optim.amp and device.type == "cuda"):
        return nullcontext(), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def check_input_channels(model: torch.nn.Module, meta: dict, which: str) -> None:
    """The prepared images' channels (meta.json ``image_shape``) must be what the model's first convolution takes."""
    need, have = input_channels(model), int(meta["image_shape"][2])
    if need is not None and need != have:
        raise ConfigError(f"data.channels: the prepared images have {have} channel(s) (meta.json image_shape "
                          f"{meta['image_shape']}) but {which} {getattr(model, 'arch', type(model).__name__)!r} takes "
                          f"{need}; the zoo's models take 3: use data.channels=0 or 3")


def build_student(cfg, num_classes: int) -> torch.nn.Module:
    """``model`` with ``model_kwargs``; a torchvision or factory student taps ``distill.student_taps``."""
    try:
        return build_model(cfg.model, num_classes, kwargs=cfg.model_kwargs, taps=cfg.distill.student_taps)
    except TapError as e:
        raise ConfigError(f"distill.student_taps: {e}") from None
    except ModelSourceError as e:
        raise ConfigError(f"model: {e}") from None


def check_model(key: str, taps_key: str, name: str, num_classes: int, kwargs, taps, input_shape,
                features: bool = False, preact: bool = False) -> None:
    """A torchvision or factory model builds from its source (on the meta device: no memory, no arithmetic) and
    runs on the data's images, giving its logits and, for a feature method, its taps; else one ConfigError line
    naming ``key`` (its source) or ``taps_key``. Zoo models are the zoo's own tests' business."""
    from kcd_ray.models import build_meta
    from kcd_ray.models.sources import source_kind

    if source_kind(name) in (None, "zoo"):
        return
    try:
        model = build_meta(name, num_classes, build=lambda: build_model(name, num_classes, kwargs=kwargs, taps=taps))
    except TapError as e:
        raise ConfigError(f"{taps_key}: {e}") from None
    except ModelSourceError as e:
        raise ConfigError(f"{key}: {e}") from None
    x = torch.zeros(2, *input_shape, device="meta")
    try:
        with torch.no_grad():
            out = model.train()(x)
    except Exception as e:  # noqa: BLE001 - whatever the model raises on this input size
        raise ConfigError(f"{key}: {name} does not run on {tuple(input_shape)} images ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); set its input size in "
                          "its constructor arguments (e.g. image_size)") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        what = type(out).__name__ if not isinstance(out, torch.Tensor) else f"shape {tuple(out.shape)}"
        raise ConfigError(f"{key}: {name}'s train-mode forward gives {what}, expected logits of shape "
                          f"(B, {num_classes}) (torchvision's googlenet/inception_v3: aux_logits=false)")
    if features:
        try:
            with torch.no_grad():
                model.eval()(x, is_feat=True, preact=preact)
        except TapError as e:
            raise ConfigError(f"{taps_key}: {e}") from None


def check_models(cfg, kind: str, meta: dict, teacher=None, student: bool = True) -> None:
    """Before Ray starts (the preflight): the student and/or a loaded teacher (``check_model``)."""
    from kcd_ray.distill import DISTILLERS

    num_classes = subset_num_classes(cfg.curriculum, int(meta["num_classes"]))
    h, w, c = (int(v) for v in meta["image_shape"])
    shape = (c, h, w)
    method = DISTILLERS.get(cfg.distill.method) if kind == "distill" else None
    features, preact = bool(method and method.needs_features), bool(method and method.needs_preact)
    if student:
        check_model("model", "distill.student_taps", cfg.model, num_classes, cfg.model_kwargs,
                    cfg.distill.student_taps, shape, features, preact)
    if teacher is not None:
        check_model("distill.teacher_model", "distill.teacher_taps", teacher.arch, num_classes, teacher.model_kwargs,
                    cfg.distill.teacher_taps, shape, features, preact)


def build_components(ctx, device: torch.device, distributed: bool) -> Components:
    """Models, distiller, optimiser and schedules of the run ``ctx.plan`` describes (``ctx.cfg`` may carry an
    elastic run's per-worker batch). The teacher is loaded when the plan keeps it in the loop; with a
    teacher-output cache (``plan.cache``) batches carry its outputs instead."""
    plan, cfg, kind = ctx.plan, ctx.cfg, ctx.kind
    meta = load_meta(ctx.data_dir)
    num_train = int(meta["splits"]["train"]["num_rows"])
    # A class-subset run with local labels (a group teacher) has that many outputs.
    num_classes = subset_num_classes(cfg.curriculum, int(meta["num_classes"]))
    student = build_student(cfg, num_classes)
    check_input_channels(student, meta, "model")
    extra = {}
    if kind == "teacher":
        dcfg = dataclasses.replace(cfg.distill, method="ce", gamma=1.0, alpha=0.0, beta=0.0)
        teacher = None
    else:
        dcfg, method = cfg.distill, method_class(cfg, kind)
        teacher = method.load_teachers(cfg, num_classes) if plan.teacher.in_loop else None
        extra = method.build_kwargs(cfg, num_classes)
        if plan.cache is not None:
            extra["teacher_cache"] = plan.cache
    for t in (teacher if isinstance(teacher, (list, tuple)) else [teacher] if teacher is not None else []):
        check_input_channels(t, meta, "teacher")
    distiller = build_distiller(dcfg, student, teacher, num_classes, num_samples=num_train,
                                image_size=int(meta["image_shape"][0]), in_channels=int(meta["image_shape"][2]),
                                **extra)
    # before the optimiser and DDP: a learned temperature (ctkd) becomes a trained submodule of the distiller
    temperature = distiller.bind_temperature(build_temperature(cfg.distill.temperature, cfg.optim.epochs))
    distiller = distiller.to(device)
    if cfg.optim.channels_last and device.type == "cuda":  # NHWC kernels (cuDNN); the batches come NHWC too
        distiller.to(memory_format=torch.channels_last)
    model = distiller
    if distributed:
        model = DistributedDataParallel(distiller, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=getattr(distiller, "find_unused_parameters", False))
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer, fused = build_optimizer(params, cfg.optim, device)
    amp_ctx, scaler = _amp(cfg, device)
    return Components(
        distiller=distiller, model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg.optim),
        scaler=scaler, amp_ctx=amp_ctx, temperature=temperature,
        params=params, num_train=num_train, num_classes=num_classes, fused=fused,
    )
