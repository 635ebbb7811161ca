"""Data-selection strategies: the hooks that decide what the student trains on, in the slot KCD occupies.

``selection.strategy`` picks exactly one (``auto`` = ``kcd`` when ``kcd.enabled`` else ``none``):

- ``none``: plain KD (every sample, every epoch).
- ``kcd``: KCD's condenser (:mod:`kcd_ray.engine.condenser`), unchanged.
- ``infobatch``: InfoBatch (Qin et al., ICLR 2024), following the authors' ``infobatch/infobatch.py``
  (github.com/NUS-HPC-AI-Lab/InfoBatch): scores start at 3; at each epoch start the samples whose score is below
  the mean are pruned at random with probability ``r`` (``keep_ratio = 1 - r``, clamped to >= 0.1 as there), the
  kept ones weigh ``1 / keep_ratio``; pruning stops once ``epoch > delta * epochs`` (the code's
  parameterisation, ``delta = 0.875``: "prune during the first 0.875 of the epochs", i.e. the last ~0.125 train on
  the full set) and the weights are reset to 1; after each step the scores of the samples just trained on become
  their (unweighted, all-gathered) per-sample loss, and the loss is rescaled by the weights. The per-sample loss is
  the distiller's own (``StepOutput.per_sample``: CE, KD, dkd's term), so logit standardization and a learned
  temperature are in it.
- ``unixkd``: UNIXKD (Xu, Liu & Loy 2020), following ``student_v0.py`` of github.com/xuguodong03/UNIXKD: each
  candidate batch of ``B`` samples gets a student forward (no grad, no teacher, the student in train mode as
  there) that ranks it by uncertainty (entropy of the softmax at T=1); the first ``k = ratio * B`` of the ranking
  form the training batch; ranks ``>= b`` (``b = pure_fraction * B``) are mixed with a random partner of the
  candidate batch with weight ``m = lambda * sigmoid(w (r/B - (2b-1)/(2B)))``, ``lambda ~ Beta(1, 1)`` per batch;
  the CE term uses the mixed labels ``(1 - m) CE(y_own) + m CE(y_partner)``, the KD term the teacher's output on
  the mixed image.
- ``random``: a uniformly random subset per epoch, seeded by (seed, epoch), at ``selection.random.fraction`` or
  at KCD's planned sizes (``follow_kcd_schedule``): the control for KCD at equal compute.

Selections go through the data pipeline exactly as KCD's mask does: ``data_selection`` returns the kept set
(bool[N] by sample id), the engine publishes it before the epoch's data is read. Every rank computes it from
identical state (scores all-gathered by sample id) and the same (seed, epoch) generator, so it is the same
everywhere. InfoBatch's per-sample loss weights are looked up by sample id on each rank from that identical
table: the same numbers a weight column carried by each row would bring, without widening the rows.

The pure rules (``infobatch_prune``, ``per_sample_loss``, ``uncertainty``, ``unixkd_mix``, ``random_subset``)
are functions of their inputs, tested on fixed inputs in ``tests/test_selection.py``.

Hooks may expose ``pop_compute_counts() -> {"student_forward_only": n, "teacher_forward": n}`` (this rank's
extra forward passes since the last call); the compute ledger (:mod:`kcd_ray.engine.ledger`) sums them.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from kcd_ray.condense.schedule import CondensationSchedule
from kcd_ray.config import ConfigError
from kcd_ray.distill.temperature import is_learned
from kcd_ray.engine import distributed as D
from kcd_ray.engine.condenser import Condenser
from kcd_ray.engine.hooks import Hook, Selection
from kcd_ray.registry import Registry

# name -> builder(ctx, num_train) -> the strategy's hook, or None (plain KD)
STRATEGIES: Registry[Callable] = Registry("selection strategy")
STRATEGY_HOOK_NAMES = ("kcd", "infobatch", "unixkd", "random")  # hook names: at most one of them in a run


def resolve_strategy(cfg, kind: str = "distill") -> str:
    """The strategy a run uses: ``auto`` follows ``kcd.enabled``; teacher training never selects."""
    if kind != "distill":
        return "none"
    name = cfg.selection.strategy
    if name == "auto":
        return "kcd" if cfg.kcd.enabled else "none"
    return name


def build_strategy(ctx, num_train: int) -> Optional[Hook]:
    """The one selection hook of a run (None for plain KD and teacher training)."""
    return STRATEGIES.get(resolve_strategy(ctx.cfg, ctx.kind))(ctx, int(num_train))


def strategy_seed(cfg) -> int:
    return int(cfg.optim.seed if cfg.selection.seed is None else cfg.selection.seed)


def seed_words(*xs: int) -> list[int]:
    return [int(x) & 0xFFFFFFFF for x in xs]


def epoch_rng(seed: int, epoch: int, *more: int) -> np.random.Generator:
    """The generator of one epoch's draws: a pure function of (seed, epoch[, rank])."""
    return np.random.default_rng(seed_words(seed, epoch, *more))


