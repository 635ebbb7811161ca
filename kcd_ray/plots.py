"""PNG figures for reports and trackers, drawn with matplotlib's Agg canvas (no display, no global pyplot state)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


_SPARE_COLOURS = ("tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:orange", "tab:purple", "tab:green")


def _style(info: dict, spare) -> dict:
    """Marker, colour and label of a strategy as its runs recorded them; the baseline (a star) gets a dashed line
    at its top-1."""
    star = info.get("marker") == "*"
    return dict(marker=info.get("marker") or "o", s=220 if star else 30, color=info.get("colour") or next(spare),
                alpha=1.0 if star else 0.8, zorder=5 if star else 3,
                label=info.get("label", info.get("name", "?")) + (" (baseline)" if star else ""))


def _pareto_axes(ax, rows: list[dict], y_key: str, err_key: str | None, title: str, ylabel: str) -> None:
    """One panel: ``y_key`` against compute_ratio, one colour per strategy (each row's ``info``), the rows flagged
    ``pareto`` joined as the front."""
    pts = [r for r in rows if r.get("compute_ratio") is not None and r.get(y_key) is not None]
    infos = {r["info"]["tag"]: r["info"] for r in pts}
    spare = iter(_SPARE_COLOURS * 4)
    for tag, info in infos.items():
        members = [r for r in pts if r["info"]["tag"] == tag]
        xs, ys = [r["compute_ratio"] for r in members], [r[y_key] for r in members]
        style = _style(info, spare)
        if info.get("marker") == "*":
            for y in ys:
                ax.axhline(y, color=style["color"], lw=0.8, ls="--", alpha=0.6)
        errs = [r.get(err_key) or 0.0 for r in members] if err_key else None
        if errs and any(errs):
            ax.errorbar(xs, ys, yerr=errs, fmt="none", ecolor=style["color"], elinewidth=1, capsize=3, alpha=0.8,
                        zorder=2)
        ax.scatter(xs, ys, **style)
    front = sorted((r for r in pts if r.get("pareto")), key=lambda r: r["compute_ratio"])
    if front:
        ax.step([r["compute_ratio"] for r in front], [r[y_key] for r in front], where="post", color="tab:orange",
                lw=1.5, label="Pareto front", zorder=1)
        ax.scatter([r["compute_ratio"] for r in front], [r[y_key] for r in front], s=80, facecolors="none",
                   edgecolors="tab:orange", lw=1.5, zorder=4)
    ax.set_xlabel("compute ratio (FLOPs / plain KD's)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(loc="lower right", fontsize=8)


def pareto_plot(rows: list[dict], y_key: str, path: Path, title: str, *, err_key: str | None = None,
                beside_key: str | None = None) -> Path:
    """Top-1 against compute_ratio for every row (a trial, or a point averaged over seeds with ``err_key`` its
    error bar), one colour per strategy (each row's ``info``: its recorded label, colour and marker); the Pareto
    front (rows flagged ``pareto``) joined. ``beside_key``: a second panel with the same rows' other figure (the
    test accuracy beside a front chosen on validation), the same rows marked."""
    fig = Figure(figsize=(13.0 if beside_key else 7.2, 5.0))
    ylabel = f"{y_key} (%)" + (" (mean +- SE over seeds)" if err_key else "")
    _pareto_axes(fig.add_subplot(1, 2 if beside_key else 1, 1), rows, y_key, err_key, title, ylabel)
    if beside_key:
        _pareto_axes(fig.add_subplot(1, 2, 2), rows, beside_key, None, f"{beside_key} of the same trials (front "
                     f"chosen on {y_key})", f"{beside_key} (%)")
    return _save(fig, path)


def curves_plot(metrics: list[dict], path: Path, title: str) -> Path:
    """Per-epoch curves of one run: top-1/top-5, kept fraction, temperature, loss terms."""
    fig = Figure(figsize=(10, 7))
    axes = [fig.add_subplot(2, 2, i) for i in range(1, 5)]
    ep = [m.get("epoch", i) + 1 for i, m in enumerate(metrics)]

    def line(ax, key, **kw):
        ys = [m.get(key) for m in metrics]
        if any(y is not None for y in ys):
            ax.plot([e for e, y in zip(ep, ys) if y is not None], [y for y in ys if y is not None], **kw)

    line(axes[0], "top1", label="top-1", marker=".")
    line(axes[0], "top5", label="top-5", alpha=0.6)
    axes[0].set_ylabel("test accuracy (%)")
    line(axes[1], "kept_fraction", color="tab:green", marker=".")
    axes[1].set_ylabel("kept fraction")
    axes[1].set_ylim(0, 1.05)
    line(axes[2], "T", color="tab:purple", marker=".")
    axes[2].set_ylabel("temperature T")
    line(axes[3], "train_loss", label="total", color="black", lw=2)
    for key in sorted({k for m in metrics for k in m if k.startswith("loss_")}):
        line(axes[3], key, label=key[5:], alpha=0.8)
    axes[3].set_ylabel("train loss")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)
