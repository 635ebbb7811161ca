"""Class groups: the classes split into G groups (ED's grades), global and local labels, sample masks
(docs/methods/ed.md §3).

Pure numpy/torch. A :class:`ClassGroups` fixes a class *order* (identity, or a permutation seeded by
``curriculum.seed``) and the group sizes ``n_1..n_G``. Group ``g`` (1-based) holds the classes at *positions*
``o_g .. o_g + n_g - 1`` of that order; ``K_g = o_g + n_g`` classes are seen by grade ``g``.

- **global label**: the data set's label ``y`` (what the student predicts; its final head is in label order);
- **position**: ``pos[y]``, the class's index in the order (the growing student's heads before the last grade
  and the KD slices are in position order; with the identity order position == label);
- **local label** of a group's teacher: ``pos[y] - o_g`` (``y - o_g`` for the identity order).

``train_mask`` / ``labels_by_id`` read the labels of a prepared split once (``iter_split``, label column
only); ``relabel_batches`` filters and relabels batches for a run restricted to some groups with local labels
(a group teacher's run).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from kcd_ray.config import ConfigError


def group_sizes(num_classes: int, groups: int, explicit: Sequence[int] = ()) -> list[int]:
    """``floor(K/G)`` per group with the remainder to the last (docs/methods/ed.md A2), or the explicit sizes
    (checked)."""
    k, g = int(num_classes), int(groups)
    if explicit:
        sizes = [int(s) for s in explicit]
        if len(sizes) != g:
            raise ConfigError(f"curriculum.group_sizes: {len(sizes)} sizes for curriculum.groups={g}")
        if min(sizes) < 1 or sum(sizes) != k:
            raise ConfigError(f"curriculum.group_sizes: {sizes} must be >= 1 each and sum to the {k} classes")
        return sizes
    if g < 1 or g > k:
        raise ConfigError(f"curriculum.groups: {g} groups for {k} classes; expected 1..{k}")
    base = k // g
    return [base] * (g - 1) + [k - (g - 1) * base]


@dataclass(frozen=True, eq=False)
class ClassGroups:
    sizes: tuple[int, ...]
    order: np.ndarray  # position -> global label, int64[K]

    def __post_init__(self):
        order = np.asarray(self.order, dtype=np.int64)
        if sorted(order.tolist()) != list(range(sum(self.sizes))):
            raise ValueError(f"ClassGroups: order must be a permutation of 0..{sum(self.sizes) - 1}")
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))

    @classmethod
    def build(cls, num_classes: int, groups: int, sizes: Sequence[int] = (), class_order: str = "identity",
              seed: int = 0) -> "ClassGroups":
        k = int(num_classes)
        if class_order == "identity":
            order = np.arange(k, dtype=np.int64)
        elif class_order == "permuted":
            order = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x9E3779B9]).permutation(k).astype(np.int64)
        else:
            raise ConfigError(f"curriculum.class_order: {class_order!r} is not one of: identity, permuted")
        return cls(tuple(group_sizes(k, groups, sizes)), order)

    @classmethod
    def from_config(cls, cur, num_classes: int) -> "ClassGroups":
        """From a :class:`kcd_ray.config.CurriculumConfig` and the data set's class count."""
        return cls.build(num_classes, cur.groups, cur.group_sizes, cur.class_order, cur.seed)

    # ------------------------------------------------------------------ sizes and offsets (g is 1-based)
    @property
    def num_classes(self) -> int:
        return int(sum(self.sizes))

    @property
    def num_groups(self) -> int:
        return len(self.sizes)

    def offset(self, g: int) -> int:
        """``o_g``: the first position of group g."""
        self._check(g)
        return int(sum(self.sizes[: g - 1]))

    def size(self, g: int) -> int:
        self._check(g)
        return self.sizes[g - 1]

    def seen(self, g: int) -> int:
        """``K_g``: classes seen by grade g."""
        return self.offset(g) + self.size(g)

    def classes(self, g: int) -> np.ndarray:
        """Global labels of group g (in position order)."""
        return self.order[self.offset(g): self.seen(g)]

    def seen_classes(self, g: int) -> np.ndarray:
        """Global labels of groups 1..g (in position order)."""
        return self.order[: self.seen(g)]

    @property
    def position(self) -> np.ndarray:
        """label -> position (the inverse of ``order``)."""
        pos = np.empty_like(self.order)
        pos[self.order] = np.arange(self.order.size)
        return pos

    @property
    def group_of_label(self) -> np.ndarray:
        """label -> group (1-based)."""
        by_pos = np.repeat(np.arange(1, self.num_groups + 1), self.sizes)
        return by_pos[self.position]

    def _check(self, g: int) -> None:
        if not 1 <= int(g) <= self.num_groups:
            raise ValueError(f"group {g}: expected 1..{self.num_groups}")

    # ------------------------------------------------------------------ subsets and local labels
    def subset_classes(self, groups: Sequence[int]) -> np.ndarray:
        """Global labels of the chosen groups (1-based), in the order the groups are given, each in position order."""
        if not groups:
            return self.order.copy()
        seen = set()
        for g in groups:
            self._check(g)
            if g in seen:
                raise ConfigError(f"curriculum.only_groups: group {g} is listed twice")
            seen.add(g)
        return np.concatenate([self.classes(g) for g in groups])

    def local_lut(self, groups: Sequence[int]) -> np.ndarray:
        """int64[K]: global label -> local label (index in :meth:`subset_classes`), -1 for other classes.
        For one group that is ``pos[y] - o_g``: the group teacher's label."""
        lut = np.full(self.num_classes, -1, np.int64)
        cls = self.subset_classes(groups)
        lut[cls] = np.arange(cls.size)
        return lut

    def describe(self) -> str:
        return ", ".join(f"group {g}: {self.size(g)} classes" for g in range(1, self.num_groups + 1))


