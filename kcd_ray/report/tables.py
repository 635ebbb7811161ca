"""Plain helpers of every report: number formatting, text tables, CSV files, the Pareto front, mean and SE."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if v != v or abs(v) >= 1e5 or (0 < abs(v) < 1e-3):
            return f"{v:.4g}"
        digits = 2 if abs(v) >= 10 else (3 if abs(v) >= 1 else 4)
        return f"{v:.{digits}f}".rstrip("0").rstrip(".")
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def write_csv(rows: list[dict], columns: list[str], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: json.dumps(r[c]) if isinstance(r.get(c), (list, dict)) else r.get(c) for c in columns})
    return path


def pareto_flags(points: list[tuple[float, float]]) -> list[bool]:
    """For (cost, value) pairs: True where no other point costs no more and is worth at least as much (one strictly)."""
    flags = []
    for i, (c, v) in enumerate(points):
        dominated = any(c2 <= c and v2 >= v and (c2 < c or v2 > v) for j, (c2, v2) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def mean_se(xs: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)); no SE from one value."""
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n)
