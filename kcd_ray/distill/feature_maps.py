"""Distillers that match intermediate feature maps: FitNet, AT, NST, VID, KDSVD (RepDistiller definitions).

Feature lists follow the model zoo: ``feats[0]`` is the stem, ``feats[1:-1]`` the stage outputs and
``feats[-1]`` the pooled vector. Multi-layer methods pair the stages of the two nets in order and stop
at the shorter list; maps of different spatial size are average-pooled to the smaller one.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kcd_ray.config import ConfigError
from kcd_ray.distill.base import Distiller, register_distiller
from kcd_ray.distill.connectors import ChannelAdapter, f32, paired, pool_to_match, regressor


def middle_pairs(s_feats, t_feats, n: int):
    return list(zip(s_feats[1:-1][:n], t_feats[1:-1][:n]))


class _MultiLayer(Distiller):
    """Shared set-up for methods on the paired stage outputs ``feats[1:-1]``."""

    needs_features = True

    def __init__(self, student, teacher, cfg, num_classes, **kw):
        super().__init__(student, teacher, cfg, num_classes, **kw)
        self.n_pairs = paired(self.s_shapes[1:-1], self.t_shapes[1:-1])
        if self.n_pairs < self.min_pairs:
            raise ConfigError(
                f"distill.method: {self.name!r} needs at least {self.min_pairs} intermediate feature maps per net; "
                f"got shapes {[tuple(s) for s in self.s_shapes]} and {[tuple(s) for s in self.t_shapes]}"
            )

    min_pairs = 1


@register_distiller("fitnet")
class FitNet(Distiller):
    """FitNets hint: MSE between a regressed student map and the teacher's map at ``hint_layer``
    (option, default 2 like RepDistiller). The regressor adapts channels and spatial size."""

    needs_features = True
    default_beta = 100.0
    known_options = ("hint_layer",)

    def __init__(self, student, teacher, cfg, num_classes, **kw):
        super().__init__(student, teacher, cfg, num_classes, **kw)
        self.hint_layer = self.opt("hint_layer", 2, int)
        n = min(len(self.s_shapes), len(self.t_shapes))
        if not -n <= self.hint_layer < n:
            raise ConfigError(f"distill.options.hint_layer: {self.hint_layer} is out of range for {n} feature maps")
        self.regressor = regressor(self.s_shapes[self.hint_layer], self.t_shapes[self.hint_layer])

    def extra_loss(self, s_feats, t_feats, s_logits, t_logits, batch, T, epoch):
        f_s = self.regressor(s_feats[self.hint_layer])
        return F.mse_loss(f32(f_s), f32(t_feats[self.hint_layer]))


def attention_map(f: torch.Tensor, p: float) -> torch.Tensor:
    return F.normalize(f32(f).pow(p).mean(1).flatten(1), dim=1)


@register_distiller("at")
class AT(_MultiLayer):
    """Attention transfer: squared distance of normalised spatial attention maps (channel mean of f^p,
    option ``p`` default 2), summed over the paired stages."""

    default_beta = 1000.0
    known_options = ("p",)

    def __init__(self, student, teacher, cfg, num_classes, **kw):
        super().__init__(student, teacher, cfg, num_classes, **kw)
        self.p = self.opt("p", 2.0)

    def extra_loss(self, s_feats, t_feats, s_logits, t_logits, batch, T, epoch):
        p = self.p
        total = 0.0
        for f_s, f_t in middle_pairs(s_feats, t_feats, self.n_pairs):
            f_s, f_t = pool_to_match(f_s, f_t)
            total = total + (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()
        return total


def _poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # (B, Ca, L), (B, Cb, L) -> (B, Cb, Ca) squared inner products between channel responses
    return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)


@register_distiller("nst")
class NST(_MultiLayer):
    """Neuron selectivity transfer: MMD with a degree-2 polynomial kernel between the spatially
    normalised channel responses of the two nets, summed over the paired stages."""

    default_beta = 50.0

    def extra_loss(self, s_feats, t_feats, s_logits, t_logits, batch, T, epoch):
        total = 0.0
        for f_s, f_t in middle_pairs(s_feats, t_feats, self.n_pairs):
            f_s, f_t = pool_to_match(f_s, f_t)
            f_s = F.normalize(f32(f_s).flatten(2), dim=2)
            f_t = F.normalize(f32(f_t).flatten(2), dim=2)
            total = total + (_poly_kernel(f_t, f_t).mean() + _poly_kernel(f_s, f_s).mean()
                             - 2 * _poly_kernel(f_s, f_t).mean())
        return total


class VIDHead(nn.Module):
    """Gaussian q(t | s): a 1x1-conv mean regressor and a per-channel learned variance."""

    def __init__(self, s_channels: int, mid_channels: int, t_channels: int, init_var: float = 5.0, eps: float = 1e-5):
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(s_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, t_channels, 1, bias=False),
        )
        # softplus(log_scale) + eps == init_var at the start
        self.log_scale = nn.Parameter(torch.full((t_channels,), math.log(math.expm1(init_var - eps))))
        self.eps = eps

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s, f_t = pool_to_match(f_s, f_t)
        mean = f32(self.regressor(f_s))
        var = (F.softplus(self.log_scale) + self.eps).view(1, -1, 1, 1)
        return (0.5 * ((mean - f32(f_t)) ** 2 / var + var.log())).mean()


@register_distiller("vid")
class VID(_MultiLayer):
    """Variational information distillation: negative log-likelihood of each teacher stage under a
    Gaussian predicted from the paired student stage, summed over the stages."""

    default_beta = 1.0
    known_options = ("init_var",)

    def __init__(self, student, teacher, cfg, num_classes, **kw):
        super().__init__(student, teacher, cfg, num_classes, **kw)
        init_var = self.opt("init_var", 5.0, gt=1e-5)
        self.heads = nn.ModuleList(
            VIDHead(s[0], t[0], t[0], init_var)
            for s, t in zip(self.s_shapes[1:-1][: self.n_pairs], self.t_shapes[1:-1][: self.n_pairs])
        )

    def extra_loss(self, s_feats, t_feats, s_logits, t_logits, batch, T, epoch):
        pairs = middle_pairs(s_feats, t_feats, self.n_pairs)
        return sum(head(f_s, f_t) for head, (f_s, f_t) in zip(self.heads, pairs))


def _clean(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _right_singular(feat: torch.Tensor, n: int, iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-n singular values (normalised) and right singular vectors (B, C, n) of the (HW x C) map.

    Subspace iteration on the Gram matrix instead of `linalg.svd`: SVD's backward divides by differences of
    singular values, which are zero for the many null directions of a small (HW < C) map, and its gradients
    turn to inf/NaN on the first step. The iteration is differentiable and stable, and converges to the same
    top-n subspace (signs are aligned to the teacher by the caller, as with SVD).
    """
    x = f32(feat).flatten(2).transpose(1, 2)
    c = x.shape[-1]
    n = min(n, c)
    eye = torch.eye(c, device=x.device, dtype=x.dtype)
    g = x.transpose(1, 2) @ x
    g = g / g.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-12)[:, None, None] + 1e-6 * eye
    gen = torch.Generator().manual_seed(0)  # a fixed start: deterministic, and never orthogonal to the top vectors
    v = torch.randn(c, n, generator=gen).to(x).expand(x.shape[0], c, n)
    for _ in range(iters):
        v, _ = torch.linalg.qr(g @ v)
    s = (v * (g @ v)).sum(1).clamp_min(0).sqrt()
    order = s.argsort(dim=1, descending=True)
    s = s.gather(1, order)
    v = v.gather(2, order.unsqueeze(1).expand(-1, c, -1))
    return F.normalize(_clean(s), dim=1), F.normalize(_clean(v), dim=1)


