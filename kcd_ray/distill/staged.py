"""Two-stage distillers: AB, FT and FSP (RepDistiller definitions).

Each has an initialisation stage of ``distill.init_epochs`` epochs that the training loop runs before
distillation: it calls ``distiller(batch, T, epoch, init_stage=True)`` (or ``init_stage_losses``) and
optimises ``init_stage_parameters()`` on the unweighted init loss.

- AB trains the student's feature layers and the connectors so that the student's pre-activations
  reproduce the teacher's activation boundaries; afterwards it only does CE/KD, like RepDistiller.
- FT trains a paraphraser (auto-encoder of the teacher's last map); distillation then matches the
  student's translated factors to the paraphraser's teacher factors with weight beta.
- FSP trains the student's feature layers to reproduce the teacher's FSP (flow) matrices; afterwards
  it only does CE/KD, like RepDistiller.

For AB and FSP, option ``distill_stage: true`` keeps the (beta-weighted) init loss during distillation.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kcd_ray.config import ConfigError
from kcd_ray.distill.base import Distiller, register_distiller
from kcd_ray.distill.connectors import ChannelAdapter, ConvReg, Paraphraser, Translator, f32, paired, pool_to_match


class _Staged(Distiller):
    needs_features = True
    has_init_stage = True

    def __init__(self, student, teacher, cfg, num_classes, **kw):
        super().__init__(student, teacher, cfg, num_classes, **kw)
        self.distill_stage = self.opt("distill_stage", False, bool)

    def init_stage_epochs(self) -> int:
        return int(self.cfg.init_epochs)

    def init_stage_parameters(self) -> list[nn.Parameter]:
        # RepDistiller trains the student's feature layers plus the connectors; the classifier gets
        # no gradient from these losses, so passing all student parameters is equivalent.
        return list(self.parameters())

    def _distill_stage(self, loss_fn, s_feats, t_feats):
        return loss_fn(s_feats, t_feats) if self.distill_stage else None


@register_distiller("ab")
class AB(_Staged):
    """Activation boundaries: a hinge-like loss that pushes connected student pre-activations to the
    teacher's side of zero by a ``margin`` (default 1), on the paired stages ``feats[1:-1]``; deeper
    stages weigh more (2^(i - n + 1))."""

    needs_preact = True
    default_beta = 1.0
    known_options = ("margin", "distill_stage")

    def __init__(self, student, teacher, cfg, num_classes, **kw):
        super().__init__(student, teacher, cfg, num_classes, **kw)
        s_mid, t_mid = self.s_shapes[1:-1], self.t_shapes[1:-1]
        self.n_pairs = paired(s_mid, t_mid)
        self.connectors = nn.ModuleList(
            nn.Identity() if tuple(s[:2]) == tuple(t[:2]) else ConvReg(s, t, use_relu=False)
            for s, t in zip(s_mid[: self.n_pairs], t_mid[: self.n_pairs])
        )
        self.margin = self.opt("margin", 1.0)

    def _loss(self, s_feats, t_feats):
        m, n, bsz = self.margin, self.n_pairs, s_feats[0].shape[0]
        total = 0.0
        for i, (conn, f_s, f_t) in enumerate(zip(self.connectors, s_feats[1:-1], t_feats[1:-1])):
            src, tgt = f32(conn(f_s)), f32(f_t)
            loss = ((src + m) ** 2 * ((src > -m) & (tgt <= 0)) + (src - m) ** 2 * ((src <= m) & (tgt > 0))).sum()
            total = total + 2.0 ** (i - n + 1) * loss / bsz / 1000 * 3
        return total

    def init_stage_losses(self, batch):
        s_feats, _ = self.run_student(batch["image"], features=True)
        t_feats, _ = self.run_teacher(batch["image"], features=True)
        return {"ab_init": self._loss(s_feats, t_feats)}

    def extra_loss(self, s_feats, t_feats, s_logits, t_logits, batch, T, epoch):
        return self._distill_stage(self._loss, s_feats, t_feats)


def factor_map(f: torch.Tensor, p: float) -> torch.Tensor:
    return F.normalize(f32(f).pow(p).mean(1).flatten(1), dim=1)


@register_distiller("ft")
class FT(_Staged):
    """Factor transfer on the last maps (``feats[-2]``): L1 (``p2`` = 1) between normalised factor maps
    of the student's translator and the teacher's paraphraser encoder. Option ``rate`` (0.5): factor
    channels as a share of the teacher's."""

    default_beta = 200.0
    known_options = ("rate", "p1", "p2")

    def __init__(self, student, teacher, cfg, num_classes, **kw):
        super().__init__(student, teacher, cfg, num_classes, **kw)
        rate = self.opt("rate", 0.5, gt=0)
        if len(self.s_shapes[-2]) != 3 or len(self.t_shapes[-2]) != 3:
            raise ConfigError("distill.method: 'ft' needs a spatial feature map at feats[-2] in both nets")
        self.paraphraser = Paraphraser(self.t_shapes[-2], rate)
        self.translator = Translator(self.s_shapes[-2], self.t_shapes[-2], rate)
        self.p1, self.p2 = self.opt("p1", 2.0), self.opt("p2", 1.0)

    def init_stage_parameters(self) -> list[nn.Parameter]:
        return list(self.paraphraser.parameters())

    def init_stage_losses(self, batch):
        t_feats, _ = self.run_teacher(batch["image"], features=True)
        f_t = t_feats[-2]
        _, rec = self.paraphraser(f_t)
        return {"ft_init": F.mse_loss(f32(rec), f32(f_t))}

    def extra_loss(self, s_feats, t_feats, s_logits, t_logits, batch, T, epoch):
        factor_s = self.translator(s_feats[-2])
        with torch.no_grad():  # the paraphraser is fixed after its init stage
            factor_t = self.paraphraser.encoder(t_feats[-2])
        factor_s, factor_t = pool_to_match(factor_s, factor_t)
        diff = factor_map(factor_s, self.p1) - factor_map(factor_t, self.p1)
        return diff.abs().mean() if self.p2 == 1 else diff.pow(self.p2).mean()