def feed_batch_size(cfg, kind: str = "distill") -> int:
    """Rows per batch the data pipeline must serve each worker: UNIXKD's candidate batch, else optim.batch_size."""
    if resolve_strategy(cfg, kind) == "unixkd":
        return unixkd_sizes(cfg.selection.unixkd, cfg.optim.batch_size)[0]
    return int(cfg.optim.batch_size)


# --------------------------------------------------------------------------- none / kcd


@STRATEGIES.register("none")
def _none(ctx, num_train):
    return None


@STRATEGIES.register("kcd")
def _kcd(ctx, num_train):
    kcd = ctx.cfg.kcd
    learned_T = is_learned(ctx.cfg.distill.temperature)
    if kcd.estep == "offline" and kcd.value_fn == "kd" and kcd.value_T is None and learned_T:
        raise ConfigError("kcd.value_T: the offline E-step's kd values need a fixed temperature and "
                          "distill.temperature.schedule=ctkd learns it during training; set kcd.value_T")
    # selection.strategy=kcd runs KCD even when kcd.enabled is false (an explicit strategy wins).
    return Condenser(dataclasses.replace(kcd, enabled=True), num_train)


@STRATEGIES.register("auto")
def _auto(ctx, num_train):
    return STRATEGIES.get(resolve_strategy(ctx.cfg, ctx.kind))(ctx, num_train)


# --------------------------------------------------------------------------- losses


def loss_weights(distiller, losses: dict) -> tuple[float, float]:
    """(weight of CE, weight of KD) as the distiller applied them; 0 for a term it did not compute."""
    w_ce = (1.0 if getattr(distiller, "name", "") == "ce" else float(distiller.gamma)) if "ce" in losses else 0.0
    w_kd = float(getattr(distiller, "alpha", 0.0)) if "kd" in losses else 0.0
    return w_ce, w_kd


def per_sample_loss(output) -> torch.Tensor:
    """The step's per-sample loss (float32 [B]): the sum of the distiller's ``StepOutput.per_sample`` terms (CE, KD
    and per-sample method terms such as dkd's, each with its weight), so its batch mean is those terms of
    ``output.losses`` exactly as the distiller computed them (standardized logits, a learned temperature,
    several teachers). Terms that are not per-sample means (feature losses) are not in it."""
    per = output.per_sample
    if not per:
        raise ValueError(f"selection.strategy=infobatch needs the distiller's per-sample losses; its step gave "
                         f"none for terms {sorted(output.losses)}")
    return sum(v.float() for v in per.values())


# --------------------------------------------------------------------------- InfoBatch


def infobatch_keep_ratio(prune_ratio: float) -> float:
    return min(1.0, max(1e-1, 1.0 - float(prune_ratio)))  # the reference's clamp


def infobatch_prunes(epoch: int, epochs: int, delta: float) -> bool:
    """The reference prunes unless ``iterations > num_epochs * delta`` (iterations = the 0-based epoch)."""
    return not int(epoch) > int(epochs) * float(delta)


