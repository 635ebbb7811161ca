"""InfoBatch (Qin et al., ICLR 2024), following the authors' ``infobatch/infobatch.py``
(github.com/NUS-HPC-AI-Lab/InfoBatch).

Scores start at 3; at each epoch start the samples whose score is below the mean are pruned at random with
probability ``r`` (``keep_ratio = 1 - r``, clamped to >= 0.1 as there), the kept ones weigh ``1 / keep_ratio``;
pruning stops once ``epoch > delta * epochs`` (the code's parameterisation, ``delta = 0.875``: "prune during the
first 0.875 of the epochs", i.e. the last ~0.125 train on the full set) and the weights are reset to 1; after each
step the scores of the samples just trained on become their (unweighted, all-gathered) per-sample loss, and the
loss is rescaled by the weights. The per-sample loss is the distiller's own (``StepOutput.per_sample``: CE, KD,
dkd's term), so logit standardization and a learned temperature are in it. Every rank computes the kept set from
identical, all-gathered scores and the same (seed, epoch) generator; the weights are looked up by sample id on
each rank from that identical table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from kcd_ray.config import _f
from kcd_ray.engine import distributed as D
from kcd_ray.engine.hooks import Selection
from kcd_ray.engine.selection.base import STRATEGIES, SelectionStrategy, epoch_rng, strategy_seed
from kcd_ray.engine.selection.losses import per_sample_loss


@dataclass
class InfoBatchConfig:
    ratio: float = _f(0.5, ge=0.0, le=0.9, help="prune probability r of a sample whose last loss is below the mean; "
                                                "the kept ones weigh 1/(1-r)")
    delta: float = _f(0.875, gt=0.0, le=1.0, help="prune while epoch <= delta * optim.epochs (the reference code's "
                                                  "parameterisation): the last ~(1 - delta) of the epochs train on all")


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


@STRATEGIES.register("infobatch")
class InfoBatch(SelectionStrategy):
    name = "infobatch"
    label, colour = "InfoBatch", "tab:green"
    reads_sections = ("selection.seed",)  # its per-epoch draws
    config_class = InfoBatchConfig
    INITIAL_SCORE = 3.0  # the reference's ``torch.ones(N) * 3``

    def __init__(self, cfg, num_train: int):
        super().__init__(cfg, num_train)
        ib = cfg.selection.infobatch
        self.keep_ratio = infobatch_keep_ratio(ib.ratio)
        self.delta, self.epochs, self.seed = float(ib.delta), int(cfg.optim.epochs), strategy_seed(cfg)
        self.scores = np.full(self.num_samples, self.INITIAL_SCORE, np.float32)
        self.seen = np.zeros(self.num_samples, bool)
        self.kept: Optional[np.ndarray] = None
        self.weights = np.ones(self.num_samples, np.float32)
        self._w_dev: Optional[torch.Tensor] = None
        self._ids: list[torch.Tensor] = []
        self._losses: list[torch.Tensor] = []

    BELOW_MEAN = 0.5  # the planned share of samples whose last loss is below the mean (data-dependent)

    @classmethod
    def budget_knobs(cls, cfg, num_train: int) -> list:
        from kcd_ray.engine.plan.budget import Knob

        return [Knob("selection.infobatch.ratio", 0.0, 0.9, hint="selection.infobatch.delta (the pruning epochs)")]

    @classmethod
    def planned_fractions(cls, cfg, num_train: int) -> tuple[np.ndarray, np.ndarray]:
        """Epoch 0 trains on all (no sample has a score yet); pruning epochs drop ``r`` of the samples below the
        mean, planned as ``BELOW_MEAN`` of them; the annealing epochs train on all."""
        ib, epochs = cfg.selection.infobatch, int(cfg.optim.epochs)
        pruned = (1.0 - infobatch_keep_ratio(ib.ratio)) * cls.BELOW_MEAN
        trained = np.array([1.0 if e == 0 or not infobatch_prunes(e, epochs, ib.delta) else 1.0 - pruned
                            for e in range(epochs)])
        return trained, np.zeros(epochs)

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

    def kept_set(self) -> Optional[np.ndarray]:
        return self.kept

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights, "scores": self.scores}

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
