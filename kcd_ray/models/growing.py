"""The growing student of education distillation (docs/methods/ed.md §5 and 8): a zoo model trained grade by grade.

The whole zoo model is built once, with its own initialisation. Its backbone is cut at resolution-stage
boundaries (:data:`SPLITS`, docs/methods/ed.md §5.2): grade ``g < G`` runs the stem and stages ``1..g`` and a *teaching
reference* head ``TR_g`` (docs/methods/ed.md §5.3: ``Linear(GAP(ReLU(BN(Conv1x1_{C_g -> C_fin}(x)))))`` with ``K_g``
outputs); grade ``G`` runs every stage (trailing stages merge into it) and the architecture's native head. A
module outside the active grade is never called, so it gets no gradient (SGD skips it, weight decay included)
and its BN statistics do not move: inactive stages stay as initialised until their grade.

:class:`GrowingStudent` *adopts* the zoo model's top-level children, so its ``state_dict()`` has exactly the
zoo model's keys and shapes (``tests/fixtures/cifar_model_state_dicts.json``) at every grade: a checkpoint or
``final_model.pt`` of it loads with :func:`kcd_ray.models.load_model` like any student. The TR heads live
outside that state dict (the ED distiller registers them as its own submodule ``tr_heads``, so they are trained
and checkpointed with the run; they are discarded at the end, docs/methods/ed.md §5.3).

Logit layouts: :meth:`GrowingStudent.grade_logits` gives the ``K_g`` logits in class-*position* order (the
curriculum's order; the KD slice of group h is ``[o_h, o_h + n_h)``); :meth:`GrowingStudent.forward` gives the
usual ``num_classes`` logits in *label* order: at grade G the native model's, before it the ``K_g`` logits put in
their label columns and the unseen classes padded with the row's minimum minus :data:`PAD_MARGIN` (never
predicted; their cross-entropy is large, so an engine's ``test_loss`` before the last grade is not comparable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kcd_ray.config import ConfigError

from .layers import global_pool, run_stage
from .mobilenetv2 import MobileNetV2
from .resnet import CifarResNet
from .resnetv2 import ResNetV2
from .shufflenetv1 import ShuffleNetV1
from .shufflenetv2 import ShuffleNetV2
from .vgg import VGG
from .wrn import WideResNet

PAD_MARGIN = 50.0

Fn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class ArchSplit:
    """One architecture family cut at its resolution stages: ``stem(m, x)``, ``stages[i](m, x, input_size)``,
    ``head(m, x)`` (the native head after the last stage), and the top-level module names of each part."""

    stem: Fn
    stages: tuple[Fn, ...]
    head: Fn
    stem_modules: tuple[str, ...]
    stage_modules: tuple[tuple[str, ...], ...]
    head_modules: tuple[str, ...]


def _resnet_like(n_stages: int, stem_modules=("conv1", "bn1"), head="fc") -> ArchSplit:
    names = tuple(f"layer{i + 1}" for i in range(n_stages))
    return ArchSplit(
        stem=lambda m, x: F.relu(m.bn1(m.conv1(x))),
        stages=tuple((lambda m, x, h, n=n: run_stage(getattr(m, n), x)[0]) for n in names),
        head=lambda m, x: getattr(m, head)(global_pool(x)),
        stem_modules=stem_modules, stage_modules=tuple((n,) for n in names), head_modules=(head,))


def _wrn() -> ArchSplit:
    names = ("block1", "block2", "block3")
    return ArchSplit(
        stem=lambda m, x: m.conv1(x),
        stages=tuple((lambda m, x, h, n=n: getattr(m, n)(x)) for n in names),
        head=lambda m, x: m.fc(global_pool(m.relu(m.bn1(x)))),
        stem_modules=("conv1",), stage_modules=tuple((n,) for n in names), head_modules=("bn1", "fc"))


def _vgg() -> ArchSplit:
    # block0 is the full-resolution stem; each later block follows a pool (pool3 only at >= 64 px, as VGG.forward).
    return ArchSplit(
        stem=lambda m, x: F.relu(m.block0(x)),
        stages=(lambda m, x, h: F.relu(m.block1(m.pool0(x))),
                lambda m, x, h: F.relu(m.block2(m.pool1(x))),
                lambda m, x, h: F.relu(m.block3(m.pool2(x))),
                lambda m, x, h: F.relu(m.block4(m.pool3(x) if h >= 64 else x))),
        head=lambda m, x: m.classifier(global_pool(x)),
        stem_modules=("block0",), stage_modules=(("block1",), ("block2",), ("block3",), ("block4",)),
        head_modules=("classifier",))


def _mobilenetv2() -> ArchSplit:
    # docs/methods/ed.md §5.2: cuts at feats[1] (blocks 0-1) and feats[3] (blocks 2-4); blocks 5-6 and conv2 end the
    # body.
    def blocks(idx):
        def run(m, x, h):
            for i in idx:
                x = m.blocks[i](x)
            return x
        return run

    last = blocks((5, 6))
    return ArchSplit(
        stem=lambda m, x: m.conv1(x),
        stages=(blocks((0, 1)), blocks((2, 3, 4)), lambda m, x, h: m.conv2(last(m, x, h))),
        head=lambda m, x: m.classifier(global_pool(x)),
        stem_modules=("conv1",), stage_modules=(("blocks.0", "blocks.1"), ("blocks.2", "blocks.3", "blocks.4"),
                                                ("blocks.5", "blocks.6", "conv2")),
        head_modules=("classifier",))


def _shufflev2() -> ArchSplit:
    base = _resnet_like(3, head="linear")
    return ArchSplit(stem=base.stem, stages=base.stages,
                     head=lambda m, x: m.linear(global_pool(F.relu(m.bn2(m.conv2(x))))),
                     stem_modules=base.stem_modules, stage_modules=base.stage_modules,
                     head_modules=("conv2", "bn2", "linear"))


# (class, split builder): isinstance order matters only for subclasses (none here).
SPLITS: tuple[tuple[type, Callable[[], ArchSplit]], ...] = (
    (CifarResNet, lambda: _resnet_like(3)),
    (ResNetV2, lambda: _resnet_like(4, head="linear")),
    (WideResNet, _wrn),
    (VGG, _vgg),
    (MobileNetV2, _mobilenetv2),
    (ShuffleNetV1, lambda: _resnet_like(3, head="linear")),
    (ShuffleNetV2, _shufflev2),
)


def arch_split(model: nn.Module) -> ArchSplit:
    """The stage split of a zoo model; a one-line error for architectures without one (ImageNet models)."""
    for cls, build in SPLITS:
        if isinstance(model, cls):
            return build()
    name = getattr(model, "arch", type(model).__name__)
    raise ConfigError(f"model: {name!r} has no education-distillation split (docs/methods/ed.md §5.2 covers the "
                      "CIFAR zoo: resnet8..110, resnet8x4/32x4, ResNet50, wrn_*, vgg*, MobileNetV2, ShuffleV1, "
                      "ShuffleV2)")


def grade_plan(num_stages: int, grades: int, arch: str = "") -> list[list[int]]:
    """Stage indices active in each grade: grade g < G runs stages 0..g-1, grade G runs every stage
    (trailing stages merge into the last grade). Fewer stages than grades is refused (docs/methods/ed.md §5.2)."""
    if grades > num_stages:
        raise ConfigError(f"curriculum.groups: {grades} grades but model {arch!r} has {num_stages} resolution stages; "
                          f"use at most {num_stages} groups (docs/methods/ed.md §5.2)")
    if grades < 1:
        raise ConfigError(f"curriculum.groups: expected >= 1, got {grades}")
    return [list(range(g)) for g in range(1, grades)] + [list(range(num_stages))]


class TRBlock(nn.Module):
    """The teaching-reference head of grade g < G (docs/methods/ed.md §5.3): Conv1x1 (no bias) -> BN -> ReLU
    (``relu``) -> average pool to ``grid`` x ``grid`` (1 = global) -> flatten -> Linear to ``K_g`` logits."""

    def __init__(self, in_channels: int, width: int, num_outputs: int, relu: bool = True, grid: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu, self.grid = bool(relu), int(grid)
        self.fc = nn.Linear(width * self.grid * self.grid, num_outputs)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        if self.relu:
            x = F.relu(x)
        x = F.adaptive_avg_pool2d(x, self.grid) if self.grid > 1 else F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


def _last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


class GrowingStudent(nn.Module):
    """A zoo model grown grade by grade. ``seen`` = ``[K_1, ..., K_G]`` (``K_G`` = the model's classes);
    ``order``: position -> label (None = identity). ``grade`` (1-based) selects what runs; set it with
    :meth:`set_grade`. The TR heads are ``self.tr_heads`` (held outside this module's state dict)."""

    def __init__(self, net: nn.Module, seen: Sequence[int], order: Optional[torch.Tensor] = None, *,
                 tr_relu: bool = True, tr1_grid: int = 1):
        super().__init__()
        arch = getattr(net, "arch", type(net).__name__)
        split = arch_split(net)
        seen = [int(k) for k in seen]
        if seen[-1] != int(net.num_classes) or any(b <= a for a, b in zip(seen, seen[1:])) or seen[0] < 1:
            raise ValueError(f"GrowingStudent: seen classes {seen} must increase to the model's {net.num_classes}")
        self.plan = grade_plan(len(split.stages), len(seen), arch)
        for name, child in net.named_children():  # the zoo model's own modules: identical state-dict keys
            self.add_module(name, child)
        object.__setattr__(self, "_net", net)
        object.__setattr__(self, "_split", split)
        self.arch, self.num_classes = arch, int(net.num_classes)
        self.seen, self.num_grades, self.grade = seen, len(seen), 1
        identity = order is None or torch.equal(torch.as_tensor(order), torch.arange(self.num_classes))
        self.register_buffer("order", None if identity else torch.as_tensor(order, dtype=torch.long), persistent=False)
        widths = self._stage_channels(net)
        c_fin = _last_linear(net).in_features
        heads = [TRBlock(widths[g - 1], c_fin, seen[g - 1], relu=tr_relu, grid=tr1_grid if g == 1 else 1)
                 for g in range(1, self.num_grades)]
        object.__setattr__(self, "tr_heads", nn.ModuleList(heads))  # hidden: see the module doc

    def _stage_channels(self, net: nn.Module) -> list[int]:
        """Channels at the end of each stage (one dummy forward at 32 px, eval mode, no grad)."""
        p = next(net.parameters())
        was = net.training
        net.eval()
        out = []
        with torch.no_grad():
            x = self._split.stem(net, torch.zeros(1, 3, 32, 32, device=p.device, dtype=p.dtype))
            for stage in self._split.stages:
                x = stage(net, x, 32)
                out.append(int(x.shape[1]))
        net.train(was)
        return out

    # ------------------------------------------------------------------ grades
    def set_grade(self, grade: int) -> None:
        if not 1 <= int(grade) <= self.num_grades:
            raise ValueError(f"grade {grade}: expected 1..{self.num_grades}")
        self.grade = int(grade)

    def modules_of_grade(self, grade: int) -> list[str]:
        """Top-level module names that first run in ``grade`` (stem in grade 1, the native head in grade G)."""
        before = set(self.plan[grade - 2]) if grade > 1 else set()
        names = list(self._split.stem_modules) if grade == 1 else []
        for i in self.plan[grade - 1]:
            if i not in before:
                names += list(self._split.stage_modules[i])
        if grade == self.num_grades:
            names += list(self._split.head_modules)
        return names

    def body(self, x: torch.Tensor, grade: Optional[int] = None) -> torch.Tensor:
        g = self.grade if grade is None else int(grade)
        h = x.shape[2]
        x = self._split.stem(self._net, x)
        for i in self.plan[g - 1]:
            x = self._split.stages[i](self._net, x, h)
        return x

    def grade_logits(self, x: torch.Tensor, grade: Optional[int] = None) -> torch.Tensor:
        """The ``K_g`` logits of grade g in class-position order (what the ED loss trains)."""
        g = self.grade if grade is None else int(grade)
        feats = self.body(x, g)
        if g < self.num_grades:
            return self.tr_heads[g - 1](feats)
        z = self._split.head(self._net, feats)
        return z if self.order is None else z[:, self.order]

    def to_label_order(self, z_pos: torch.Tensor) -> torch.Tensor:
        """``K_g`` position-ordered logits -> ``num_classes`` label-ordered ones, unseen classes padded low."""
        k_g = z_pos.shape[1]
        if k_g == self.num_classes:
            return z_pos if self.order is None else z_pos[:, torch.argsort(self.order)]
        fill = z_pos.detach().amin(dim=1, keepdim=True) - PAD_MARGIN
        out = fill.expand(z_pos.shape[0], self.num_classes).clone().to(z_pos.dtype)
        cols = torch.arange(k_g, device=z_pos.device) if self.order is None else self.order[:k_g]
        return out.index_copy(1, cols, z_pos)

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        if self.grade == self.num_grades:
            return self._net(x, is_feat=is_feat, preact=preact)
        if is_feat:
            raise ValueError(f"GrowingStudent: feature taps are only defined at the last grade (now grade "
                             f"{self.grade} of {self.num_grades}); ED distils logits only (docs/methods/ed.md A18)")
        return self.to_label_order(self.grade_logits(x))

    # ------------------------------------------------------------------ plumbing
    def train(self, mode: bool = True):
        super().train(mode)
        self._net.training = mode
        self.tr_heads.train(mode)
        return self

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.tr_heads._apply(fn, recurse)  # idempotent for .to()/.float(); also applied when a distiller holds them
        return self
