"""Distillers with several teachers: ``ed`` (education distillation, docs/methods/ed.md §6) and ``mtkd``
(multi-teacher KD).

Both hold their teachers like the base class holds its one teacher: outside ``parameters()``/``state_dict()``
(never in DDP buckets or checkpoints), frozen, in eval mode, moved by ``.to()``.

``ed``: the student is a :class:`kcd_ray.models.growing.GrowingStudent` (the zoo student is wrapped on
construction) whose grade the curriculum hook sets. For a batch in grade g, every sample meets exactly one
teacher, its group's (docs/methods/ed.md §4):

    L = alpha * CE(z, pos(y)) + (1 - alpha) * T^2 * mean_batch KL(softmax(t_h / T) || softmax(z[o_h:o_h+n_h] / T))

with ``z`` the student's ``K_g`` logits in class-position order and ``h`` the sample's group; CE runs over all
``K_g`` logits, KD over the group's slice only (docs/methods/ed.md §6; alpha 0.3, T 4 by default). A batch may
mix groups (``curriculum.mix_groups=true``) or hold one (ED's sequential passes; on several Ray workers a batch
at a pass boundary holds two): the same
per-sample loss either way. ``teacher_source=per_group``: G teachers with ``n_h`` outputs in local-label order;
``sliced`` (a flagged deviation): one full-label teacher whose logits at group h's classes serve as ``t_h``.
Routing reads one small host value per step (the batch's group counts).

``StepOutput.logits`` / ``teacher_logits`` are label-ordered and ``num_classes`` wide (unseen classes padded
low, a teacher's row padded outside its group), so KCD's value functions and the engine read them as for any
distiller.

``mtkd``: ``gamma * CE + alpha * mean_i T^2 KL(p_{t_i} || p_s)`` over the teachers of ``distill.teachers`` (the
equal-weight baseline of the CA-MKD code base ED comes from, docs/methods/ed.md §9).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kcd_ray.config import ConfigError
from kcd_ray.distill.base import Distiller, StepOutput, register_distiller
from kcd_ray.distill.connectors import f32


class _Teachers(Distiller):
    """Base for distillers holding a list of frozen teachers (hidden from parameters and state dicts)."""
    teacher_outputs = None  # several teachers: no teacher-output cache

    needs_teacher = False

    def _hold(self, teachers: Sequence[nn.Module]) -> None:
        teachers = list(teachers)
        for t in teachers:
            t.requires_grad_(False)
            t.eval()
        object.__setattr__(self, "_teachers", teachers)

    @property
    def teachers(self) -> list[nn.Module]:
        return self._teachers

    def train(self, mode: bool = True):
        super().train(mode)
        for t in getattr(self, "_teachers", []):
            t.eval()
        return self

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for t in getattr(self, "_teachers", []):
            t._apply(fn, recurse)
        return self


def _as_list(teacher) -> list:
    if teacher is None:
        return []
    return list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]


@register_distiller("mtkd")
class MultiTeacherKD(_Teachers):
    """gamma * CE + alpha * (1/M) sum_i T^2 KL(p_{t_i} || p_s); teachers from ``distill.teachers``."""

    label = "multi-teacher KD"

    @classmethod
    def teacher_files(cls, cfg) -> list[tuple[str, str]]:
        return [("distill.teachers", p) for p in cfg.distill.teachers]

    @classmethod
    def load_teachers(cls, cfg, num_classes: int):
        from kcd_ray.models import load_model

        d = cfg.distill
        if not d.teachers:
            raise ConfigError("distill.teachers: method 'mtkd' needs a list of full-label teacher checkpoints")
        return [load_model(p, name=d.teacher_model or None, num_classes=num_classes, kwargs=d.teacher_kwargs)
                for p in d.teachers]

    def __init__(self, student, teacher, cfg, num_classes, **kw):
        teachers = _as_list(teacher)
        if not teachers:
            raise ConfigError("distill.teachers: method 'mtkd' needs at least one teacher checkpoint")
        super().__init__(student, None, cfg, num_classes, **kw)
        self._hold(teachers)
        self.alpha = float(cfg.alpha)

    def forward(self, batch: dict, T: float, epoch: int, init_stage: bool = False) -> StepOutput:
        image, label = batch["image"], batch["label"]
        T = self.step_temperature(T, epoch)
        s = self.student(image)
        with torch.no_grad():
            ts = [t(image).detach() for t in self._teachers]
        per: dict[str, torch.Tensor] = {}
        if self.gamma > 0:
            per["ce"] = self.gamma * F.cross_entropy(f32(s), label, reduction="none")
        if self.alpha > 0:
            per["kd"] = self.alpha * torch.stack([self.kd_per_sample(s, t, T) for t in ts]).mean(0)
        if not per:
            raise ConfigError("distill.gamma/alpha: every loss weight of method 'mtkd' is zero")
        return StepOutput(s, {k: v.mean() for k, v in per.items()}, torch.stack(ts).mean(0), per)


@register_distiller("ed")
class EducationDistiller(_Teachers):
    """ED's loss over a growing student (module doc). Built with ``groups`` (a ClassGroups) and ``curriculum``
    (the CurriculumConfig: alpha, teacher_source, tr_relu, tr1_grid) as keyword arguments."""
    routes_rows = True  # a row goes through its group's teacher only: one teacher forward per row (ledger)
    label = "education distillation"
    logit_standardize_applies = False

    @classmethod
    def teacher_files(cls, cfg) -> list[tuple[str, str]]:
        cur = cfg.curriculum
        if cur.teacher_source == "sliced":
            return [("distill.teacher", cfg.distill.teacher)]
        return [("curriculum.teachers", p) for p in cur.teachers]

    @classmethod
    def load_teachers(cls, cfg, num_classes: int):
        """One teacher per group (local labels, n_g outputs), or the sliced full-label teacher."""
        from kcd_ray.data.groups import ClassGroups
        from kcd_ray.models import load_model

        d, cur = cfg.distill, cfg.curriculum
        if cur.teacher_source == "sliced":
            return [load_model(d.teacher, name=d.teacher_model or None, num_classes=num_classes,
                               kwargs=d.teacher_kwargs)]
        groups = ClassGroups.from_config(cur, num_classes)
        if len(cur.teachers) != groups.num_groups:
            raise ConfigError(f"curriculum.teachers: {len(cur.teachers)} checkpoints for {groups.num_groups} groups "
                              "(kcd-ray distill trains the missing ones first)")
        return [load_model(p, name=cur.teacher_model or None, num_classes=groups.size(g + 1), kwargs=d.teacher_kwargs)
                for g, p in enumerate(cur.teachers)]

    @classmethod
    def build_kwargs(cls, cfg, num_classes: int) -> dict:
        from kcd_ray.data.groups import ClassGroups

        return {"groups": ClassGroups.from_config(cfg.curriculum, num_classes), "curriculum": cfg.curriculum}

    def __init__(self, student, teacher, cfg, num_classes, *, groups=None, curriculum=None, **kw):
        from kcd_ray.models.growing import GrowingStudent

        if groups is None or curriculum is None:
            raise ConfigError("distill.method: 'ed' runs with curriculum.name=ed (it needs the class groups)")
        if groups.num_classes != int(num_classes):
            raise ValueError(f"ed: class groups cover {groups.num_classes} classes, the data set has {num_classes}")
        if not isinstance(student, GrowingStudent):
            identity = (groups.order == torch.arange(groups.num_classes).numpy()).all()
            order = None if identity else torch.as_tensor(groups.order)
            student = GrowingStudent(student, [groups.seen(g) for g in range(1, groups.num_groups + 1)], order,
                                     tr_relu=curriculum.tr_relu, tr1_grid=curriculum.tr1_grid)
        super().__init__(student, None, cfg, num_classes, **kw)
        self.tr_heads = student.tr_heads  # trained and checkpointed with the run (distiller_extra)
        self.groups = groups
        self.sliced = curriculum.teacher_source == "sliced"
        self.alpha_ce = float(curriculum.alpha)
        self.gamma, self.alpha = self.alpha_ce, 1.0 - self.alpha_ce  # CE / KD weights, as other code reads them
        teachers = _as_list(teacher)
        self._check_teachers(teachers)
        self._hold(teachers)
        self.register_buffer("position", torch.as_tensor(groups.position), persistent=False)
        g_of_pos = torch.repeat_interleave(torch.arange(groups.num_groups), torch.as_tensor(groups.sizes))
        self.register_buffer("group_of_position", g_of_pos, persistent=False)
        self.offsets = [groups.offset(g) for g in range(1, groups.num_groups + 1)]

    def _check_teachers(self, teachers: list) -> None:
        g = self.groups
        if self.sliced:
            want = [g.num_classes]
            where = "distill.teacher (teacher_source=sliced: one full-label teacher)"
        else:
            want = list(g.sizes)
            where = "curriculum.teachers (one per group, n_g outputs)"
        have = [getattr(t, "num_classes", None) for t in teachers]
        if len(teachers) != len(want) or any(h is not None and h != w for h, w in zip(have, want)):
            raise ConfigError(f"{where}: expected {len(want)} teacher(s) with {want} outputs, got {len(teachers)} "
                              f"with {have}")

    @property
    def find_unused_parameters(self) -> bool:
        return True  # inactive stages and the other grades' heads are outside the graph

    @property
    def grade(self) -> int:
        return self.student.grade

    def set_grade(self, grade: int) -> None:
        self.student.set_grade(grade)

    def _teacher_rows(self, image: torch.Tensor, h: int, idx: torch.Tensor, full: Optional[torch.Tensor]):
        if full is not None:  # sliced: the full-label teacher's logits at group h's classes
            cls = torch.as_tensor(self.groups.classes(h + 1), device=full.device)
            return full[idx][:, cls]
        return self._teachers[h](image[idx]).detach()

    def forward(self, batch: dict, T: float, epoch: int, init_stage: bool = False) -> StepOutput:
        image, label = batch["image"], batch["label"]
        T = self.step_temperature(T, epoch)
        g = self.student.grade
        z = self.student.grade_logits(image)  # [B, K_g], class-position order
        pos = self.position[label]
        grp = self.group_of_position[pos]
        order = torch.argsort(grp, stable=True)
        counts = torch.bincount(grp, minlength=g).tolist()  # the one host read of the step
        if len(counts) > g:
            raise ValueError(f"ed: a batch holds classes of group {len(counts)} in grade {g} (the data selection "
                             "serves groups 1..g only)")
        per = {"ce": self.alpha_ce * F.cross_entropy(f32(z), pos, reduction="none")} if self.alpha_ce > 0 else {}
        kl_rows = z.new_zeros(z.shape[0], dtype=torch.float32)
        t_pos = torch.empty_like(z.detach(), dtype=torch.float32)
        with torch.no_grad():
            full = self._teachers[0](image).detach() if self.sliced else None
        start = 0
        for h, n in enumerate(counts):
            if n == 0:
                continue
            idx = order[start:start + n]
            start += n
            o, k = self.offsets[h], self.groups.sizes[h]
            with torch.no_grad():
                t = f32(self._teacher_rows(image, h, idx, full))
            s = f32(z[idx, o:o + k])
            log_p = F.log_softmax(s / T, dim=1)
            log_q = F.log_softmax(t / T, dim=1)
            kl_rows = kl_rows.index_put((idx,), (log_q.exp() * (log_q - log_p)).sum(1))
            with torch.no_grad():  # a full-width row for KCD's teacher-based values: the teacher inside its group
                row = (t.amin(dim=1, keepdim=True) - 50.0).expand(n, z.shape[1]).clone()
                row[:, o:o + k] = t
                t_pos[idx] = row
        if self.alpha_ce < 1.0:
            per["kd"] = (1.0 - self.alpha_ce) * (T * T) * kl_rows
        if not per:
            raise ConfigError("curriculum.alpha: the ed loss needs alpha < 1 or a CE term")
        return StepOutput(self.student.to_label_order(z), {k: v.mean() for k, v in per.items()},
                          self.student.to_label_order(t_pos), per)
