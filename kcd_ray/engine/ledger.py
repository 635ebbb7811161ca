"""One compute ledger for every strategy: passes by kind and an estimated FLOPs total, per epoch and for the run.

Counted (over all ranks):

- student forward+backward sample-passes: the engine's ``samples_seen`` / ``sample_passes`` (the trained rows);
- student forward-only passes: whatever a hook reports through ``pop_compute_counts()`` (UNIXKD's ranking
  forward over each candidate batch, KCD's offline E-step over all N samples);
- teacher forward passes: the teacher forwards run, on the rows of every step whose output carries teacher logits
  that the teacher-output cache did not serve, plus hooks' reports (the offline E-step with a teacher-based value
  function);
- teacher outputs used: the same rows, cached or not. The FLOPs count a teacher forward for each output used,
  so a cached run's compute ratio is the one it would have without the cache (the cache saves wall time, which a
  sweep of many runs shares); ``selection.teacher_paid`` counts a cache's forwards as paid once for all the runs
  it serves and leaves the teacher out of the run's FLOPs and of plain KD's.

FLOPs per sample are measured once, with ``torch.utils.flop_counter.FlopCounterMode`` on a meta-device copy of
each network (no memory, no random draws, no effect on the run) at the first trained batch's input size: the
student's forward and backward (train mode) and the teacher's forward (eval mode; with several teachers, the sum
of theirs: a "teacher forward" of a row is one pass through every teacher). Connectors, loss terms, optimiser and
data work are not counted: an estimate of the dominant cost.

Row fields: ``student_forward_only_samples``, ``teacher_forward_samples``, ``teacher_output_samples``, ``flops``
(this epoch); ``student_forward_only_passes``, ``teacher_forward_passes``, ``teacher_output_passes``,
``flops_total`` (cumulative);
``flops_student_forward``, ``flops_student_backward``, ``flops_teacher_forward`` (per sample);
``compute_ratio`` (FLOPs against plain KD: every sample, every epoch, with the same networks; what
``selection.budget`` targets) and
``sample_pass_ratio`` (trained sample-passes against plain KD's, the former ``compute_ratio``); ``strategy``.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch

from kcd_ray.engine import distributed as D
from kcd_ray.engine.hooks import HOOKS, Hook
from kcd_ray.engine.metrics import say
from kcd_ray.engine.selection.base import resolve_strategy

LEDGER_FIELDS = ("student_forward_only_samples", "teacher_forward_samples", "teacher_output_samples", "flops",
                 "student_forward_only_passes", "teacher_forward_passes", "teacher_output_passes", "flops_total",
                 "flops_student_forward", "flops_student_backward", "flops_teacher_forward", "sample_pass_ratio")


def _meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    arch, classes = getattr(model, "arch", None), getattr(model, "num_classes", None)
    if arch and classes:
        from kcd_ray.models import build_meta

        return build_meta(arch, int(classes), getattr(model, "model_kwargs", None))
    return copy.deepcopy(model).to("meta")


def _logits(out):
    return out[-1] if isinstance(out, (tuple, list)) else out


def _conv_backward_flop(*args, out_shape=None, **kwargs) -> int:
    """torch's count of ``aten.convolution_backward`` with the weight gradient of a grouped convolution counted per
    group: torch 2.14's formula works on transposed shapes that lose the group division, so a depthwise conv's
    backward counted ``groups`` times its weight gradient (MobileNet's backward came out 19x its forward). The fix
    is pytorch/pytorch PR 183405 (torch/utils/flop_counter.py, ``conv_backward_flop``: ``// _groups``)."""
    from torch.utils.flop_counter import conv_backward_flop

    total = conv_backward_flop(*args, out_val=out_shape, **kwargs)
    groups, mask = args[9], args[10]
    if groups > 1 and mask[1]:
        weight_grad = conv_backward_flop(*args[:10], [False, True, False], *args[11:], out_val=out_shape, **kwargs)
        total -= weight_grad - weight_grad // groups
    return total


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop})


