"""E-step, part 1: instant knowledge values (KCD.md, "Online Global Value Estimation").

Every value function has the signature
``fn(student_logits, teacher_logits, labels, generator=None) -> Tensor[B]`` and returns one
float32 value per sample, computed under ``no_grad`` in float32. Higher always means "the
teacher's knowledge on this sample is more valuable to the student right now", so every
function can feed the same accumulator and the same top-K selection.

Arguments a function does not need may be ``None``; ask :func:`needs_teacher` /
:func:`needs_labels` before paying for a teacher forward pass (the offline E-step does).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from kcd_ray.registry import Registry

ValueFn = Callable[..., torch.Tensor]
VALUE_FNS: Registry[ValueFn] = Registry("value function")


def _register(name: str, *, teacher: bool, labels: bool):
    def deco(fn: ValueFn) -> ValueFn:
        fn.needs_teacher = teacher  # type: ignore[attr-defined]
        fn.needs_labels = labels  # type: ignore[attr-defined]
        VALUE_FNS.add(name, fn)
        return fn

    return deco


def needs_teacher(name: str) -> bool:
    """Whether value function ``name`` reads the teacher's logits."""
    return bool(VALUE_FNS.get(name).needs_teacher)


def needs_labels(name: str) -> bool:
    """Whether value function ``name`` reads the hard labels."""
    return bool(VALUE_FNS.get(name).needs_labels)


def _logits(x: Optional[torch.Tensor], what: str, fn: str) -> torch.Tensor:
    if x is None:
        raise ValueError(f"value function {fn!r} needs {what}, got None")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"value function {fn!r}: {what} must be a 2-D tensor [batch, classes], got {shape}")
    return x.detach().float()


def _labels(y: Optional[torch.Tensor], batch: int, fn: str) -> torch.Tensor:
    if y is None:
        raise ValueError(f"value function {fn!r} needs labels, got None")
    y = torch.as_tensor(y).detach().long().reshape(-1)
    if y.numel() != batch:
        raise ValueError(f"value function {fn!r}: {y.numel()} labels for a batch of {batch}")
    return y


def _pair(s, t, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    s = _logits(s, "student_logits", fn)
    t = _logits(t, "teacher_logits", fn).to(s.device)
    if s.shape != t.shape:
        raise ValueError(f"value function {fn!r}: student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ")
    return s, t


@_register("entropy", teacher=False, labels=False)
@torch.no_grad()
def entropy(student_logits, teacher_logits=None, labels=None, generator=None) -> torch.Tensor:
    """The default: H(softmax(z_s)) at T=1. An unsure student gains most from the teacher."""
    s = _logits(student_logits, "student_logits", "entropy")
    logp = F.log_softmax(s, dim=1)
    p = logp.exp()
    # 0 * log 0 = 0 (a -inf logit); NaN logits stay NaN so the accumulator can reject them.
    return -torch.where(p == 0, torch.zeros_like(p), p * logp).sum(dim=1)


@_register("kd", teacher=True, labels=False)
@torch.no_grad()
def kd(student_logits, teacher_logits, labels=None, generator=None, *, T: float = 1.0) -> torch.Tensor:
    """Per-sample KL(softmax(z_t/T) || softmax(z_s/T)): how far the student still is from the teacher.

    Not scaled by T^2 (a common factor does not change the ranking).
    """
    if not T > 0:
        raise ValueError(f"value function 'kd': T must be > 0, got {T!r}")
    s, t = _pair(student_logits, teacher_logits, "kd")
    log_ps = F.log_softmax(s / T, dim=1)
    log_pt = F.log_softmax(t / T, dim=1)
    return F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(dim=1).clamp_min(0.0)


@_register("ce", teacher=False, labels=True)
@torch.no_grad()
def ce(student_logits, teacher_logits, labels, generator=None) -> torch.Tensor:
    """Per-sample cross-entropy of the student with the hard label: a hard sample is valuable."""
    s = _logits(student_logits, "student_logits", "ce")
    y = _labels(labels, s.shape[0], "ce").to(s.device)
    return F.cross_entropy(s, y, reduction="none")


@_register("margin", teacher=False, labels=False)
@torch.no_grad()
def margin(student_logits, teacher_logits=None, labels=None, generator=None) -> torch.Tensor:
    """1 - (p_top1 - p_top2) of the student: a small margin (a near tie) means high value. In [0, 1]."""
    s = _logits(student_logits, "student_logits", "margin")
    if s.shape[1] < 2:
        raise ValueError("value function 'margin' needs at least 2 classes")
    top = F.softmax(s, dim=1).topk(2, dim=1).values
    return 1.0 - (top[:, 0] - top[:, 1])


@_register("acc", teacher=False, labels=True)
@torch.no_grad()
def acc(student_logits, teacher_logits, labels, generator=None) -> torch.Tensor:
    """``1 - correct``: 1 where the student's top-1 is wrong, 0 where it is right.

    KCD.md lists "the student's correctness"; we store its complement so that, as for every
    other value function, higher = more valuable: samples the student gets wrong keep the
    teacher's knowledge.
    """
    s = _logits(student_logits, "student_logits", "acc")
    y = _labels(labels, s.shape[0], "acc").to(s.device)
    return (s.argmax(dim=1) != y).float()


@_register("acc_teacher", teacher=True, labels=True)
@torch.no_grad()
def acc_teacher(student_logits, teacher_logits, labels, generator=None) -> torch.Tensor:
    """1 where the teacher's top-1 is right, 0 where it is wrong.

    Sign choice: unlike ``acc`` this is not a measure of the student's need but of the
    knowledge's quality. A wrong teacher prediction carries misleading knowledge, so it is
    the first to be condensed away; correct-teacher samples are kept (ties broken by the
    accumulated history and then by sample id).
    """
    t = _logits(teacher_logits, "teacher_logits", "acc_teacher")
    y = _labels(labels, t.shape[0], "acc_teacher").to(t.device)
    return (t.argmax(dim=1) == y).float()


@_register("random", teacher=False, labels=False)
@torch.no_grad()
def random(student_logits, teacher_logits=None, labels=None, generator=None) -> torch.Tensor:
    """Uniform [0, 1) values from ``generator`` (the ablation): reproducible when a seeded generator is given."""
    s = _logits(student_logits, "student_logits", "random")
    dev = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(s.shape[0], generator=generator, device=dev, dtype=torch.float32).to(s.device)
