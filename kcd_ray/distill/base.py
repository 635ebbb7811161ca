"""The Distiller interface: one module that owns the student, the frozen teacher and any connectors.

A training step is ``out = distiller(batch, T, epoch)`` followed by ``sum(out.losses.values()).backward()``.
``out.losses`` holds named terms that are already weighted:
``{"ce": gamma * CE, "kd": alpha * T^2 * KL, "<method>": beta * L_other}``; a term whose weight is 0 is
left out (and not computed). ``out.per_sample`` holds, for the terms that are batch means of a per-sample loss
(CE, KD, and methods whose ``extra_loss`` returns a vector, e.g. dkd), that loss per sample with the same weight:
strategies that weight samples (InfoBatch) reweight exactly what the distiller computed (logit standardization,
a learned temperature and all).

``distill.logit_standardize`` z-scores both nets' logits per sample before the temperature softmax of the KD
term (:func:`standardize_logits`). A learned temperature (``distill.temperature.schedule=ctkd``) is bound with
:meth:`Distiller.bind_temperature` and replaces the engine's ``T`` inside ``forward`` (:meth:`step_temperature`).

The teacher is deliberately *not* a registered submodule. It is held in a plain attribute so that
``parameters()`` (the optimiser, DDP's gradient buckets), ``state_dict()`` (checkpoints) and DDP's
buffer broadcast never see it; ``_apply`` is extended so ``.to(device)`` / ``.cuda()`` still move it.
Connectors built by a method (regressors, embeddings, memory banks) *are* submodules, so they are
trained, checkpointed and resumed together with the student.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from kcd_ray.config import ConfigError, DistillConfig
from kcd_ray.distill.connectors import f32
from kcd_ray.distill.temperature import LearnedTemperature, Schedule
from kcd_ray.registry import Registry

Temperature = Union[float, torch.Tensor]  # a step's T: a float, or a learned temperature's 0-dim tensor
STANDARDIZE_EPS = 1e-7  # the reference's normalize(): (z - mean) / (1e-7 + std)


class StepOutput(NamedTuple):
    logits: Optional[torch.Tensor]  # student logits (None in init-stage steps)
    losses: dict[str, torch.Tensor]  # weighted terms; the total loss is their sum
    teacher_logits: Optional[torch.Tensor]  # None when there is no teacher
    per_sample: Optional[dict[str, torch.Tensor]] = None  # losses[k] == per_sample[k].mean() for the keys it holds


def standardize_logits(z: torch.Tensor) -> torch.Tensor:
    """Each row z-scored over the classes: ``(z - mean) / (1e-7 + std)``, std with Bessel's correction (torch's
    default), as ``normalize`` in github.com/sunshangquan/logit-standardization-KD (mdistiller/distillers/KD.py)."""
    z = f32(z)
    return (z - z.mean(dim=1, keepdim=True)) / (STANDARDIZE_EPS + z.std(dim=1, keepdim=True))


def kd_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: Temperature,
                  standardize: bool = False) -> torch.Tensor:
    """[B]: T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) per sample (Hinton KD); ``standardize``: of the z-scored
    logits (:func:`standardize_logits`, Sun et al. 2024)."""
    z_s, z_t = (standardize_logits(student_logits), standardize_logits(teacher_logits)) if standardize \
        else (f32(student_logits), f32(teacher_logits))
    log_p_s = F.log_softmax(z_s / T, dim=1)
    p_t = F.softmax(z_t / T, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="none").sum(dim=1) * (T * T)


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: Temperature,
          standardize: bool = False) -> torch.Tensor:
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), averaged over the batch (Hinton KD): :func:`kd_per_sample`'s mean."""
    return kd_per_sample(student_logits, teacher_logits, T, standardize).mean()