def _count(net: torch.nn.Module, device: str, input_shape, backward: bool, train: bool) -> tuple[float, float]:
    net.train(train)
    if not backward:
        net.requires_grad_(False)
    x = torch.zeros((2, *[int(s) for s in input_shape]), device=device)
    with _flop_counter() as fc:
        out = _logits(net(x))
    fwd = fc.get_total_flops() / 2.0
    bwd = 0.0
    if backward:
        with _flop_counter() as fc:
            out.float().sum().backward()
        bwd = fc.get_total_flops() / 2.0
    return float(fwd), float(bwd)


_MEASURED: dict = {}  # architecture key -> (forward, backward): a sweep's trials and the plan re-measure nothing


def _architecture_key(model: torch.nn.Module, input_shape, backward: bool, train: bool):
    """What a count depends on: a zoo model's (arch, classes, kwargs), else its class and module tree (``repr``
    names every layer and its shape). Weights and buffers never change a FLOP count."""
    arch, classes = getattr(model, "arch", None), getattr(model, "num_classes", None)
    kwargs = getattr(model, "model_kwargs", None)
    what = (arch, int(classes), repr(sorted((kwargs or {}).items()))) if arch and classes else \
        (type(model).__module__, type(model).__qualname__, repr(model))
    return what, tuple(int(s) for s in input_shape), bool(backward), bool(train)


def measure_flops(model: torch.nn.Module, input_shape, backward: bool, train: bool) -> tuple[float, float]:
    """(forward, backward) FLOPs per sample of ``model`` at ``input_shape`` (C, H, W): counted on a meta-device
    copy (or, for a model that does not run on meta, a CPU copy), never on the model itself; once per architecture
    and input size in a process (a count takes ~0.2-0.5 s on a CPU)."""
    key = _architecture_key(model, input_shape, backward, train)
    if key not in _MEASURED:
        with torch.random.fork_rng(devices=[]):
            try:
                counted = _count(_meta_copy(model), "meta", input_shape, backward, train)
            except Exception:
                counted = _count(copy.deepcopy(model).cpu(), "cpu", input_shape, backward, train)
        if len(_MEASURED) >= 256:
            _MEASURED.clear()
        _MEASURED[key] = counted
    return _MEASURED[key]


