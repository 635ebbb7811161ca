"""Curricula as engine hooks: education distillation's grades (``ed``) and class subsets (``class_subset``).

``ed`` (docs/methods/ed.md §3, §7, §8), with the ``ed`` distiller (:mod:`kcd_ray.distill.multi_teacher`) over a
growing student (:mod:`kcd_ray.models.growing`):

- ``before_epoch``: the epoch's grade from ``curriculum.grade_epochs``; at a grade change the new stage and the
  fresh ``TR_{g+1}`` head (built at construction, untouched so far) start running, and the optimiser's state is
  dropped: with every parameter already in the one SGD, clearing its momentum buffers is exactly "a new SGD over
  all parameters, momentum reset, learning rate carried over" (docs/methods/ed.md §7), and the optimiser object, its
  checkpoint layout and DDP stay as they are (the ed distiller makes DDP tolerate unused parameters).
  ``lr_mode=per_grade`` sets the epoch's rate (restart at ``optim.lr``, x ``lr_decay`` at 62.5/75/87.5% of the
  grade); ``global`` leaves ``optim``'s schedule alone (docs/methods/ed.md §7: grades change at its first milestones).
- ``data_selection``: the training samples of groups 1..g (the engine intersects it with KCD's mask and
  publishes it; the pipeline serves one shuffled pass over that union with ``mix_groups=true``, else ED's
  sequential passes over D_1..D_g: ``pipeline.train_dataset(passes=sequential_passes(...))``).
- ``after_epoch``: ``grade``, ``active_classes`` (K_g), ``seen_class_top1`` (test samples of the seen classes,
  the K_g-way head, eval mode: docs/methods/ed.md §3's monitoring) and ``group_top1_<h>`` per group seen so far,
  from its own pass over the engine's test batches (``engine.test_batches``); ``complete_model`` (the last grade:
  the model is the zoo student). ``top1`` stays the engine's: the whole test split, unseen classes counted as errors.
- ``state_dict``: the grade of the last epoch begun, so a resume knows whether it resumes across a change.

``class_subset`` serves and evaluates only ``curriculum.only_groups``' classes (a group teacher's run; the
relabelling to local labels is :func:`kcd_ray.data.groups.relabel_batches` in the batch feed).

A curriculum is one class registered in ``CURRICULA`` (``curriculum.name``) declaring, on itself, its config
checks, its sequential passes and the teachers it needs trained first (:class:`Curriculum`). Also the pure
helpers the plan and the builder use: :func:`check_curriculum`, :func:`check_classes`, :class:`GradeSchedule`,
:func:`group_teacher_config` / :func:`group_teacher_paths`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch

from kcd_ray import storage
from kcd_ray.config import Config, ConfigError, CurriculumConfig, config_digest, config_from_dict, to_dict
from kcd_ray.data.groups import ClassGroups, class_mask, labels_by_id
from kcd_ray.engine import distributed as D
from kcd_ray.engine.hooks import HOOKS, Hook, Selection
from kcd_ray.engine.metrics import say
from kcd_ray.engine.rundir import slug
from kcd_ray.registry import Registry

PER_GRADE_DECAYS = (0.625, 0.75, 0.875)  # docs/methods/ed.md §7, lr_mode=per_grade: 150/180/210 of 240, per grade


# --------------------------------------------------------------------------- what a curriculum declares

CURRICULA: Registry[type] = Registry("curriculum", aliases=("none",))


class Curriculum(Hook):
    """A curriculum (``curriculum.name``): a hook that decides which classes each epoch trains on, registered in
    ``CURRICULA``, declaring what the driver and the data pipeline need to know before the run starts."""

    label = ""

    @classmethod
    def check(cls, cfg: Config, kind: str) -> None:
        """Cross-field checks against the rest of the config (one-line ConfigErrors), before anything runs."""

    @classmethod
    def check_classes(cls, cfg: Config, num_classes: int) -> None:
        """Checks that need the data set's class count (before any group teacher trains)."""

    @classmethod
    def sequential_passes(cls, cfg: Config, num_classes: int) -> Optional[np.ndarray]:
        """int[K]: the pass of each class when an epoch serves the classes in passes, else None."""
        return None

    @classmethod
    def teachers_to_train(cls, cfg: Config) -> list[tuple[int, str, Optional[Config]]]:
        """(group, checkpoint location, teacher config or None when it exists) of teachers trained first."""
        return []

    @classmethod
    def with_teachers(cls, cfg: Config, paths: list) -> Config:
        """The config once ``teachers_to_train`` exist at ``paths``."""
        return cfg


