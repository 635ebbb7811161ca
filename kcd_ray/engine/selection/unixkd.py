"""UNIXKD (Xu, Liu & Loy 2020), following ``student_v0.py`` of github.com/xuguodong03/UNIXKD.

Each candidate batch of ``B`` samples gets a student forward (no grad, no teacher, the student in train mode as
there) that ranks it by uncertainty (entropy of the softmax at T=1); the first ``k = ratio * B`` of the ranking
form the training batch; ranks ``>= b`` (``b = pure_fraction * B``) are mixed with a random partner of the
candidate batch with weight ``m = lambda * sigmoid(w (r/B - (2b-1)/(2B)))``, ``lambda ~ Beta(1, 1)`` per batch;
the CE term uses the mixed labels ``(1 - m) CE(y_own) + m CE(y_partner)``, the KD term the teacher's output on
the mixed image. The data feed serves ``B`` rows per batch (``feed_batch_size``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from kcd_ray.config import _f
from kcd_ray.engine.selection.base import STRATEGIES, SelectionStrategy, seed_words, strategy_seed
from kcd_ray.engine.selection.losses import loss_weights


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


def uncertainty(logits: torch.Tensor, score: str = "entropy",
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
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


@STRATEGIES.register("unixkd")
class UnixKD(SelectionStrategy):
    name = "unixkd"
    label, colour = "UNIXKD", "tab:purple"
    reads_sections = ("selection.seed",)  # its per-epoch draws
    config_class = UnixKDConfig
    makes_images = "batches"  # mixup inside each step: views no teacher-output cache has seen

    def __init__(self, cfg, num_train: int):
        super().__init__(cfg, num_train)
        self.cfg = cfg.selection.unixkd
        self.candidate, self.k, self.b = unixkd_sizes(self.cfg, cfg.optim.batch_size)
        self.seed = strategy_seed(cfg)
        self._gen = torch.Generator()
        self._np = np.random.default_rng(0)
        self._forward_only = 0

    @classmethod
    def feed_batch_size(cls, cfg) -> int:
        return unixkd_sizes(cfg.selection.unixkd, cfg.optim.batch_size)[0]

    @classmethod
    def budget_knobs(cls, cfg, num_train: int) -> list:
        from kcd_ray.engine.plan.budget import Knob

        return [Knob("selection.unixkd.ratio", 1.0 / max(1, cfg.optim.batch_size), 1.0,
                     hint="nothing: every candidate row pays a ranking forward, so UNIXKD costs at least a student "
                          "forward per sample")]

    @classmethod
    def planned_fractions(cls, cfg, num_train: int) -> tuple[np.ndarray, np.ndarray]:
        """Each candidate batch of B rows: k trained, B ranked forward-only."""
        cand, k, _ = unixkd_sizes(cfg.selection.unixkd, cfg.optim.batch_size)
        epochs = int(cfg.optim.epochs)
        return np.full(epochs, k / cand), np.ones(epochs)

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

    def pop_compute_counts(self) -> dict:  # the ranking forwards, for the compute ledger
        out = {"student_forward_only": self._forward_only}
        self._forward_only = 0
        return out

    def after_epoch(self, engine, epoch: int, row: dict) -> None:
        row.update(kept_fraction=row["samples_seen"] / max(engine.parts.num_train, 1))