class Distiller(nn.Module):
    """Base class: CE + KD, plus ``beta * extra_loss(...)`` for methods that define one.

    Subclasses set the class attributes and override ``extra_loss`` (and, for two-stage methods,
    ``init_stage_epochs`` / ``init_stage_losses``). Method-specific modules are built in
    ``__init__`` from ``self.s_shapes`` / ``self.t_shapes``: the feature shapes (without the batch
    dimension) of one dummy forward at the data set's image size.
    """

    name: ClassVar[str] = "base"
    needs_features: ClassVar[bool] = False  # run both nets with is_feat=True
    needs_preact: ClassVar[bool] = False  # ... and preact=True (AB)
    needs_teacher: ClassVar[bool] = True
    has_init_stage: ClassVar[bool] = False  # AB, FT, FSP
    default_beta: ClassVar[float] = 0.0
    known_options: ClassVar[tuple[str, ...]] = ()  # keys of distill.options this method reads
    # What of the teacher a teacher-output cache must hold for this method: ("logits",), ("logits", "feat")
    # (feats[-1] only), or None: feature maps, so the teacher stays in the loop. Unset: by needs_features.
    teacher_outputs: ClassVar[Optional[tuple[str, ...]]] = ()
    label: ClassVar[str] = ""  # how reports name it; "" = the registered name
    routes_rows: ClassVar[bool] = False  # several teachers, each row through one of them (the ledger counts one)
    own_term_uses_T: ClassVar[bool] = False  # the method's own term depends on T (dkd): a learned T may drive it
    logit_standardize_applies: ClassVar[bool] = True  # distill.logit_standardize reaches its KD term (not ed's)

    @classmethod
    def cache_outputs(cls) -> Optional[tuple[str, ...]]:
        if cls.teacher_outputs != ():
            return cls.teacher_outputs
        return None if cls.needs_features else ("logits",)

    # ------------------------------------------------------------------ its teachers (the plan and the builder)
    @classmethod
    def teacher_files(cls, cfg) -> list[tuple[str, str]]:
        """(config key, checkpoint) of every teacher file a run of this method reads: checked before Ray starts."""
        return [("distill.teacher", cfg.distill.teacher)]

    @classmethod
    def load_teachers(cls, cfg, num_classes: int):
        """The constructor's ``teacher`` argument: the module of ``distill.teacher`` (a kcd_ray or RepDistiller
        checkpoint, or a plain state dict) as ``distill.teacher_model`` with ``teacher_kwargs`` and ``teacher_taps``;
        several teachers: a list."""
        from kcd_ray.models import load_model
        from kcd_ray.models.taps import TapError

        d = cfg.distill
        if not d.teacher:
            raise ConfigError("distill.teacher: a teacher checkpoint is required for distillation (train one with "
                              "`kcd-ray train-teacher`)")
        try:
            return load_model(d.teacher, name=d.teacher_model or None, num_classes=num_classes,
                              kwargs=d.teacher_kwargs, taps=d.teacher_taps)
        except TapError as e:
            raise ConfigError(f"distill.teacher_taps: {e}") from None

    @classmethod
    def build_kwargs(cls, cfg, num_classes: int) -> dict:
        """Constructor keyword arguments a method takes from other config sections (ed: the class groups)."""
        return {}

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], cfg: DistillConfig, num_classes: int,
                 *, image_size: int = 32, in_channels: int = 3, num_samples: Optional[int] = None,
                 teacher_cache=None):
        super().__init__()
        # teacher_cache: the run's CacheSpec: batches carry the teacher's outputs (t_logits, t_feat); the teacher
        # itself is loaded only when some rows are not cached (KCD blends), else it is None.
        self.teacher_cache = teacher_cache
        self.teacher_rows = 0  # rows forwarded through the teacher (the compute ledger reads it)
        if self.needs_teacher and teacher is None and teacher_cache is None:
            raise ConfigError(f"distill.teacher: method {cfg.method!r} needs a teacher checkpoint")
        self.student = student
        object.__setattr__(self, "_teacher", teacher)  # hidden from parameters()/state_dict(): see module doc
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.cfg = cfg
        self.num_classes = int(num_classes)
        self.options = dict(cfg.options or {})
        _check_option_names(self.options)
        self.gamma = float(cfg.gamma)
        self.alpha = float(cfg.alpha) if (teacher is not None or teacher_cache is not None) else 0.0
        self.beta = float(self.default_beta if cfg.beta is None else cfg.beta)
        if cfg.beta is not None and cfg.beta < 0:
            raise ConfigError(f"distill.beta: {cfg.beta!r} is out of range; expected >= 0")
        self.logit_standardize = bool(getattr(cfg, "logit_standardize", False))
        if self.logit_standardize and not self.logit_standardize_applies:
            raise ConfigError(f"distill.logit_standardize: method {cfg.method!r} does not support it (its KD is "
                              "over per-group logit slices); kd, dkd, mtkd and every method's KD term do")
        self.learned_temperature: Optional[LearnedTemperature] = None  # CTKD's, once bound (bind_temperature)
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        self.num_samples = num_samples if num_samples is not None else self.options.get("num_samples")
        self.s_shapes: list[torch.Size] = []
        self.t_shapes: list[torch.Size] = []
        if self.needs_features:
            self.s_shapes, self.t_shapes = self._probe_shapes()

    # ------------------------------------------------------------------ teacher handling
    @property
    def teacher(self) -> Optional[nn.Module]:
        return self._teacher

    def train(self, mode: bool = True):
        super().train(mode)
        if self._teacher is not None:
            self._teacher.eval()  # BN statistics and dropout of the teacher never change
        return self

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self._teacher is not None:
            self._teacher._apply(fn, recurse)
        return self

    def student_state_dict(self) -> dict:
        return self.student.state_dict()

    # ------------------------------------------------------------------ temperature and the KD term
    def bind_temperature(self, temperature) -> Schedule:
        """The engine's ``epoch -> T`` for ``build_temperature``'s result. A :class:`LearnedTemperature` (CTKD)
        becomes this distiller's ``learned_temperature`` submodule (call this before building the optimiser: its
        parameter is trained, checkpointed and resumed with the student) and every step uses its output."""
        if not isinstance(temperature, LearnedTemperature):
            return temperature
        if not (self.alpha > 0 or (self.own_term_uses_T and self.beta > 0)):
            raise ConfigError(f"distill.temperature.schedule: ctkd learns the temperature of the KD term, and method "
                              f"{self.name!r} with distill.alpha=0 has none that uses T")
        self.learned_temperature = temperature
        return temperature.schedule

    def step_temperature(self, T: Temperature, epoch: int) -> Temperature:
        """The temperature this step's losses use: the learned one's output when bound, else the engine's ``T``."""
        return T if self.learned_temperature is None else self.learned_temperature(epoch)

    def kd_per_sample(self, s_logits: torch.Tensor, t_logits: torch.Tensor, T: Temperature) -> torch.Tensor:
        """The KD term per sample, unweighted: T^2 * KL, of standardized logits with ``distill.logit_standardize``."""
        return kd_per_sample(s_logits, t_logits, T, self.logit_standardize)

    # ------------------------------------------------------------------ options
    def opt(self, key: str, default: Any, kind: type = float, gt: Optional[float] = None) -> Any:
        """A method option from ``distill.options``, type-checked with an error naming the key."""
        value = self.options.get(key, default)
        try:
            if kind is bool or kind is str:
                if not isinstance(value, kind):
                    raise TypeError
                return value
            if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
                raise TypeError
            value = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"distill.options.{key}: expected {kind.__name__}, got {value!r}") from None
        if gt is not None and not value > gt:
            raise ConfigError(f"distill.options.{key}: {value!r} is out of range; expected > {gt}")
        return value

    # ------------------------------------------------------------------ forwards
    def _probe_shapes(self) -> tuple[list[torch.Size], list[torch.Size]]:
        """Feature shapes of both nets from one dummy forward (eval mode, no grad)."""
        param = next(self.student.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        x = torch.zeros(2, self.in_channels, self.image_size, self.image_size, device=device)
        shapes = []
        cached = self.teacher_cache is not None and self._teacher is None
        for net in (self.student,) if cached else (self.student, self._teacher):
            was_training = net.training
            net.eval()
            with torch.no_grad():
                feats, _ = net(x, is_feat=True, preact=self.needs_preact)
            net.train(was_training)
            shapes.append([f.shape[1:] for f in feats])
        if cached:  # recorded by the cache build: the teacher is not loaded
            shapes.append([torch.Size(s) for s in self.teacher_cache.teacher_shapes])
        return shapes[0], shapes[1]

    def run_student(self, image: torch.Tensor, features: Optional[bool] = None):
        features = self.needs_features if features is None else features
        if features:
            return self.student(image, is_feat=True, preact=self.needs_preact)
        return None, self.student(image)

    def run_teacher(self, image: torch.Tensor, features: Optional[bool] = None):
        if self._teacher is None:
            return None, None
        features = self.needs_features if features is None else features
        self.teacher_rows += int(image.shape[0])
        with torch.no_grad():
            if features:
                feats, logits = self._teacher(image, is_feat=True, preact=self.needs_preact)
                return [f.detach() for f in feats], logits.detach()
            return None, self._teacher(image).detach()

    def teacher_outputs_of(self, batch: dict, features: Optional[bool] = None):
        """(feats, logits) of the teacher for this batch: from the cache columns when the batch has them (the
        rows marked ``t_missing``, KCD's blends, through the teacher), else from the teacher."""
        features = self.needs_features if features is None else features
        cached = batch.get("t_logits")
        if cached is None:
            return self.run_teacher(batch["image"], features)
        logits = cached.float()
        feats = None
        if features:
            feat = batch.get("t_feat")
            if feat is None:
                raise ValueError(f"distill.cache: method {self.name!r} needs feats[-1] but the cache holds none")
            feats = [feat.float().view(-1, *self.t_shapes[-1])]
        missing = batch.get("t_missing_cpu")
        if missing is not None and bool(missing.any()):  # a host tensor: no device sync
            if self._teacher is None:
                raise ValueError("distill.cache: rows without a cached teacher output (KCD blends) need the teacher")
            idx = torch.nonzero(missing).flatten().to(logits.device)
            f, z = self.run_teacher(batch["image"].index_select(0, idx), features)
            logits = logits.index_copy(0, idx, z.float())
            if features:
                feats = [feats[0].index_copy(0, idx, f[-1].float())]
        return feats, logits

    def forward(self, batch: dict, T: float, epoch: int, init_stage: bool = False) -> StepOutput:
        """One step. ``init_stage=True`` gives the init-stage losses (AB/FT/FSP) through the same call,
        so that DDP, which only synchronises gradients of work done inside its forward, covers them."""
        if init_stage:
            return StepOutput(None, self.init_stage_losses(batch), None)
        image, label = batch["image"], batch["label"]
        T = self.step_temperature(T, epoch)
        s_feats, s_logits = self.run_student(image)
        t_feats, t_logits = self.teacher_outputs_of(batch)
        per: dict[str, torch.Tensor] = {}
        if self.gamma > 0:
            per["ce"] = self.gamma * F.cross_entropy(f32(s_logits), label, reduction="none")
        if self.alpha > 0:
            per["kd"] = self.alpha * self.kd_per_sample(s_logits, t_logits, T)
        losses = {k: v.mean() for k, v in per.items()}
        if self.beta > 0:
            extra = self.extra_loss(s_feats, t_feats, s_logits, t_logits, batch, T, epoch)
            if extra is not None and extra.shape == s_logits.shape[:1]:  # a per-sample term (dkd)
                per[self.name] = self.beta * extra
                losses[self.name] = per[self.name].mean()
            elif extra is not None:
                losses[self.name] = self.beta * extra
        if not losses:
            raise ConfigError(f"distill.gamma/alpha/beta: every loss weight of method {self.name!r} is zero")
        return StepOutput(s_logits, losses, t_logits, per)

    def extra_loss(self, s_feats: Optional[Sequence[torch.Tensor]], t_feats: Optional[Sequence[torch.Tensor]],
                   s_logits: torch.Tensor, t_logits: Optional[torch.Tensor], batch: dict, T: float,
                   epoch: int) -> Optional[torch.Tensor]:
        """The method's own (unweighted) term: a scalar, or a [B] vector of per-sample values whose mean is the term
        (then also in ``StepOutput.per_sample``); None for methods that have none."""
        return None

    # ------------------------------------------------------------------ two-stage methods
    def init_stage_epochs(self) -> int:
        """Epochs of the initialisation stage the loop runs before distillation (AB, FT, FSP)."""
        return 0

    def init_stage_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        raise ValueError(f"distill.method: {self.name!r} has no initialisation stage (only ab, ft and fsp do)")

    def init_stage_parameters(self) -> list[nn.Parameter]:
        """What the init stage trains (RepDistiller: connectors and/or the student's feature layers)."""
        return []

    @property
    def find_unused_parameters(self) -> bool:
        """Whether DDP must be built with find_unused_parameters=True: some trainable parameter is
        left out of the graph in some step (init-stage-only modules, or a method term weighted 0)."""
        if self.has_init_stage:
            return True
        # a bound learned temperature is used by every step (bind_temperature checks it has a term)
        own = [p for n, p in self.named_parameters()
               if not n.startswith(("student.", "learned_temperature.")) and p.requires_grad]
        return bool(own) and self.beta == 0


DISTILLERS: Registry = Registry("distiller")
COMMON_OPTIONS = ("num_samples",)


def _check_option_names(options: dict) -> None:
    """Typos fail; an option of another method is tolerated (sweeps switch methods, keep options)."""
    known = set(COMMON_OPTIONS)
    for name in DISTILLERS.names():
        known.update(DISTILLERS.get(name).known_options)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"distill.options: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def register_distiller(name: str):
    """Register a Distiller subclass under ``name`` (also its loss-term key)."""

    def deco(cls):
        cls.name = name
        return DISTILLERS.register(name)(cls)

    return deco