def curriculum_class(cfg: Config) -> Optional[type]:
    name = cfg.curriculum.name
    return None if name == "none" else CURRICULA.get(name)


def check_curriculum(cfg: Config, kind: str) -> None:
    """Cross-field checks of ``curriculum`` against the rest of the config; one-line ConfigErrors."""
    cur = cfg.curriculum
    if cur.labels == "local" and not cur.only_groups:
        raise ConfigError("curriculum.labels: local labels need curriculum.only_groups (the groups a teacher learns)")
    if cfg.distill.method == "ed" and cur.name != "ed" and kind == "distill":
        raise ConfigError("distill.method: 'ed' needs curriculum.name=ed (the grades and the growing student)")
    cls = curriculum_class(cfg)
    if cls is not None:
        cls.check(cfg, kind)


def check_classes(cfg: Config, num_classes: int) -> None:
    """The class groups fit the data set (before any teacher trains): one line naming the key otherwise."""
    cur = cfg.curriculum
    if cur.name != "none" or cur.only_groups:
        try:
            ClassGroups.from_config(cur, num_classes)
        except ValueError as e:  # ClassGroups names its key (curriculum.groups, group_sizes, ...) itself
            text = str(e)
            raise ConfigError(text if text.startswith("curriculum.") else f"curriculum.groups: {text}") from None
    cls = curriculum_class(cfg)
    if cls is not None:
        cls.check_classes(cfg, num_classes)


def sequential_passes(cfg: Config, num_classes: int) -> Optional[np.ndarray]:
    """int[K]: the pass of each class when the curriculum serves an epoch in passes (ED's sequential passes over
    D_1..D_g), else None (one shuffled pass)."""
    cls = curriculum_class(cfg)
    return None if cls is None else cls.sequential_passes(cfg, num_classes)


def run_groups(cfg: Config, num_classes: int) -> Optional[ClassGroups]:
    cur = cfg.curriculum
    if cur.name == "none" and not cur.only_groups:
        return None
    return ClassGroups.from_config(cur, num_classes)


# --------------------------------------------------------------------------- grades and learning rate


class GradeSchedule:
    """Grade of each (0-based) epoch and, for ``lr_mode=per_grade``, its learning rate (docs/methods/ed.md §7)."""

    def __init__(self, grade_epochs, lr_mode: str = "global", lr: float = 0.05, lr_decay: float = 0.1):
        self.grade_epochs = [int(e) for e in grade_epochs]
        self.starts = [int(s) for s in np.cumsum([0] + self.grade_epochs[:-1])]
        self.lr_mode, self.base_lr, self.decay = lr_mode, float(lr), float(lr_decay)

    @property
    def num_grades(self) -> int:
        return len(self.grade_epochs)

    def grade_of(self, epoch: int) -> int:
        return int(np.searchsorted(self.starts, int(epoch), side="right"))

    def start(self, grade: int) -> int:
        return self.starts[grade - 1]

    def lr(self, epoch: int) -> Optional[float]:
        """per_grade: ``optim.lr * lr_decay^#{f : local epoch >= floor(f * grade epochs)}``; global: None."""
        if self.lr_mode != "per_grade":
            return None
        g = self.grade_of(epoch)
        local, n = int(epoch) - self.start(g), self.grade_epochs[g - 1]
        return self.base_lr * self.decay ** sum(local >= int(f * n) for f in PER_GRADE_DECAYS)


# --------------------------------------------------------------------------- hooks