@HOOKS.register("ledger")
class ComputeLedger(Hook):
    name = "ledger"
    columns = LEDGER_FIELDS + ("compute_ratio",)

    def __init__(self):
        self.per_sample: Optional[dict] = None  # {"student_forward", "student_backward", "teacher_forward"}
        self.totals = {"student_forward_only_passes": 0, "teacher_forward_passes": 0, "teacher_output_passes": 0,
                       "flops_total": 0.0}
        self._teacher = self._outputs = 0  # teacher forwards run here; teacher outputs used (cached ones too)
        self._loaded = False
        self._backfill = 0  # trained samples of epochs before a resume from a checkpoint without a ledger

    def state_dict(self) -> dict:
        return {"per_sample": self.per_sample, "totals": dict(self.totals)}

    def load_state_dict(self, state: dict) -> None:
        self.per_sample = state.get("per_sample")
        self.totals = {"teacher_output_passes": state["totals"].get("teacher_forward_passes", 0), **state["totals"]}
        self._loaded = True

    def before_run(self, engine, start_epoch: int) -> None:
        if start_epoch > 0 and not self._loaded:  # resumed from a checkpoint written before the ledger existed
            self._backfill = sum(int(r.get("samples_seen", 0)) for r in engine.history[:start_epoch])

    def measure(self, engine, input_shape) -> dict:
        d = engine.distiller
        try:
            sf, sb = measure_flops(d.student, input_shape, backward=True, train=True)
            teachers = list(getattr(d, "teachers", None) or [])  # multi-teacher distillers (mtkd, ed): all of them
            if not teachers and getattr(d, "teacher", None) is not None:
                teachers = [d.teacher]
            tf = sum(measure_flops(t, input_shape, backward=False, train=False)[0] for t in teachers)
            if teachers and d.routes_rows:  # ED: each row goes through its own group's teacher
                tf /= len(teachers)
            cache = getattr(d, "teacher_cache", None)
            if not teachers and cache is not None:  # teacher not loaded: its FLOPs as the cache build measured them
                tf = float(cache.teacher_flops)
        except Exception as e:  # never fail a run over an estimate
            if engine.ctx.verbose:
                say(f"[kcd_ray] compute ledger: FLOPs not measured ({type(e).__name__}: {e}); ratios by sample-passes")
            sf = sb = tf = 0.0
        return {"student_forward": sf, "student_backward": sb, "teacher_forward": tf}

    def after_step(self, engine, batch: dict, output) -> None:
        if self.per_sample is None:
            self.per_sample = self.measure(engine, tuple(batch["image"].shape[1:]))
        if output.teacher_logits is not None:  # rows the teacher saw: with a cache, only the uncached (blends)
            rows = int(batch["label"].shape[0])
            missing = batch.get("t_missing_cpu")
            self._teacher += rows if missing is None else int(missing.sum())
            self._outputs += rows

    def _counts(self, engine) -> tuple[int, int, int]:
        """(student forward-only passes, teacher forwards run, teacher outputs used) of this epoch, every rank's."""
        fwd_only, teacher, outputs = 0, self._teacher, self._outputs
        self._teacher = self._outputs = 0
        for h in engine.hooks:
            if h is not self:
                c = h.pop_compute_counts() or {}
                fwd_only += int(c.get("student_forward_only", 0))
                teacher += int(c.get("teacher_forward", 0))
                outputs += int(c.get("teacher_output", c.get("teacher_forward", 0)))
        return tuple(int(v) for v in D.all_sum([fwd_only, teacher, outputs], engine.device))

    def after_epoch(self, engine, epoch: int, row: dict) -> None:
        fwd_only, teacher, outputs = self._counts(engine)
        if self.per_sample is None:  # this rank trained no batch: the model's own input size
            d = engine.distiller
            self.per_sample = self.measure(engine, (getattr(d, "in_channels", 3), d.image_size, d.image_size))
        ps = self.per_sample
        t = self.totals
        if self._backfill:  # those epochs as plain training steps (forward-only passes unknown: none counted)
            with_teacher = self._backfill if ps["teacher_forward"] > 0 else 0
            t["teacher_forward_passes"] += with_teacher
            t["teacher_output_passes"] += with_teacher
            t["flops_total"] += self._backfill * (ps["student_forward"] + ps["student_backward"]) \
                + with_teacher * ps["teacher_forward"]
            self._backfill = 0
        # selection.teacher_paid (a shared cache's forwards as already paid): the teacher is in neither side
        tf = 0.0 if engine.cfg.selection.teacher_paid else ps["teacher_forward"]
        trained = int(row["samples_seen"])
        flops = trained * (ps["student_forward"] + ps["student_backward"]) + fwd_only * ps["student_forward"] \
            + outputs * tf
        t["student_forward_only_passes"] += fwd_only
        t["teacher_forward_passes"] += teacher
        t["teacher_output_passes"] += outputs
        t["flops_total"] += flops
        n_ref = engine.parts.num_train * (epoch + 1)
        sample_ratio = row["sample_passes"] / max(n_ref, 1)
        kd_per_sample = ps["student_forward"] + ps["student_backward"] + tf
        row.update(
            strategy=resolve_strategy(engine.cfg, engine.ctx.kind),
            student_forward_only_samples=fwd_only, teacher_forward_samples=teacher, teacher_output_samples=outputs,
            flops=flops, student_forward_only_passes=t["student_forward_only_passes"],
            teacher_forward_passes=t["teacher_forward_passes"], teacher_output_passes=t["teacher_output_passes"],
            flops_total=t["flops_total"],
            flops_student_forward=ps["student_forward"], flops_student_backward=ps["student_backward"],
            flops_teacher_forward=ps["teacher_forward"], sample_pass_ratio=sample_ratio,
            compute_ratio=t["flops_total"] / (n_ref * kd_per_sample) if kd_per_sample > 0 else sample_ratio,
        )