def infobatch_prune(scores: np.ndarray, seen: np.ndarray, keep_ratio: float, rng: np.random.Generator):
    """One epoch's (kept bool[N], weights float32[N]) (the reference's ``prune``).

    ``well_learned = scores < scores.mean()``; of them, ``int(keep_ratio * len)`` chosen at random without
    replacement are kept with weight ``1 / keep_ratio``; all others are kept with weight 1. Never-seen samples
    are never pruned (the reference gets that from their initial score 3; here it is also made explicit)."""
    scores = np.asarray(scores, dtype=np.float32)
    well = (scores < scores.mean()) & np.asarray(seen, dtype=bool)
    idx = np.flatnonzero(well)
    chosen = rng.choice(idx, int(keep_ratio * len(idx)), replace=False) if len(idx) else idx
    kept = ~well
    kept[chosen] = True
    weights = np.ones(len(scores), np.float32)
    if len(chosen):
        weights[chosen] = 1.0 / keep_ratio
    return kept, weights


class InfoBatch(Hook):
    name = "infobatch"
    INITIAL_SCORE = 3.0  # the reference's ``torch.ones(N) * 3``

    def __init__(self, ib_cfg, num_samples: int, epochs: int, seed: int):
        self.keep_ratio = infobatch_keep_ratio(ib_cfg.ratio)
        self.delta, self.epochs, self.seed, self.num_samples = float(ib_cfg.delta), int(epochs), int(seed), int(num_samples)
        self.scores = np.full(self.num_samples, self.INITIAL_SCORE, np.float32)
        self.seen = np.zeros(self.num_samples, bool)
        self.kept: Optional[np.ndarray] = None
        self.weights = np.ones(self.num_samples, np.float32)
        self._w_dev: Optional[torch.Tensor] = None
        self._ids: list[torch.Tensor] = []
        self._losses: list[torch.Tensor] = []

    def state_dict(self) -> dict:
        return {"scores": self.scores.copy(), "seen": self.seen.copy()}

    def load_state_dict(self, state: dict) -> None:
        self.scores = np.asarray(state["scores"], np.float32).copy()
        self.seen = np.asarray(state["seen"], bool).copy()

    def before_epoch(self, engine, epoch: int) -> None:
        if infobatch_prunes(epoch, self.epochs, self.delta):
            self.kept, self.weights = infobatch_prune(self.scores, self.seen, self.keep_ratio,
                                                      epoch_rng(self.seed, epoch))
        else:  # annealing: the full set, weights 1 (the reference resets them only when epochs*delta is whole)
            self.kept, self.weights = None, np.ones(self.num_samples, np.float32)
        self._w_dev = torch.as_tensor(self.weights, device=engine.device)

    def data_selection(self, engine) -> Optional[Selection]:
        return None if self.kept is None else Selection(kept=self.kept)

    def adjust_loss(self, engine, batch: dict, output, loss):
        """``loss + mean((w_i - 1) l_i)``: the per-sample part of the loss (CE, KD, dkd's term: ``per_sample_loss``)
        becomes ``mean(w_i l_i)`` (the reference's ``values.mul_(weights); values.mean()``); other method terms
        (feature losses) are not rescaled."""
        l_i = per_sample_loss(output)
        self._ids.append(batch["sample_id_cpu"])
        self._losses.append(l_i.detach())
        if self._w_dev is None:
            return None
        w = self._w_dev[batch["sample_id"]]
        return loss + ((w - 1.0) * l_i).mean()

    def after_epoch(self, engine, epoch: int, row: dict) -> None:
        ids, vals = D.gather_per_sample(self._ids, self._losses)
        self._ids, self._losses = [], []
        self.scores[ids] = vals
        self.seen[ids] = True
        kept = self.num_samples if self.kept is None else int(self.kept.sum())
        row.update(kept_fraction=kept / self.num_samples)


@STRATEGIES.register("infobatch")
def _infobatch(ctx, num_train):
    return InfoBatch(ctx.cfg.selection.infobatch, num_train, ctx.cfg.optim.epochs, strategy_seed(ctx.cfg))


# --------------------------------------------------------------------------- UNIXKD


