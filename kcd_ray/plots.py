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
                beside_key: str | None = None, beside_err_key: str | None = None) -> Path:
    """Top-1 against compute_ratio for every row (a trial, or a point averaged over seeds with ``err_key`` its
    error bar), one colour per strategy (each row's ``info``: its recorded label, colour and marker); the Pareto
    front (rows flagged ``pareto``) joined. ``beside_key``: a second panel with the same rows' other figure (the
    test accuracy beside a front chosen on validation), the same rows marked, ``beside_err_key`` its error bar."""
    fig = Figure(figsize=(13.0 if beside_key else 7.2, 5.0))
    ylabel = f"{y_key} (%)" + (" (mean +- SE over seeds)" if err_key else "")
    _pareto_axes(fig.add_subplot(1, 2 if beside_key else 1, 1), rows, y_key, err_key, title, ylabel)
    if beside_key:
        _pareto_axes(fig.add_subplot(1, 2, 2), rows, beside_key, beside_err_key, f"{beside_key} of the same "
                     f"trials (front chosen on {y_key})", f"{beside_key} (%)")
    return _save(fig, path)


def _flops_scale(values) -> tuple[float, str]:
    """(divisor, unit) that puts cumulative FLOPs in a readable range."""
    top = max((v for v in values if v), default=1.0)
    for div, unit in ((1e18, "EFLOPs"), (1e15, "PFLOPs"), (1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs")):
        if top >= div:
            return div, unit
    return 1.0, "FLOPs"


def accuracy_axes(ax_epoch, ax_compute, runs: dict[str, list[dict]], key: str = "top1") -> None:
    """``key`` of each run against its epochs and against its cumulative compute (the compute ledger's
    ``flops_total``): a run that saves compute reaches its accuracy further left on the second panel."""
    div, unit = _flops_scale([m.get("flops_total") for hist in runs.values() for m in hist])
    for label, hist in runs.items():
        pts = [m for m in hist if m.get(key) is not None]
        line = ax_epoch.plot([m.get("epoch", i) + 1 for i, m in enumerate(pts)], [m[key] for m in pts], marker=".",
                             label=label)[0]
        done = [m for m in pts if m.get("flops_total") is not None]
        if done:
            ax_compute.plot([m["flops_total"] / div for m in done], [m[key] for m in done], marker=".",
                            color=line.get_color(), label=label)
    ax_epoch.set(xlabel="epoch", ylabel=f"{key} (%)")
    ax_compute.set(xlabel=f"cumulative compute ({unit}, the compute ledger's count)", ylabel=f"{key} (%)")
    ax_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))


def curves_plot(metrics: list[dict], path: Path, title: str) -> Path:
    """Per-epoch curves of one run: test (and validation) top-1 against epochs and against cumulative compute,
    kept fraction, temperature, loss terms, evaluation losses."""
    fig = Figure(figsize=(14, 7))
    axes = [fig.add_subplot(2, 3, i) for i in range(1, 7)]
    ep = [m.get("epoch", i) + 1 for i, m in enumerate(metrics)]

    def line(ax, key, **kw):
        ys = [m.get(key) for m in metrics]
        if any(y is not None for y in ys):
            ax.plot([e for e, y in zip(ep, ys) if y is not None], [y for y in ys if y is not None], **kw)

    accuracy_axes(axes[0], axes[1], {"test top-1": metrics})
    if any(m.get("val_top1") is not None for m in metrics):
        accuracy_axes(axes[0], axes[1], {"validation top-1": metrics}, key="val_top1")
    axes[0].set_ylabel("top-1 (%)")
    axes[1].set_ylabel("top-1 (%)")
    line(axes[2], "kept_fraction", color="tab:green", marker=".")
    axes[2].set_ylabel("kept fraction")
    axes[2].set_ylim(0, 1.05)
    line(axes[3], "T", color="tab:purple", marker=".")
    axes[3].set_ylabel("temperature T")
    line(axes[4], "train_loss", label="total", color="black", lw=2)
    for key in sorted({k for m in metrics for k in m if k.startswith("loss_")}):
        line(axes[4], key, label=key[5:], alpha=0.8)
    axes[4].set_ylabel("train loss")
    line(axes[5], "test_loss", label="test", marker=".")
    line(axes[5], "val_loss", label="validation", marker=".")
    axes[5].set_ylabel("evaluation loss")
    for i, ax in enumerate(axes):
        if i != 1:
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def compare_plot(runs: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Several runs side by side (the demo's KD and KD+KCD): test top-1 against epochs and against cumulative
    compute, and the kept fraction of the training set per epoch."""
    fig = Figure(figsize=(15, 4.3))
    a1, a2, a3 = (fig.add_subplot(1, 3, i) for i in range(1, 4))
    accuracy_axes(a1, a2, runs)
    a1.set_title("accuracy per epoch", fontsize=10)
    a2.set_title("accuracy per unit of compute", fontsize=10)
    for label, hist in runs.items():
        a3.step([m["epoch"] + 1 for m in hist], [100 * m.get("kept_fraction", 1.0) for m in hist], where="post",
                label=label)
    a3.set(xlabel="epoch", ylabel="kept fraction of the training set (%)", title="condensation", ylim=(0, 105))
    for a in (a1, a2, a3):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)