def check_ed(cfg: Config, kind: str) -> None:
    """ED's cross-field checks: its loss, its grades against the epochs, what its pipeline can serve."""
    cur = cfg.curriculum
    if kind != "distill":
        raise ConfigError("curriculum.name: ed is a distillation; a group teacher trains with curriculum.name=none "
                          "curriculum.only_groups=[g] curriculum.labels=local (kcd-ray distill trains missing ones)")
    if cfg.distill.method != "ed":
        raise ConfigError(f"distill.method: curriculum.name=ed trains with the ed loss; set distill.method=ed "
                          f"(got {cfg.distill.method!r})")
    if cur.only_groups:
        raise ConfigError("curriculum.only_groups: not used with curriculum.name=ed (its grades choose the groups)")
    if len(cur.grade_epochs) != cur.groups:
        raise ConfigError(f"curriculum.grade_epochs: {len(cur.grade_epochs)} grades for curriculum.groups={cur.groups}")
    if min(cur.grade_epochs) < 1 or sum(cur.grade_epochs) != cfg.optim.epochs:
        raise ConfigError(f"curriculum.grade_epochs: {cur.grade_epochs} must be >= 1 each and sum to optim.epochs="
                          f"{cfg.optim.epochs}")
    if cfg.kcd.enabled and cfg.kcd.estep == "offline":
        raise ConfigError("kcd.estep: offline scoring runs the native student head; with curriculum.name=ed use "
                          "kcd.estep=online (values from the grade's own forward passes)")
    if cur.teacher_source == "sliced" and not cfg.distill.teacher:
        raise ConfigError("distill.teacher: curriculum.teacher_source=sliced slices one full-label teacher checkpoint")
    if not cur.mix_groups and cfg.data.shuffle not in ("auto", "full"):
        raise ConfigError(f"curriculum.mix_groups: false (ED's sequential passes over D_1..D_g in each epoch) needs "
                          f"data.shuffle=full, got {cfg.data.shuffle!r}; or set curriculum.mix_groups=true")


def _train_labels(data_dir, labels) -> np.ndarray:
    return np.asarray(labels) if labels is not None else labels_by_id(data_dir, "train")


