"""The run plan's types: every decision a run makes before it trains, frozen and typed, with no Ray in them.

A :class:`RunPlan` is made once on the driver (``kcd_ray.engine.plan.plan_run``), printed by
``kcd-ray distill --dry-run``, executed by the Ray layer (``kcd_ray.ray_layer.trainer.execute``) and handed to
every Train worker, which builds its engine from it (``kcd_ray.engine.assemble.assemble_engine``): nothing
downstream re-derives what the plan holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from kcd_ray.config import Config


@dataclass(frozen=True)
class DataPlan:
    """The prepared data set the run reads."""

    dir: str  # the prepared folder (a local working copy for a data set in an object store)
    uri: str  # the data set's URI in an object store; "" for a local one
    name: str
    num_train: int
    num_test: int
    num_val: int  # rows of the validation split (data.val_fraction); 0 = none
    num_classes: int
    image_shape: tuple  # (H, W, C)
    augment: str  # the resolved augmentation kind (cifar, imagenet, none)


@dataclass(frozen=True)
class FolderPlan:
    """The run folder and what starting the run there means."""

    name: str
    path: str  # the folder (a local working copy for a run in an object store)
    remote: str  # the run's URI in an object store; "" for a local run
    start: str  # "new": nothing to resume; "resume": checkpoints and a compatible config.yaml are there
    epochs_done: int = 0  # epochs in its metrics.jsonl
    start_epoch: int = 0  # the epoch training starts at: the resumed checkpoint's epoch + 1 (its manifest's)
    checkpoint: Optional[str] = None  # the newest checkpoint a resume starts from
    changes: tuple = ()  # (key, old, new) config changes a resume accepts
    replace: bool = False  # run.resume=never over an existing run: the old folder is moved aside first

    @property
    def where(self) -> str:
        return self.remote or self.path


@dataclass(frozen=True)
class TeacherPlan:
    """Where the teacher's knowledge comes from."""

    method: str  # distill.method ("ce" for a teacher run)
    files: tuple = ()  # (config key, checkpoint) of every teacher file the run reads
    to_train: tuple = ()  # (group, checkpoint, teacher Config) of group teachers trained before the run
    in_loop: bool = True  # Train workers load the teacher (no cache, or rows the cache cannot serve)
    note: str = ""  # why the teacher stays in the loop although a cache was asked for ("" otherwise)


@dataclass(frozen=True)
class SelectionPlan:
    """The one data-selection strategy and what it is expected to train on."""

    name: str
    cls: type  # the registered SelectionStrategy subclass (travels to the workers with the plan)
    info: dict  # label, colour, marker, config sections: what reports draw
    params: dict  # the values of its config sections (after any resolution): what it runs with
    images_made: str  # "", "rows" or "batches" (see kcd_ray.engine.selection.base)
    feed_batch_size: int  # rows per batch the data feed serves each worker
    trained: tuple  # planned share of the training set trained on, per epoch
    forward_only: tuple  # planned share run through the student forward-only, per epoch
    forward_only_teacher: bool = False  # whether those passes use the teacher's outputs too (KCD's offline E-step)
    budget: Optional[float] = None  # selection.budget, when the run has one
    resolved: dict = field(default_factory=dict)  # {config key: value} the budget set


@dataclass(frozen=True)
class ComputePlan:
    """FLOPs per sample (the compute ledger's estimate, measured on meta-device copies) and the expected ratios
    against plain KD over the same epochs."""

    student_forward: float
    student_backward: float
    teacher_forward: float
    planned_compute_ratio: float
    planned_sample_ratio: float


@dataclass(frozen=True)
class InputPlan:
    """How the Ray Data pipeline serves the training set."""

    augment_on: str  # worker | split | pipeline, or "auto" until the cluster's GPUs are known
    shuffle: str  # data.shuffle (full = auto)
    passes: Optional[tuple] = None  # a curriculum's sequential passes: the pass of each class, else None
    seed: int = 0


@dataclass(frozen=True)
class ResourcePlan:
    num_workers: int  # 0: the loop runs in the driver
    min_workers: int  # elastic: as few as this many; 0 = fixed
    cpus_per_worker: float
    gpus_per_worker: float
    use_gpu: str  # "true" | "false" | "auto" (resolved against the cluster by the Ray layer)
    data_cpus: float  # per Ray Data task
    placement: str

    @property
    def elastic(self) -> bool:
        return 0 < self.min_workers < self.num_workers


@dataclass(frozen=True)
class RunPlan:
    cfg: Config  # the run's config, paths resolved (what trains; config.yaml records it)
    kind: str  # "teacher" or "distill"
    data: DataPlan
    folder: FolderPlan
    teacher: TeacherPlan
    selection: SelectionPlan
    compute: ComputePlan
    inputs: InputPlan
    resources: ResourcePlan
    select: str = "top1"  # the per-epoch metric that picks the best epoch (run.select, resolved)
    cache: Any = None  # the teacher-output cache's CacheSpec when the run reads it (completed once built)
    cache_note: str = ""  # what the cache does for this run, in words
    hooks: tuple = field(default=())  # extra hooks: (Hook subclass, kwargs) pairs (tests and drills)

    def replace(self, **changes) -> "RunPlan":
        return dataclasses.replace(self, **changes)
