"""What the benchmarks share: the seeds argument, mean and standard error over seeds, markdown tables, and the
resumable per-point result files (a finished point is read, not rerun)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np


def add_seed_args(ap, default=(0, 1, 2)) -> None:
    ap.add_argument("--seeds", type=int, nargs="+", default=list(default), help="seeds (figures: mean +- s.e.)")


def mean_se(xs) -> tuple[float, float]:
    """Mean and standard error of the mean over the values that are not None (s.e. 0 for one value, NaN for none)."""
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    m = float(np.mean(xs))
    return m, (float(np.std(xs, ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else 0.0)


def fmt_mean_se(xs, digits: int = 2) -> str:
    m, se = mean_se(xs)
    return f"{m:.{digits}f} +- {se:.{digits}f}"


def md_table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table's lines."""
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"] + \
        ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def cached_result(path: Path, compute: Callable[[], dict]) -> dict:
    """The result recorded in ``path`` (JSON), or ``compute()``'s, written there once finished: a benchmark run
    again (or continued in another session) reads its finished points instead of rerunning them."""
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=_jsonable))
    tmp.replace(path)
    return result


def _jsonable(o) -> Optional[object]:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)