def unixkd_sizes(u_cfg, optim_batch_size: int) -> tuple[int, int, int]:
    """(candidate batch B, training batch k, unmixed ranks b) per worker.

    ``unixkd.batch_size = 0``: B is ``optim.batch_size`` (the reference: 64) and k = round(ratio * B) (48);
    else k is ``unixkd.batch_size`` and B = round(k / ratio). b = round(pure_fraction * B) (32)."""
    if u_cfg.batch_size:
        k = int(u_cfg.batch_size)
        cand = max(k, int(round(k / float(u_cfg.ratio))))
    else:
        cand = int(optim_batch_size)
        k = max(1, int(round(float(u_cfg.ratio) * cand)))
    b = int(round(float(u_cfg.pure_fraction) * cand))
    return cand, k, b


def uncertainty(logits: torch.Tensor, score: str = "entropy", generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Higher = more uncertain (the reference's strategies 3 entropy, 1 least confidence, 2 margin, 0 random)."""
    probs = F.softmax(logits.float(), dim=1)
    if score == "entropy":
        return -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=1)
    if score == "confidence":
        return 1.0 - probs.max(dim=1).values
    if score == "margin":
        top2 = probs.topk(min(2, probs.shape[1]), dim=1).values
        return -(top2[:, 0] - top2[:, -1])
    if score == "random":
        return torch.rand(probs.shape[0], generator=generator).to(probs.device)
    raise ValueError(f"selection.unixkd.score: {score!r} is not one of: entropy, confidence, margin, random")


def unixkd_mask(n: int, candidate: int, b: int, sharpness: float, device=None) -> torch.Tensor:
    """The reference's ``mask_proto``: sigmoid(w (r/B - (2b-1)/(2B))) at rank positions r = 0..n-1: ~0 for the
    b most uncertain, ~1 after them."""
    r = torch.arange(n, dtype=torch.float32, device=device)
    m = (2 * b - 1) / (2 * candidate)
    return torch.sigmoid(float(sharpness) * (r / candidate - m))


def unixkd_mix(x: torch.Tensor, y: torch.Tensor, scores: torch.Tensor, perm: torch.Tensor, lam: float, k: int,
               candidate: int, b: int, sharpness: float):
    """One candidate batch -> (image, own label, partner label, mix weight m, rank order) of the training batch.

    As the reference: ``rank = argsort(scores, desc)``; ``x' = (1 - m) x[rank] + m x[perm]`` with
    ``m = lam * mask_proto`` and ``perm`` a random permutation of the candidate batch; the first ``k`` rows train.
    """
    n = x.shape[0]
    rank = torch.argsort(scores, descending=True)
    m = lam * unixkd_mask(n, candidate, b, sharpness, device=x.device)
    mv = m.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    mixed = (1 - mv) * x[rank] + mv * x[perm]
    k = min(int(k), n)
    return mixed[:k], y[rank][:k], y[perm][:k], m[:k], rank[:k]


class UnixKD(Hook):
    name = "unixkd"

    def __init__(self, u_cfg, optim_batch_size: int, seed: int):
        self.cfg = u_cfg
        self.candidate, self.k, self.b = unixkd_sizes(u_cfg, optim_batch_size)
        self.seed = int(seed)
        self._gen = torch.Generator()
        self._np = np.random.default_rng(0)
        self._forward_only = 0

    def before_epoch(self, engine, epoch: int) -> None:
        # Per (seed, epoch, rank): draws do not depend on where a run was resumed (checkpoints are per epoch).
        words = seed_words(self.seed, epoch, engine.ctx.rank)
        self._gen.manual_seed(int(np.random.SeedSequence(words).generate_state(1)[0]))
        self._np = np.random.default_rng(words + [1])

    def before_step(self, engine, batch: dict) -> dict:
        x, y, ids = batch["image"], batch["label"], batch["sample_id"]
        n = x.shape[0]
        if n > self.candidate:
            raise ValueError(f"selection.unixkd: a batch of {n} rows for candidate batches of {self.candidate}: the "
                             "data feed must serve kcd_ray.engine.selection.feed_batch_size(cfg) rows per batch")
        with torch.no_grad(), engine.parts.amp_ctx:
            logits = engine.distiller.student(x)  # ranking forward: student only, train mode as the reference
        scores = uncertainty(logits, self.cfg.score, self._gen)
        lam = float(self._np.beta(self.cfg.mixup_alpha, self.cfg.mixup_alpha))
        perm = torch.randperm(n, generator=self._gen).to(x.device)
        image, y_own, y_partner, m, rank = unixkd_mix(x, y, scores, perm, lam, self.k, self.candidate, self.b,
                                                      self.cfg.sharpness)
        self._forward_only += n
        sid = ids[rank]
        # The one host read per step: the trained ids, for host-side bookkeeping of other hooks.
        return {"image": image, "label": y_own, "sample_id": sid, "sample_id_cpu": sid.cpu(),
                "mix_label": y_partner, "mix_weight": m}

    def adjust_loss(self, engine, batch: dict, output, loss):
        """The reference's mixed-label CE: ``(1 - m) CE(y_own) + m CE(y_partner)`` in place of ``CE(y_own)``."""
        w_ce, _ = loss_weights(engine.distiller, output.losses)
        if not w_ce or "mix_weight" not in batch:
            return None
        z = output.logits.float()
        own = F.cross_entropy(z, batch["label"], reduction="none")
        partner = F.cross_entropy(z, batch["mix_label"], reduction="none")
        return loss + w_ce * (batch["mix_weight"] * (partner - own)).mean()

    def pop_compute_counts(self) -> dict:
        out = {"student_forward_only": self._forward_only}
        self._forward_only = 0
        return out

    def after_epoch(self, engine, epoch: int, row: dict) -> None:
        row.update(kept_fraction=row["samples_seen"] / max(engine.parts.num_train, 1))


@STRATEGIES.register("unixkd")
def _unixkd(ctx, num_train):
    return UnixKD(ctx.cfg.selection.unixkd, ctx.cfg.optim.batch_size, strategy_seed(ctx.cfg))


# --------------------------------------------------------------------------- random subsets


def random_subset(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """bool[n] with exactly k uniformly chosen True."""
    kept = np.zeros(int(n), bool)
    kept[rng.choice(int(n), int(k), replace=False)] = True
    return kept


def fraction_size(n: int, fraction: float) -> int:
    """floor(fraction * n) on the decimal value of ``fraction`` (as KCD's schedule), at least 1."""
    return max(1, math.floor(Fraction(repr(float(fraction))) * int(n)))


class RandomSubset(Hook):
    name = "random"

    def __init__(self, r_cfg, kcd_cfg, num_samples: int, epochs: int, seed: int):
        self.num_samples, self.seed = int(num_samples), int(seed)
        if r_cfg.follow_kcd_schedule:
            sched = CondensationSchedule(num_samples, rho=kcd_cfg.rho, stages=kcd_cfg.stages,
                                         interval=kcd_cfg.interval, warmup=kcd_cfg.warmup, shape=kcd_cfg.shape)
            self.sizes = sched.planned_sizes(epochs)
        else:
            self.sizes = np.full(int(epochs), fraction_size(num_samples, r_cfg.fraction), np.int64)
        self.kept: Optional[np.ndarray] = None

    def size(self, epoch: int) -> int:
        return int(self.sizes[min(int(epoch), len(self.sizes) - 1)])

    def before_epoch(self, engine, epoch: int) -> None:
        k = self.size(epoch)
        self.kept = None if k >= self.num_samples else random_subset(self.num_samples, k, epoch_rng(self.seed, epoch))

    def data_selection(self, engine) -> Optional[Selection]:
        return None if self.kept is None else Selection(kept=self.kept)

    def after_epoch(self, engine, epoch: int, row: dict) -> None:
        kept = self.num_samples if self.kept is None else int(self.kept.sum())
        row.update(kept_fraction=kept / self.num_samples)


@STRATEGIES.register("random")
def _random(ctx, num_train):
    cfg = ctx.cfg
    return RandomSubset(cfg.selection.random, cfg.kcd, num_train, cfg.optim.epochs, strategy_seed(cfg))