def fsp_matrices(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Flow matrices between consecutive maps: G[b, j, i] = mean_hw bottom[b, i] * top[b, j]."""
    out = []
    for bot, top in zip(maps, maps[1:]):
        bot, top = pool_to_match(f32(bot), f32(top))
        bot, top = bot.flatten(2), top.flatten(2)
        out.append(torch.einsum("bil,bjl->bji", bot, top) / bot.shape[-1])
    return out


@register_distiller("fsp")
class FSP(_Staged):
    """Flow of solution procedure on the maps ``feats[:-1]`` (the first n of each net). Where channel
    counts differ, a 1x1 conv adapts the student's map (RepDistiller requires equal channels)."""

    default_beta = 50.0
    known_options = ("distill_stage",)

    def __init__(self, student, teacher, cfg, num_classes, **kw):
        super().__init__(student, teacher, cfg, num_classes, **kw)
        self.n_maps = paired(self.s_shapes[:-1], self.t_shapes[:-1])
        if self.n_maps < 2 or any(len(s) != 3 for s in self.s_shapes[: self.n_maps] + self.t_shapes[: self.n_maps]):
            raise ConfigError("distill.method: 'fsp' needs at least two spatial feature maps in both nets")
        self.adapters = nn.ModuleList(
            ChannelAdapter(s[0], t[0]) for s, t in zip(self.s_shapes[: self.n_maps], self.t_shapes[: self.n_maps])
        )

    def _loss(self, s_feats, t_feats):
        s_maps = [a(f) for a, f in zip(self.adapters, s_feats[: self.n_maps])]
        g_s, g_t = fsp_matrices(s_maps), fsp_matrices(list(t_feats[: self.n_maps]))
        return sum((a - b).pow(2).mean() for a, b in zip(g_s, g_t))

    def init_stage_losses(self, batch):
        s_feats, _ = self.run_student(batch["image"], features=True)
        t_feats, _ = self.run_teacher(batch["image"], features=True)
        return {"fsp_init": self._loss(s_feats, t_feats)}

    def extra_loss(self, s_feats, t_feats, s_logits, t_logits, batch, T, epoch):
        return self._distill_stage(self._loss, s_feats, t_feats)
