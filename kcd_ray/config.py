"""Typed run configuration: dataclasses, loaded from YAML, overridden with dotted ``key=value``.

Every field is checked when the config is built: an unknown key, a value of the wrong type,
a value out of range or a name that is not registered fails at once with a one-line
``ConfigError`` naming the dotted key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from kcd_ray.registry import registry_accepts, registry_names


class ConfigError(ValueError):
    """A bad configuration value; the message names the dotted key."""


def _f(default=dataclasses.MISSING, *, factory=None, choices=None, ge=None, gt=None, le=None, lt=None, help=""):
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "help": help}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections


@dataclass
class SyntheticConfig:
    num_train: int = _f(2000, ge=1, help="training samples")
    num_test: int = _f(500, ge=1, help="test samples")
    num_classes: int = _f(10, ge=2)
    image_size: int = _f(32, ge=4)
    duplicate_fraction: float = _f(0.0, ge=0.0, lt=1.0, help="share of train samples that are near-copies of a few easy prototypes")
    noise: float = _f(0.35, ge=0.0, help="pixel noise of the hard samples, in units of the class-pattern contrast")
    seed: int = 0


@dataclass
class DataConfig:
    name: str = _f("digits", choices="datasets", help="registered dataset: digits, synthetic, cifar10, cifar100, folder")
    root: str = _f("~/.cache/kcd_ray/data", help="folder holding the prepared Parquet data sets")
    source: str = _f("", help="raw source folder (CIFAR pickle folder, or an image folder with train/ and test/ or val/)")
    image_size: int = _f(32, ge=8, help="digits: resize 8x8 handwriting to this size; folder: eval/crop size")
    augment: str = _f("auto", choices=("auto", "cifar", "imagenet", "none"), help="auto picks cifar for <=64px, imagenet above")
    download: bool = _f(False, help="CIFAR: let torchvision fetch the archive when the folder is missing")
    shuffle: str = _f("auto", choices=("auto", "full", "block_local", "block_local_files"), help="per-epoch row order: full (= auto) a uniform permutation of the kept set seeded by (seed, epoch); block_local: rows mixed only inside 1024-row blocks, file and block order reshuffled (block order up to 2 GiB); block_local_files: the same without block order")
    shuffle_buffer: int = _f(0, ge=0, help="rows of an extra consumer-side shuffle buffer per worker (costs trainer CPU)")
    augment_on: str = _f("auto", choices=("auto", "worker", "split", "pipeline"),
                         help="where training augmentation runs: worker (uint8 rows cross Ray Data, crop/flip and "
                              "normalisation on the worker's device), split (the pixel-exact crop/flip in Ray Data's "
                              "tasks, normalisation on the worker), pipeline (all in Ray Data's tasks, float rows); "
                              "auto = worker on GPU workers, split on CPU workers (measured faster there)")
    synthetic: SyntheticConfig = _f(factory=SyntheticConfig)


@dataclass
class OptimConfig:
    epochs: int = _f(30, ge=1)
    batch_size: int = _f(64, ge=1, help="per-worker batch size")
    lr: float = _f(0.05, gt=0.0)
    momentum: float = _f(0.9, ge=0.0, lt=1.0)
    weight_decay: float = _f(5e-4, ge=0.0)
    nesterov: bool = False
    scheduler: str = _f("multistep", choices=("multistep", "cosine", "constant"))
    milestones: list[int] = _f(factory=lambda: [150, 180, 210], help="multistep epochs (per epoch, never per step)")
    lr_decay: float = _f(0.1, gt=0.0, le=1.0)
    warmup_epochs: int = _f(0, ge=0, help="linear LR warm-up epochs")
    amp: bool = _f(False, help="mixed precision on GPU (bf16 if supported, else fp16 with a grad scaler)")
    channels_last: bool = _f(False, help="GPU: channels-last memory format for the models and the batches")
    seed: int = 0
    eval_every: int = _f(1, ge=1)
    eval_batch_size: int = _f(256, ge=1)
    threads: int = _f(0, ge=0, help="torch threads per worker; 0 = the worker's CPU share, rounded up")


@dataclass
class ScalingConfig:
    num_workers: int = _f(1, ge=0, help="Ray Train workers; 0 runs the loop in-process")
    cpus_per_worker: float = _f(1.0, gt=0.0)
    use_gpu: str = _f("auto", choices=("auto", "true", "false"))
    gpus_per_worker: float = _f(1.0, gt=0.0)
    placement_strategy: str = _f("PACK", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    data_cpus: float = _f(0.25, gt=0.0, help="CPUs reserved per Ray Data task (decode/augment)")
    min_workers: int = _f(0, ge=0, help="elastic: below num_workers, the run may go on (and start) with as few as "
                                       "this many workers, growing back to num_workers (Ray Train's elastic "
                                       "ScalingConfig); the global batch optim.batch_size x num_workers stays; 0 = fixed")
    resize_interval_s: float = _f(60.0, gt=0.0, help="elastic: how often Ray Train considers resizing a healthy run")


@dataclass
class RunConfig:
    name: str = _f("", help="run name; re-running with the same name resumes. Empty: derived from the config")
    storage_path: str = _f("./runs", help="where run folders go; shared storage (NFS, s3://, gs://) on a cluster")
    max_failures: int = _f(0, ge=-1, help="worker-group restarts from the last checkpoint; -1 = unlimited")
    checkpoints_to_keep: int = _f(2, ge=1)
    ray_address: str = _f("", help="'' = embedded local Ray (or RAY_ADDRESS); 'auto' = attach to a running cluster")
    num_cpus: int = _f(0, ge=0, help="local Ray only: CPUs to give it (0 = all)")
    verbose: int = _f(1, ge=0, le=2)
    resume: str = _f("auto", choices=("auto", "force", "never"),
                     help="re-running a run name: auto resumes if the config matches (run.*, scaling.*, optim.epochs may "
                          "change), force resumes with any change, never starts afresh (the old folder is moved aside)")
    trackers: list[str] = _f(factory=list, choices=("tensorboard", "mlflow"),
                             help="experiment trackers rank 0 logs to (pip install 'kcd_ray[tracking]'): tensorboard "
                                  "(events in <run folder>/tensorboard), mlflow (metrics, config, artifacts)")
    tracking_uri: str = _f("", help="MLflow tracking URI (sqlite:///..., http://server:5000, databricks); '' = "
                                    "sqlite:///<run folder>/mlflow.db, for a sweep's trials <sweep folder>/mlflow.db")
    experiment: str = _f("", help="MLflow experiment; '' = the sweep's name for a sweep's trials, else kcd_ray")
    sweep: str = _f("", help="set by `kcd-ray sweep` on each trial: the sweep's name (trackers group trials by it)")


@dataclass
class TemperatureConfig:
    schedule: str = _f("constant", choices="temperatures", help="constant, linear, cosine, step, exponential")
    T: float = _f(4.0, gt=0.0, help="start (or constant) temperature")
    T_end: float = _f(4.0, gt=0.0, help="final temperature for linear/cosine/exponential")
    milestones: list[int] = _f(factory=list, help="step: epochs at which T changes")
    values: list[float] = _f(factory=list, help="step: T after each milestone")


@dataclass
class DistillConfig:
    method: str = _f("kd", choices="distillers", help="registered distiller")
    teacher: str = _f("", help="teacher checkpoint (kcd_ray or RepDistiller format)")
    teacher_model: str = _f("", choices="models", help="teacher architecture (a zoo name, torchvision/<name> or "
                                                      "package.module:callable), needed for RepDistiller checkpoints "
                                                      "and plain state dicts; kcd_ray checkpoints record it")
    teacher_kwargs: dict = _f(factory=dict, help="constructor arguments of a torchvision or factory teacher (e.g. "
                                                 "image_size for ViT); kcd_ray checkpoints record them")
    student_taps: list[str] = _f(factory=list, help="feature methods, torchvision/factory student: graph nodes giving "
                                                    "feats[:-1] (`kcd-ray models --nodes NAME`); empty = its family's "
                                                    "stage outputs. The pooled pre-logit vector is appended")
    teacher_taps: list[str] = _f(factory=list, help="the same for the teacher")
    gamma: float = _f(0.1, ge=0.0, help="weight of cross-entropy with the hard label")
    alpha: float = _f(0.9, ge=0.0, help="weight of the KD term")
    beta: Optional[float] = _f(None, help="weight of the method's own term; None = the method's default")
    temperature: TemperatureConfig = _f(factory=TemperatureConfig)
    options: dict = _f(factory=dict, help="method-specific options (e.g. feat_dim, nce_k)")
    init_epochs: int = _f(30, ge=0, help="initialisation stage for AB, FT and FSP")
    teachers: list[str] = _f(factory=list, help="mtkd: full-label teacher checkpoints (equal-weight mean of their KD "
                                                "losses); teacher_model names their architecture for RepDistiller files")
    cache: str = _f("off", choices=("off", "exact", "views"), help="teacher-output cache: exact (the teacher's output "
                                                                   "on every epoch's augmented view), views (K seeded "
                                                                   "views per sample, FKD-style) or off (teacher in "
                                                                   "the loop)")
    cache_views: int = _f(8, ge=1, help="views mode: K views per sample (K x N teacher forwards in all)")
    cache_topk: int = _f(0, ge=0, help="0: every logit in fp16; k > 0: the k largest logits and the rest's mass (FKD)")
    cache_dir: str = _f("", help="the cache folder, a path or an object-store URI; empty = <data set>/teacher_cache/<key> "
                                 "(in the data set's store when data.root is one; shared by runs and trials)")


@dataclass
class CurriculumConfig:
    """Class groups and education distillation (ED.md): grades of classes, a growing student, one teacher per group."""

    name: str = _f("none", choices=("none", "ed"), help="ed: education distillation (distill.method=ed); none: a fixed "
                                                         "student (only_groups still restricts the classes)")
    groups: int = _f(3, ge=1, help="G, the number of class groups (grades)")
    group_sizes: list[int] = _f(factory=list, help="explicit group sizes summing to the number of classes; empty = "
                                                   "floor(K/G) each, the remainder to the last (CIFAR-100: 33/33/34)")
    class_order: str = _f("identity", choices=("identity", "permuted"), help="groups of contiguous label ids, or of "
                                                                             "a permutation seeded by curriculum.seed")
    seed: int = _f(0, help="seed of the permuted class order")
    only_groups: list[int] = _f(factory=list, help="train and evaluate on these groups' classes only (1-based; a "
                                                   "group teacher's run); empty = every class")
    labels: str = _f("global", choices=("global", "local"), help="with only_groups: local labels (position within "
                                                                 "the chosen groups, y - o_g for one group) and that "
                                                                 "many outputs, or the global labels")
    grade_epochs: list[int] = _f(factory=lambda: [149, 30, 61], help="epochs of each grade; they sum to optim.epochs "
                                                                     "(ED.md 7: grades change at the first milestones)")
    lr_mode: str = _f("global", choices=("global", "per_grade"), help="global: optim's schedule runs through the "
                                                                      "grades; per_grade (flagged): restart at optim.lr "
                                                                      "each grade, x lr_decay at 62.5/75/87.5% of it")
    alpha: float = _f(0.3, ge=0.0, le=1.0, help="ed loss: alpha * CE over the K_g logits + (1 - alpha) * T^2 * KL to "
                                                "the sample's group teacher (T: distill.temperature)")
    mix_groups: bool = _f(False, help="true: batches mix the active groups, each sample routed to its group's "
                                      "teacher (what the Ray Data pipeline runs); false: sequential passes over "
                                      "D_1..D_g per epoch (ED's code; in-process feeds only)")
    teacher_source: str = _f("per_group", choices=("per_group", "sliced"), help="per_group: one teacher per group "
                                                                               "(local labels, n_g outputs); sliced "
                                                                               "(deviation): distill.teacher's logit "
                                                                               "slice of each group")
    teachers: list[str] = _f(factory=list, help="per_group: the G group teachers' checkpoints; missing ones are "
                                                "trained first (empty = <run.storage_path>/<derived name>/final_model.pt)")
    teacher_model: str = _f("", choices="models", help="architecture of the group teachers (trained when missing; "
                                                      "RepDistiller files)")
    teacher_epochs: int = _f(0, ge=0, help="epochs of a group teacher's training; 0 = optim.epochs")
    teacher_concurrency: int = _f(0, ge=0, help="group teachers trained at once when missing: 0 = as many as the "
                                                "cluster's free CPUs/GPUs hold, 1 = one after another")
    tr_relu: bool = _f(True, help="ReLU in the teaching-reference heads (ED.md 5.3)")
    tr1_grid: int = _f(1, ge=1, help="pooling grid of the grade-1 head: 1 = global; 4 = the code's resnet20 head")


@dataclass
class KCDConfig:
    enabled: bool = True
    value_fn: str = _f("entropy", choices="value_fns")
    value_T: Optional[float] = _f(None, gt=0.0, help="temperature of the kd value function; None = the distillation temperature of that epoch")
    mode: str = _f("multiple", choices=("multiple", "single"), help="global history or last epoch only")
    estep: str = _f("online", choices=("online", "offline"))
    lam: float = _f(0.03, ge=0.0, help="frequency-calibration exponent")
    n_ref: float = _f(40.0, gt=0.0)
    interval: int = _f(40, ge=1, help="condense every P epochs")
    warmup: int = _f(0, ge=0, help="no condensation before this epoch")
    rho: float = _f(0.7, gt=0.0, le=1.0, help="final kept ratio")
    stages: int = _f(6, ge=1)
    shape: str = _f("step", choices=("step", "linear", "cosine"), help="step is KCD.md's fixed decrement")
    summary: bool = _f(True, help="VAKS summary blends; false = pure selection")
    lam_min: float = _f(0.7, ge=0.0, le=1.0)
    offline_batch_size: int = _f(256, ge=1)
    offline_actors: int = _f(1, ge=1)
    seed: int = 0


@dataclass
class InfoBatchConfig:
    ratio: float = _f(0.5, ge=0.0, le=0.9, help="prune probability r of a sample whose last loss is below the mean; "
                                                "the kept ones weigh 1/(1-r)")
    delta: float = _f(0.875, gt=0.0, le=1.0, help="prune while epoch <= delta * optim.epochs (the reference code's "
                                                  "parameterisation): the last ~(1 - delta) of the epochs train on all")


@dataclass
class UnixKDConfig:
    ratio: float = _f(0.75, gt=0.0, le=1.0, help="training rows per candidate row (the reference: 48 of 64)")
    batch_size: int = _f(0, ge=0, help="training batch per worker; 0 = candidate batches of optim.batch_size and "
                                       "training batches of ratio * that (the reference); else candidates of "
                                       "batch_size / ratio")
    pure_fraction: float = _f(0.5, ge=0.0, le=1.0, help="share of a candidate batch, the most uncertain, trained "
                                                        "unmixed (the reference: 32 of 64)")
    sharpness: float = _f(1000.0, gt=0.0, help="steepness of the sigmoid between unmixed and mixed ranks")
    mixup_alpha: float = _f(1.0, gt=0.0, help="mixup weight lambda ~ Beta(alpha, alpha), one per batch")
    score: str = _f("entropy", choices=("entropy", "confidence", "margin", "random"), help="uncertainty ranking")


@dataclass
class RandomSubsetConfig:
    fraction: float = _f(0.5, gt=0.0, le=1.0, help="kept fraction of the training set, redrawn every epoch")
    follow_kcd_schedule: bool = _f(False, help="kept size per epoch from KCD's schedule (kcd.rho, interval, stages, "
                                               "warmup, shape) instead of fraction: KCD's compute, random samples")


@dataclass
class SelectionConfig:
    strategy: str = _f("auto", choices="strategies", help="data selection: auto (kcd if kcd.enabled, else none), "
                                                          "none (plain KD), kcd, infobatch, unixkd, random")
    seed: Optional[int] = _f(None, help="seed of the strategies' per-epoch draws; None = optim.seed")
    infobatch: InfoBatchConfig = _f(factory=InfoBatchConfig)
    unixkd: UnixKDConfig = _f(factory=UnixKDConfig)
    random: RandomSubsetConfig = _f(factory=RandomSubsetConfig)


@dataclass
class Config:
    model: str = _f("resnet8x4", choices="models", help="the trained network (student, or teacher in train-teacher): a "
                                                        "zoo name, torchvision/<name> or package.module:callable")
    model_kwargs: dict = _f(factory=dict, help="constructor arguments of a torchvision or factory model (e.g. "
                                               "image_size for ViT); num_classes comes from the data set")
    data: DataConfig = _f(factory=DataConfig)
    optim: OptimConfig = _f(factory=OptimConfig)
    scaling: ScalingConfig = _f(factory=ScalingConfig)
    run: RunConfig = _f(factory=RunConfig)
    distill: DistillConfig = _f(factory=DistillConfig)
    kcd: KCDConfig = _f(factory=KCDConfig)
    curriculum: CurriculumConfig = _f(factory=CurriculumConfig)
    selection: SelectionConfig = _f(factory=SelectionConfig)


# --------------------------------------------------------------------------- building


def _registry_names(kind: str) -> list[str]:
    # By name through kcd_ray.registry: config.py imports no package that imports it back (distill does).
    return registry_names(kind)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        return _float(value, key)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            if isinstance(value, bool) and key in OFF_ON_KEYS:  # YAML 1.1 reads a bare `off` as false
                return "on" if value else "off"
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


OFF_ON_KEYS = {"distill.cache"}  # string fields with an "off" choice


def _float(value: Any, key: str) -> float:
    """Every form Python's ``float()`` reads ("1e-4", "5E-4", ".5", 2), and only finite values.

    YAML 1.1 (PyYAML) loads ``1e-4`` as the string '1e-4' (no dot), so strings are parsed here too."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return value