@CURRICULA.register("ed")
class EDCurriculum(Curriculum):
    name = "ed"
    label = "education distillation"
    columns = ("grade", "grades", "active_classes", "active_samples", "seen_class_top1")
    column_prefixes = ("group_top1_",)

    @classmethod
    def check(cls, cfg: Config, kind: str) -> None:
        check_ed(cfg, kind)

    @classmethod
    def sequential_passes(cls, cfg: Config, num_classes: int) -> Optional[np.ndarray]:
        if cfg.curriculum.mix_groups:
            return None
        return np.asarray(ClassGroups.from_config(cfg.curriculum, num_classes).group_of_label, np.int64)

    @classmethod
    def teachers_to_train(cls, cfg: Config) -> list[tuple[int, str, Optional[Config]]]:
        return group_teacher_paths(cfg) if cfg.curriculum.teacher_source == "per_group" else []

    @classmethod
    def with_teachers(cls, cfg: Config, paths: list) -> Config:
        return with_teachers(cfg, paths) if paths else cfg

    def __init__(self, cfg: Config, num_classes: int, data_dir=None, labels=None):
        cur = cfg.curriculum
        self.cfg = cfg
        self.groups = ClassGroups.from_config(cur, num_classes)
        self.labels = _train_labels(data_dir, labels)
        self.schedule = GradeSchedule(cur.grade_epochs, cur.lr_mode, cfg.optim.lr, cfg.optim.lr_decay)
        self.grade: Optional[int] = None  # the grade of the last epoch begun (checkpointed)
        self._masks: dict[int, np.ndarray] = {}
        self._eval: Optional[dict] = None
        self._eval_grade: Optional[int] = None
        self._position = torch.as_tensor(self.groups.position)
        self._group_of_label = torch.as_tensor(self.groups.group_of_label)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        return {"grade": self.grade}

    def load_state_dict(self, state: dict) -> None:
        self.grade = state.get("grade")

    # ------------------------------------------------------------------ hooks
    def before_run(self, engine, start_epoch: int) -> None:
        if not hasattr(engine.distiller, "set_grade"):
            raise ConfigError("curriculum.name: ed needs distill.method=ed (a distiller over the growing student)")

    def before_epoch(self, engine, epoch: int) -> None:
        g = self.schedule.grade_of(epoch)
        if self.grade is not None and g != self.grade:
            # A new SGD over all parameters with the current learning rate == the same SGD without momentum buffers.
            engine.optimizer.state.clear()
            if engine.ctx.verbose:
                say(f"[kcd_ray] ed: grade {g}/{self.groups.num_groups} from epoch {epoch + 1}: "
                    f"{self.groups.seen(g)} classes, stage and head of grade {g} join, momentum reset")
        self.grade = g
        engine.distiller.set_grade(g)
        lr = self.schedule.lr(epoch)
        if lr is not None:
            for group in engine.optimizer.param_groups:
                group["lr"] = lr

    def mask(self, grade: int) -> np.ndarray:
        if grade not in self._masks:
            self._masks[grade] = class_mask(self.labels, self.groups.seen_classes(grade))
        return self._masks[grade]

    def data_selection(self, engine) -> Optional[Selection]:
        return Selection(kept=self.mask(self.grade or 1))

    def universe(self, engine) -> np.ndarray:
        """What a data-selection strategy selects within this epoch (KCD's M-step: the active groups)."""
        return self.mask(self.grade or 1)

    def after_epoch(self, engine, epoch: int, row: dict) -> None:
        g, G = self.grade, self.groups.num_groups
        if self._eval is None or row.get("evaluated", True) or self._eval_grade != g:
            self._eval, self._eval_grade = self._evaluate(engine, g), g
        row.update(grade=g, grades=G, active_classes=self.groups.seen(g), complete_model=g == G,
                   active_samples=int(self.mask(g).sum()), **self._eval)

    def end_run(self, engine, summary) -> None:
        if summary is None:
            return
        hist = engine.history
        ends = [next((r for r in reversed(hist) if r.get("grade") == g), None)
                for g in range(1, self.groups.num_groups + 1)]
        summary["curriculum"] = {
            "name": "ed", "group_sizes": list(self.groups.sizes), "class_order": self.groups.order.tolist(),
            "grade_epochs": self.schedule.grade_epochs,
            "seen_class_top1_at_grade_end": [None if r is None else r.get("seen_class_top1") for r in ends],
            "group_top1_final": [hist[-1].get(f"group_top1_{h}") for h in range(1, self.groups.num_groups + 1)],
        }

    # ------------------------------------------------------------------ seen-class evaluation
    def _evaluate(self, engine, g: int) -> dict:
        """Top-1 of the K_g-way model on the test samples of groups 1..g, and per group (counts all-reduced)."""
        G = self.groups.num_groups
        batches = getattr(engine, "test_batches", None)
        out = {"seen_class_top1": None, **{f"group_top1_{h}": None for h in range(1, G + 1)}}
        if batches is None:
            return out
        student, dev = engine.distiller.student, engine.device
        pos_t, grp_t = self._position.to(dev), self._group_of_label.to(dev)
        k_g = self.groups.seen(g)
        hits = torch.zeros(G, dtype=torch.float64, device=dev)
        count = torch.zeros(G, dtype=torch.float64, device=dev)
        rank, world = engine.ctx.rank, engine.ctx.world
        engine.distiller.eval()
        with torch.no_grad():
            for i, batch in enumerate(batches()):
                if i % world != rank:
                    continue
                x = batch["image"].to(dev, non_blocking=True)
                y = batch["label"].to(dev, non_blocking=True).long()
                with engine.parts.amp_ctx:
                    z = student.grade_logits(x, g)
                pos, grp = pos_t[y], grp_t[y] - 1
                seen = pos < k_g
                hit = seen & (z.argmax(dim=1) == pos)
                hits += torch.bincount(grp[hit], minlength=G).double()
                count += torch.bincount(grp[seen], minlength=G).double()
        sums = D.all_sum(list(hits) + list(count), dev)
        h, c = sums[:G], sums[G:]
        out["seen_class_top1"] = 100.0 * sum(h) / max(sum(c), 1.0)
        for i in range(g):
            out[f"group_top1_{i + 1}"] = 100.0 * h[i] / max(c[i], 1.0)
        return out


