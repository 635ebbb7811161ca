"""E-step, part 1: instant knowledge values (docs/methods/kcd.md §2).

Every registered value function has the signature
``fn(student_logits, teacher_logits, labels, ctx: ValueContext) -> Tensor[B]`` and returns one
float32 value per sample, on the logits' device, computed under ``no_grad`` in float32. Higher
always means "the teacher's knowledge on this sample is more valuable to the student right now",
so every function can feed the same accumulator and the same top-K selection.

``ctx`` (a :class:`ValueContext`: the batch's sample ids, the epoch, the run's seed and the
temperature ``T``) is required by every function, also by those that ignore it, so that the
online E-step (training workers) and the offline E-step (the scoring actors) call every
function the same way and get the same answer:

* ``random`` is a pure function of ``(ctx.seed, ctx.epoch, sample id)`` (a splitmix64 hash):
  the same value whichever worker, batch split, batch order or E-step (online / offline) sees
  the sample, and across a resume. It differs across epochs and seeds.
* ``kd`` is ``KL(softmax(z_t / T) || softmax(z_s / T))`` at ``T = ctx.T``. Build the context
  with :func:`make_context`, which puts the distillation temperature of the epoch there, or
  ``kcd.value_T`` when that is set (:class:`kcd_ray.config.KCDConfig`).
* The other functions read no context.

Arguments a function does not need may be ``None``; ask :func:`needs_teacher` /
:func:`needs_labels` before paying for a teacher forward pass (the offline E-step does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from kcd_ray.registry import Registry

ValueFn = Callable[..., torch.Tensor]
VALUE_FNS: Registry[ValueFn] = Registry("value function")


@dataclass(frozen=True, eq=False)
class ValueContext:
    """What a value function may know besides the logits and labels of one batch.

    ``sample_ids``: the batch's global sample ids (int64 tensor or array, shape ``[B]``, in the
    order of the logits' rows); ``epoch``: the epoch whose values these are; ``seed``: the run's
    ``kcd.seed``; ``T``: the temperature of the ``kd`` value function (> 0). Build it with
    :func:`make_context` so that ``kcd.value_T`` is honoured.
    """

    sample_ids: Union[torch.Tensor, np.ndarray]
    epoch: int
    seed: int
    T: float = 1.0

    def __post_init__(self):
        ids = self.sample_ids
        if isinstance(ids, torch.Tensor):
            ok = ids.dim() == 1 and not ids.is_floating_point() and not ids.is_complex() and ids.dtype != torch.bool
        else:
            ids = np.asarray(ids)
            ok = ids.ndim == 1 and (ids.dtype.kind in "iu" or ids.size == 0)
            object.__setattr__(self, "sample_ids", ids)
        if not ok:
            shape = tuple(ids.shape)
            raise ValueError(f"ValueContext.sample_ids: expected a 1-D integer tensor or array, "
                             f"got {ids.dtype} of shape {shape}")
        for name in ("epoch", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"ValueContext.{name}: expected an integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        T = self.T
        if (isinstance(T, bool) or not isinstance(T, (int, float, np.floating, np.integer)) or not math.isfinite(T)
                or T <= 0):
            raise ValueError(f"ValueContext.T: expected a finite temperature > 0, got {T!r}")
        object.__setattr__(self, "T", float(T))

    def __len__(self) -> int:
        return int(self.sample_ids.shape[0])

    def ids_numpy(self) -> np.ndarray:
        """The sample ids as a CPU int64 numpy array."""
        ids = self.sample_ids
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        return np.asarray(ids).astype(np.int64, copy=False)


def make_context(ids, epoch: int, seed: int, T: float, value_T: Optional[float] = None) -> ValueContext:
    """The :class:`ValueContext` of one batch: ``T`` is the distillation temperature of ``epoch``,
    replaced by ``value_T`` (``kcd.value_T``) when that is not None.

    Online and offline E-steps both call this, e.g.
    ``make_context(batch["sample_id"], epoch, cfg.kcd.seed, T_of_epoch, cfg.kcd.value_T)``.
    """
    return ValueContext(ids, epoch, seed, T if value_T is None else value_T)


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
        raise ValueError(f"value function {fn!r}: student logits {tuple(s.shape)} and teacher logits "
                         f"{tuple(t.shape)} differ")
    return s, t


def _ctx(ctx, batch: int, fn: str) -> ValueContext:
    """Every function takes a context (also those that ignore it): a caller still passing the old
    ``generator`` argument, or ids that do not line up with the logits, fails here."""
    if not isinstance(ctx, ValueContext):
        raise TypeError(f"value function {fn!r}: ctx must be a ValueContext (see make_context), "
                        f"got {type(ctx).__name__}")
    if len(ctx) != batch:
        raise ValueError(f"value function {fn!r}: {len(ctx)} sample ids for a batch of {batch}")
    return ctx


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_U64 = 1 << 64
_BELOW_ONE = np.nextafter(np.float32(1.0), np.float32(0.0))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (np.asarray(x, np.uint64) + _GOLDEN).astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniform_hash(ids, epoch: int, seed: int) -> np.ndarray:
    """Uniform [0, 1) float32 values, a pure function of (seed, epoch, sample id), elementwise over ``ids``.

    ``u = (splitmix64(id ^ splitmix64(seed * 1000003 + epoch)) >> 11) / 2**53`` (uint64 wrapping
    arithmetic; a negative seed or epoch is taken modulo 2**64), rounded to float32 and kept below 1.
    """
    ids = np.asarray(ids).reshape(-1)
    if ids.size and ids.dtype.kind not in "iu":
        raise ValueError(f"sample ids: expected integers, got {ids.dtype}")
    if ids.size and ids.min() < 0:
        raise ValueError(f"sample ids: expected ids >= 0, got {int(ids.min())}")
    with np.errstate(over="ignore"):
        base = _splitmix64(np.uint64(int(seed) % _U64) * np.uint64(1_000_003) + np.uint64(int(epoch) % _U64))
        key = _splitmix64(ids.astype(np.uint64) ^ base)
    u = ((key >> np.uint64(11)).astype(np.float64) / float(1 << 53)).astype(np.float32)
    return np.minimum(u, _BELOW_ONE)  # float32 rounding could otherwise give exactly 1.0


@_register("entropy", teacher=False, labels=False)
@torch.no_grad()
def entropy(student_logits, teacher_logits, labels, ctx: ValueContext) -> torch.Tensor:
    """The default: H(softmax(z_s)) at T=1 (docs/methods/kcd.md §2; ``ctx.T`` is not used). An unsure student gains
    most from the teacher."""
    s = _logits(student_logits, "student_logits", "entropy")
    _ctx(ctx, s.shape[0], "entropy")
    logp = F.log_softmax(s, dim=1)
    p = logp.exp()
    # 0 * log 0 = 0 (a -inf logit); NaN logits stay NaN so the accumulator can reject them.
    return -torch.where(p == 0, torch.zeros_like(p), p * logp).sum(dim=1)


@_register("kd", teacher=True, labels=False)
@torch.no_grad()
def kd(student_logits, teacher_logits, labels, ctx: ValueContext) -> torch.Tensor:
    """Per-sample KL(softmax(z_t/T) || softmax(z_s/T)) at ``T = ctx.T``: how far the student still is from the teacher.

    ``ctx.T`` is the temperature being trained with at ``ctx.epoch``, or ``kcd.value_T`` when set
    (:func:`make_context`). Not scaled by T^2 (a common factor does not change the ranking).
    """
    s, t = _pair(student_logits, teacher_logits, "kd")
    T = _ctx(ctx, s.shape[0], "kd").T
    log_ps = F.log_softmax(s / T, dim=1)
    log_pt = F.log_softmax(t / T, dim=1)
    return F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(dim=1).clamp_min(0.0)


@_register("ce", teacher=False, labels=True)
@torch.no_grad()
def ce(student_logits, teacher_logits, labels, ctx: ValueContext) -> torch.Tensor:
    """Per-sample cross-entropy of the student with the hard label: a hard sample is valuable."""
    s = _logits(student_logits, "student_logits", "ce")
    _ctx(ctx, s.shape[0], "ce")
    y = _labels(labels, s.shape[0], "ce").to(s.device)
    return F.cross_entropy(s, y, reduction="none")


@_register("margin", teacher=False, labels=False)
@torch.no_grad()
def margin(student_logits, teacher_logits, labels, ctx: ValueContext) -> torch.Tensor:
    """1 - (p_top1 - p_top2) of the student: a small margin (a near tie) means high value. In [0, 1]."""
    s = _logits(student_logits, "student_logits", "margin")
    _ctx(ctx, s.shape[0], "margin")
    if s.shape[1] < 2:
        raise ValueError("value function 'margin' needs at least 2 classes")
    top = F.softmax(s, dim=1).topk(2, dim=1).values
    return 1.0 - (top[:, 0] - top[:, 1])


@_register("acc", teacher=False, labels=True)
@torch.no_grad()
def acc(student_logits, teacher_logits, labels, ctx: ValueContext) -> torch.Tensor:
    """``1 - correct``: 1 where the student's top-1 is wrong, 0 where it is right.

    The paper (docs/methods/kcd.md §2) lists "the student's correctness"; we store its complement so that, as for every
    other value function, higher = more valuable: samples the student gets wrong keep the
    teacher's knowledge.
    """
    s = _logits(student_logits, "student_logits", "acc")
    _ctx(ctx, s.shape[0], "acc")
    y = _labels(labels, s.shape[0], "acc").to(s.device)
    return (s.argmax(dim=1) != y).float()


@_register("acc_teacher", teacher=True, labels=True)
@torch.no_grad()
def acc_teacher(student_logits, teacher_logits, labels, ctx: ValueContext) -> torch.Tensor:
    """1 where the teacher's top-1 is right, 0 where it is wrong.

    Sign choice: unlike ``acc`` this is not a measure of the student's need but of the
    knowledge's quality. A wrong teacher prediction carries misleading knowledge, so it is
    the first to be condensed away; correct-teacher samples are kept (ties broken by the
    accumulated history and then by the M-step's seeded permutation).
    """
    t = _logits(teacher_logits, "teacher_logits", "acc_teacher")
    _ctx(ctx, t.shape[0], "acc_teacher")
    y = _labels(labels, t.shape[0], "acc_teacher").to(t.device)
    return (t.argmax(dim=1) == y).float()


@_register("random", teacher=False, labels=False)
@torch.no_grad()
def random(student_logits, teacher_logits, labels, ctx: ValueContext) -> torch.Tensor:
    """Uniform [0, 1) values (the ablation), a pure function of ``(ctx.seed, ctx.epoch, sample id)``
    (:func:`uniform_hash`): identical online and offline, whatever worker, batch split or order.

    ``student_logits`` only fixes the device and is checked against the ids' count; it may be None (CPU).
    """
    if student_logits is None:
        dev, batch = torch.device("cpu"), len(ctx) if isinstance(ctx, ValueContext) else -1
    else:
        s = _logits(student_logits, "student_logits", "random")
        dev, batch = s.device, s.shape[0]
    ctx = _ctx(ctx, batch, "random")
    return torch.from_numpy(uniform_hash(ctx.ids_numpy(), ctx.epoch, ctx.seed)).to(dev)