def _check(value: Any, f: dataclasses.Field, key: str) -> None:
    m = f.metadata
    if value is None:
        return
    choices = m.get("choices")
    if choices is not None and not (value == "" and f.default == ""):  # "" where it is the default: unset
        for item in value if isinstance(value, list) else [value]:  # a list field: every item is a choice
            _check_choice(item, choices, key)
    for bound, op, word in (("ge", float.__ge__, ">="), ("gt", float.__gt__, ">"), ("le", float.__le__, "<="), ("lt", float.__lt__, "<")):
        b = m.get(bound)
        if b is not None and isinstance(value, (int, float)) and not op(float(value), float(b)):
            raise ConfigError(f"{key}: {value!r} is out of range; expected {word} {b}")


def _check_choice(item: Any, choices, key: str) -> None:
    if isinstance(choices, str):  # a registry: its names, or a form it is open to (models: torchvision/<name>)
        ok, hint = registry_accepts(choices, item) if isinstance(item, str) else (False, "")
        if not ok:
            raise ConfigError(f"{key}: {item!r} is not one of: {', '.join(_registry_names(choices))}"
                              + (f"; or {hint}" if hint else ""))
    elif item not in choices:
        raise ConfigError(f"{key}: {item!r} is not one of: {', '.join(map(str, choices))}")