# --------------------------------------------------------------------------- samples of a split


def labels_by_id(data_dir: Union[str, os.PathLike], split: str = "train") -> np.ndarray:
    """The labels of a prepared split indexed by sample id (reads the label and id columns once)."""
    from kcd_ray.data.parquet_io import iter_split

    ids, labels = [], []
    for b in iter_split(data_dir, split, columns=["sample_id", "label"]):
        ids.append(b.column("sample_id").to_numpy())
        labels.append(b.column("label").to_numpy())
    ids_a = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    lab = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    out = np.full(ids_a.size, -1, np.int64)
    out[ids_a] = lab  # sample ids are dense 0..N-1 per split
    return out


def class_mask(labels: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """bool[N]: the samples whose label is one of ``classes``."""
    return np.isin(np.asarray(labels), np.asarray(list(classes), dtype=np.int64))


def sequential_order(ids: np.ndarray, labels: np.ndarray, groups: ClassGroups, grade: int,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """ED's batch order (docs/methods/ed.md §3, the code's behaviour): one separately shuffled pass over D_1, then
    D_2, ... D_grade. ``ids``/``labels``: the samples on offer (already restricted, e.g. KCD's kept set). Returns the
    id arrays of the passes; batches never straddle two passes. For in-process feeds (the benchmarks); the Ray
    Data pipeline serves the same kind of order itself (``pipeline.train_dataset(passes=...)``)."""
    g_of = groups.group_of_label[np.asarray(labels)]
    return [rng.permutation(np.asarray(ids)[g_of == h]) for h in range(1, grade + 1)]


def relabel_batches(batches: Iterable[dict], lut: np.ndarray) -> Iterator[dict]:
    """Batches restricted to the classes with ``lut[label] >= 0`` and relabelled ``label -> lut[label]``
    (a group teacher's local labels). Rows of other classes are dropped (the train pipeline never serves them
    when the class-subset selection is published; the test split is filtered here)."""
    table = torch.as_tensor(np.asarray(lut, dtype=np.int64))
    for b in batches:
        local = table[b["label"].long().cpu()]
        keep = local >= 0
        if bool(keep.all()):
            yield {**b, "label": local.to(b["label"].device)}
            continue
        if not bool(keep.any()):
            continue
        idx = keep.nonzero().squeeze(1)
        out = {k: (v[idx.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == keep.shape[0]
                   else v) for k, v in b.items()}
        out["label"] = local[idx].to(b["label"].device)
        yield out


def subset_num_classes(cur, num_classes: int) -> int:
    """Output width of a run's model: the chosen groups' class count with local labels, else the data set's."""
    if cur.only_groups and cur.labels == "local":
        return int(ClassGroups.from_config(cur, num_classes).subset_classes(cur.only_groups).size)
    return int(num_classes)


def optional_groups(cur, num_classes: int) -> Optional[ClassGroups]:
    """The run's class groups when the curriculum uses them (ed, or only_groups), else None."""
    if cur.name == "none" and not cur.only_groups:
        return None
    return ClassGroups.from_config(cur, num_classes)


def local_label_feeds(cur, data_dir, train_batches, test_batches, val_batches=None):
    """Wrap a run's batch callables for ``curriculum.only_groups`` with local labels: all relabelled, the
    evaluation splits filtered to the chosen classes (the train split already is, by the class-subset selection)."""
    from kcd_ray.data.parquet_io import load_meta

    lut = ClassGroups.from_config(cur, int(load_meta(data_dir)["num_classes"])).local_lut(cur.only_groups)
    val = None if val_batches is None else (lambda: relabel_batches(val_batches(), lut))
    return ((lambda epoch: relabel_batches(train_batches(epoch), lut)), (lambda: relabel_batches(test_batches(), lut)),
            val)
