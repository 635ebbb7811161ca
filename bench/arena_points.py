"""The arena's protocols and points (pure code: no Ray, no data read): each data set's config, each point's config
sections, their priority order, and which budget points their strategy can reach (``selection.budget``, resolved
as a run would resolve it: :func:`kcd_ray.sweeps.feasible.budget_problem`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

# The repo's KD defaults (docs/methods/kcd.md): CE weight 0.1, KD weight 0.9, constant T 4.
KD = {"method": "kd", "gamma": 0.1, "alpha": 0.9, "temperature": {"schedule": "constant", "T": 4.0}}
# Logit standardization (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024; reference
# github.com/sunshangquan/logit-standardization-KD, tools/train.py: --base-temp 2 --kd-weight 9): its recipe, since
# z-scored logits at T 4 with weight 0.9 are a much weaker signal than the method as published.
KD_LS = {**KD, "logit_standardize": True, "alpha": 9.0, "temperature": {"schedule": "constant", "T": 2.0}}
# CTKD (Li et al., AAAI 2023; github.com/zhengli97/CTKD): a learned global temperature, the reference run script's
# values (kcd_ray's ctkd defaults: T in (1, 21), reversal ramp over 10 epochs); the KD weights stay the repo's.
CTKD = {**KD, "temperature": {"schedule": "ctkd"}}
# DKD (Zhao et al., CVPR 2022; github.com/megvii-research/mdistiller, mdistiller/distillers/DKD.py): CE weight 1, its
# own term instead of KD (alpha 1, beta 8, T 4); the reference's 20-epoch warm-up of 240 is 2 of our 15 epochs.
DKD = {"method": "dkd", "gamma": 1.0, "alpha": 0.0, "temperature": {"schedule": "constant", "T": 4.0},
       "options": {"dkd_alpha": 1.0, "dkd_beta": 8.0, "warmup": 2}}

OPTIM = {"batch_size": 64, "lr": 0.05, "scheduler": "cosine", "eval_batch_size": 512, "threads": 1}
DATA = {
    # 17,500 stratified rows of Fashion-MNIST's 60,000 (seed 0), 1/7 of them carved out for validation: 15,000
    # train / 2,500 validation; the whole 10,000-image test set. 28 -> 32 by zero padding, grey replicated to 3.
    "fashion": {"name": "fashion_mnist", "image_size": 32, "channels": 3, "train_subset": 17500,
                "train_subset_seed": 0, "val_fraction": round(2500 / 17500, 6), "val_seed": 0},
    "digits": {"name": "digits", "image_size": 16, "val_fraction": 0.2},
    "synthetic": {"name": "synthetic", "val_fraction": 0.2,
                  "synthetic": {"num_train": 1200, "num_test": 600, "num_classes": 10, "image_size": 16,
                                "duplicate_fraction": 0.5}},
}
TEACHER = {"model": "resnet20", "epochs": 20, "seed": 0}
BUDGETS = (0.4, 0.5, 0.6, 0.75)

# How each family is drawn (kcd_ray.plots.pareto_plot reads a row's "info": tag, label, colour, marker; a star is
# a baseline, drawn with a dashed line at its top-1).
FAMILIES = {
    "kd": {"label": "KD", "colour": "black", "marker": "*"},
    "kd-ls": {"label": "KD + LS", "colour": "tab:brown", "marker": "*"},
    "ctkd": {"label": "CTKD", "colour": "tab:pink", "marker": "D"},
    "dkd": {"label": "DKD", "colour": "tab:olive", "marker": "P"},
    "kcd": {"label": "KCD (on KD)", "colour": "tab:blue", "marker": "o"},
    "kcd-ls": {"label": "KCD (on KD + LS)", "colour": "tab:cyan", "marker": "s"},
    "random": {"label": "random subset", "colour": "tab:gray", "marker": "o"},
    "unixkd": {"label": "UNIXKD", "colour": "tab:purple", "marker": "v"},
    "infobatch": {"label": "InfoBatch", "colour": "tab:green", "marker": "^"},
}
BUDGETED = ("kcd", "kcd-ls", "random", "unixkd", "infobatch")  # the families run at each budget


@dataclass(frozen=True)
class Point:
    name: str  # e.g. "kcd-0.5"
    family: str  # a FAMILIES key
    budget: Optional[float]  # selection.budget; None: the method's own compute (1.0)
    sections: dict = field(default_factory=dict, compare=False)  # config sections over the protocol's base

    def info(self) -> dict:
        return {"name": self.family, "tag": self.family, **FAMILIES[self.family]}


def deep_merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` laid on top, section by section (neither is changed)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def family_sections(family: str, budget: Optional[float], kcd: dict) -> dict:
    """The config sections of a family's point at ``budget``; ``kcd``: KCD's schedule (interval, stages)."""
    kcd_on = {"kcd": {"enabled": True, **kcd}, "selection": {"strategy": "kcd"}}
    sections = {
        "kd": {"selection": {"strategy": "none"}},
        "kd-ls": {"selection": {"strategy": "none"}, "distill": KD_LS},
        "ctkd": {"selection": {"strategy": "none"}, "distill": CTKD},
        "dkd": {"selection": {"strategy": "none"}, "distill": DKD},
        "kcd": kcd_on,
        "kcd-ls": {**kcd_on, "distill": KD_LS},
        "random": {"selection": {"strategy": "random"}},
        "unixkd": {"selection": {"strategy": "unixkd"}},
        "infobatch": {"selection": {"strategy": "infobatch"}},
    }[family]
    return deep_merge(sections, {"selection": {"budget": budget}}) if budget is not None else sections


def budget_priority(budgets) -> list[float]:
    """The budgets in the order their points run: nearest 0.5 first (the target), the smaller of a tie first."""
    return sorted(budgets, key=lambda b: (round(abs(b - 0.5), 9), b))


def ordered_points(budgets=BUDGETS, kcd: Optional[dict] = None) -> list[Point]:
    """Every point, the most important first: KD and KD + LS; then for the two budgets nearest 0.5 KCD, random,
    UNIXKD, KCD on KD + LS and InfoBatch; CTKD and DKD; then the other budgets the same way."""
    kcd = kcd or {"interval": 1, "stages": 3}
    out = [Point(f, f, None, family_sections(f, None, kcd)) for f in ("kd", "kd-ls")]
    order = budget_priority(budgets)
    for i in range(0, len(order), 2):
        pair = order[i:i + 2]
        for fam in ("kcd", "random", "unixkd", "kcd-ls", "infobatch"):
            out += [Point(f"{fam}-{b:g}", fam, b, family_sections(fam, b, kcd)) for b in pair]
        if i == 0:
            out += [Point(f, f, None, family_sections(f, None, kcd)) for f in ("ctkd", "dkd")]
    return out


def select_points(points: list[Point], names: Optional[list]) -> list[Point]:
    """The points named (in the priority order), KD always among them (every headline compares with it)."""
    if not names:
        return points
    known = {p.name for p in points}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--points: unknown {unknown}; known: {sorted(known)}")
    wanted = set(names) | {"kd"}
    return [p for p in points if p.name in wanted]


def base_config(data: str, out: str, epochs: int, teacher: str, overrides: Optional[dict] = None) -> dict:
    """The protocol's config of a plain-KD student run on ``data`` (a DATA key), before a point's sections."""
    base = {"model": "resnet8", "data": {**DATA[data], "root": f"{out}/data"},
            "optim": {**OPTIM, "epochs": epochs},
            "distill": {**KD, "teacher": teacher, "cache": "exact"},
            "kcd": {"enabled": False}, "selection": {"strategy": "none"},
            "scaling": {"num_workers": 0, "cpus_per_worker": 1.0},
            "run": {"verbose": 0, "checkpoints_to_keep": 1, "storage_path": f"{out}/{data}/runs"}}
    return deep_merge(base, overrides or {})


def run_config(base: dict, point: Point, seed: int) -> dict:
    """A point's config for one seed: the base, the point's sections, optim.seed, its own run folder name."""
    cfg = deep_merge(base, point.sections)
    return deep_merge(cfg, {"optim": {"seed": seed}, "run": {"name": f"{point.name}-s{seed}"}})


def teacher_config(base: dict, threads: int, teacher: Optional[dict] = None) -> dict:
    """The teacher's run: the student's data and optimiser, ``teacher``'s (TEACHER's) model, epochs and seed,
    cross-entropy, ``threads`` torch threads."""
    t = teacher or TEACHER
    cfg = {k: v for k, v in copy.deepcopy(base).items() if k not in ("distill", "kcd", "selection")}
    cfg["model"] = t["model"]
    cfg["optim"].update(epochs=t["epochs"], seed=t["seed"], threads=threads)
    cfg["scaling"].update(cpus_per_worker=float(threads))
    cfg["run"].update(name="teacher", verbose=1)
    return cfg


def unreachable(points: list[Point], base: dict, data_plan, flops: tuple) -> dict:
    """{point name: why its strategy cannot meet its budget} (the one line a run would stop with), for the
    points with a budget, on the base run's data set and measured FLOPs."""
    from kcd_ray.config import load_config
    from kcd_ray.sweeps.feasible import budget_problem

    out = {}
    for p in points:
        if p.budget is None:
            continue
        why = budget_problem(load_config(base=run_config(base, p, 0)), "distill", data_plan, flops)
        if why:
            out[p.name] = why
    return out


def parse_shard(text: Optional[str]) -> tuple[int, int]:
    """``k/n`` -> (k, n), 1 <= k <= n; None -> (1, 1)."""
    if not text:
        return 1, 1
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard: {text!r}; expected k/n, e.g. 1/2") from None
    if not 1 <= k <= n:
        raise ValueError(f"--shard: {text!r}; expected 1 <= k <= n")
    return k, n


def shard_runs(runs: list, k: int, n: int) -> list:
    """Shard k of n: every n-th run of the full ordered list, from the k-th (a fixed share, whatever has
    finished, so shards started at different times never take the same run)."""
    return runs[k - 1::n]