@HOOKS.register("class_subset")
class ClassSubset(Hook):
    """Serve only the training samples of ``curriculum.only_groups``' classes."""

    columns = ("active_classes", "active_samples")

    def __init__(self, cfg: Config, num_classes: int, data_dir=None, labels=None):
        groups = ClassGroups.from_config(cfg.curriculum, num_classes)
        self.classes = groups.subset_classes(cfg.curriculum.only_groups)
        self.kept = class_mask(_train_labels(data_dir, labels), self.classes)

    def data_selection(self, engine) -> Optional[Selection]:
        return Selection(kept=self.kept)

    def universe(self, engine) -> np.ndarray:
        return self.kept

    def after_epoch(self, engine, epoch: int, row: dict) -> None:
        row.update(active_classes=int(self.classes.size), active_samples=int(self.kept.sum()))


def curriculum_hooks(cfg: Config, kind: str, data_dir) -> list[Hook]:
    """The curriculum's hook for ``run_hooks`` (before KCD's, whose condensation ranges over its selection)."""
    if cfg.curriculum.name == "none" and not cfg.curriculum.only_groups:
        return []
    from kcd_ray.data import load_meta

    num_classes = int(load_meta(data_dir)["num_classes"])
    cls = curriculum_class(cfg)
    if cls is not None and kind == "distill":
        return [cls(cfg, num_classes, data_dir)]
    return [ClassSubset(cfg, num_classes, data_dir)]


# --------------------------------------------------------------------------- group teachers (driver side, pure)

_TEACHER_KEEP = ("groups", "group_sizes", "class_order", "seed")


def group_teacher_config(cfg: Config, g: int) -> Config:
    """The config of group g's teacher run: ``curriculum.teacher_model`` on the group's classes with local labels
    (``n_g`` outputs), the student's data, optimiser (``teacher_epochs`` epochs) and scaling, no KCD."""
    cur = cfg.curriculum
    if not cur.teacher_model:
        raise ConfigError("curriculum.teacher_model: name the group teachers' architecture (they are trained when "
                          "curriculum.teachers does not list existing checkpoints)")
    d = to_dict(cfg)
    keep = {k: d["curriculum"][k] for k in _TEACHER_KEEP}
    d["curriculum"] = {**to_dict(CurriculumConfig()), **keep, "only_groups": [int(g)], "labels": "local"}
    d["model"] = cur.teacher_model
    d["model_kwargs"] = dict(cfg.distill.teacher_kwargs)  # the group teachers are built as the teacher is
    d["optim"]["epochs"] = cur.teacher_epochs or cfg.optim.epochs
    d["distill"] = to_dict(Config().distill)
    d["kcd"]["enabled"] = False
    run = dict(d["run"], name="")
    d["run"] = run
    d["run"]["name"] = teacher_run_name(config_from_dict(d), g)
    return config_from_dict(d)


def teacher_run_name(teacher_cfg: Config, g: int) -> str:
    digest = config_digest(teacher_cfg)
    cur = teacher_cfg.curriculum
    return slug(f"edteacher-{teacher_cfg.model}-{teacher_cfg.data.name}-g{g}of{cur.groups}-{digest}")


def group_teacher_paths(cfg: Config) -> list[tuple[int, str, Config]]:
    """(group, checkpoint location, teacher config) per group: ``curriculum.teachers`` when given, else the
    teacher run's ``final_model.pt`` under ``run.storage_path``; a location is an absolute path or a URI."""
    cur = cfg.curriculum
    if cur.teachers and len(cur.teachers) != cur.groups:
        raise ConfigError(f"curriculum.teachers: {len(cur.teachers)} checkpoints for curriculum.groups={cur.groups}")
    out = []
    for g in range(1, cur.groups + 1):
        listed = storage.absolute(cur.teachers[g - 1]) if cur.teachers else ""
        tcfg = group_teacher_config(cfg, g) if not (listed and storage.exists(listed)) else None
        out.append((g, listed or storage.join(storage.absolute(cfg.run.storage_path), tcfg.run.name, "final_model.pt"),
                    tcfg))
    return out


def with_teachers(cfg: Config, paths: list) -> Config:
    return dataclasses.replace(cfg, curriculum=dataclasses.replace(cfg.curriculum, teachers=[str(p) for p in paths]))