def _build(cls, data: dict, prefix: str = ""):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for k in data:
        if k not in fields:
            raise ConfigError(f"{prefix}{k}: unknown key; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            v = _coerce(data[name], hints[name], prefix + name)
            _check(v, f, prefix + name)
            kwargs[name] = v
    return cls(**kwargs)


def parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings to a nested dict (values parsed as YAML scalars/lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides take the form dotted.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is not a section")
        node[parts[-1]] = parse_scalar(text)
    return data


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict:
    """A YAML file whose top level is a mapping; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(loaded).__name__}")
    return loaded


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Build a Config from an optional YAML file plus dotted overrides; validated at once."""
    data: dict = dict(base or {})
    if path:
        data = _merge(data, read_yaml_mapping(path, "config file"))
    apply_overrides(data, list(overrides or []))
    try:
        return _build(Config, data)
    except ConfigError as e:
        if path:
            raise ConfigError(f"{path}: {e}") from None
        raise


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(data: dict) -> Config:
    return _build(Config, data)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls=Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every field: used by `kcd-ray config --list`."""
    rows = []
    hints = typing.get_type_hints(cls)
    inst = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, prefix + f.name + ".")
        else:
            rows.append((prefix + f.name, _type_name(tp), getattr(inst, f.name), f.metadata.get("help", "")))
    return rows