@register_distiller("kdsvd")
class KDSVD(_MultiLayer):
    """Self-supervised KD with SVD: the top-k right singular vectors of each stage (student vectors
    sign-aligned to the teacher's), related across consecutive stages with an RBF kernel; the
    student's kernels match the teacher's. Option ``k`` (default 1). Where the channel counts of a
    pair differ, a 1x1 conv adapts the student's stage (RepDistiller needs equal channels)."""

    default_beta = 1.0
    min_pairs = 2
    known_options = ("k",)

    def __init__(self, student, teacher, cfg, num_classes, **kw):
        super().__init__(student, teacher, cfg, num_classes, **kw)
        self.k = self.opt("k", 1, int, gt=0)
        self.adapters = nn.ModuleList(
            ChannelAdapter(s[0], t[0])
            for s, t in zip(self.s_shapes[1:-1][: self.n_pairs], self.t_shapes[1:-1][: self.n_pairs])
        )

    def extra_loss(self, s_feats, t_feats, s_logits, t_logits, batch, T, epoch):
        losses, prev = [], None
        for adapter, (f_s, f_t) in zip(self.adapters, middle_pairs(s_feats, t_feats, self.n_pairs)):
            s_t, v_t = _right_singular(f_t, self.k)
            _, v_s = _right_singular(adapter(f_s), self.k + 3)
            # align: each teacher vector picks the student vector of largest |cosine|, with its sign
            cos = v_s.transpose(1, 2) @ v_t
            best = cos.abs().amax(dim=1, keepdim=True)
            v_s = v_s @ torch.where(cos.abs() == best, cos.sign(), torch.zeros_like(cos))
            v_t, v_s = v_t * s_t.unsqueeze(1), v_s * s_t.unsqueeze(1)
            if prev is not None:
                v_sb, v_tb = prev
                s_rbf = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).pow(2) / 8)
                t_rbf = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).pow(2) / 8)
                losses.append(_clean((s_rbf - t_rbf.detach()).pow(2)).sum())
            prev = (v_s, v_t)
        return sum(losses) / s_feats[0].shape[0]
