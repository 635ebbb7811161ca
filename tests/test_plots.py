"""The figures a person looks at: accuracy against epochs and against the compute ledger's cumulative FLOPs."""

from __future__ import annotations

from matplotlib.figure import Figure

from kcd_ray.plots import accuracy_axes, compare_plot, curves_plot


def _history(flops_per_epoch: list[float], top1: list[float], val: bool = True) -> list[dict]:
    rows, total = [], 0.0
    for e, (f, t) in enumerate(zip(flops_per_epoch, top1)):
        total += f
        rows.append({"epoch": e, "top1": t, "flops_total": total, "kept_fraction": f / flops_per_epoch[0],
                     **({"val_top1": t - 1.0, "val_loss": 1.0, "test_loss": 1.1} if val else {})})
    return rows


def test_accuracy_is_drawn_against_cumulative_compute_in_readable_units(tmp_path):
    kd = _history([4e12] * 4, [50, 60, 70, 75])
    kcd = _history([4e12, 3e12, 2e12, 2e12], [50, 61, 69, 74])
    fig = Figure()
    by_epoch, by_compute = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    accuracy_axes(by_epoch, by_compute, {"KD": kd, "KCD": kcd})
    (kd_line, kcd_line) = by_compute.get_lines()
    assert list(kd_line.get_xdata()) == [4, 8, 12, 16] and list(kcd_line.get_xdata()) == [4, 7, 9, 11]  # TFLOPs
    assert "TFLOPs" in by_compute.get_xlabel() and list(kcd_line.get_ydata()) == [50, 61, 69, 74]
    assert [list(line.get_xdata()) for line in by_epoch.get_lines()] == [[1, 2, 3, 4]] * 2
    assert compare_plot({"KD": kd, "KCD": kcd}, tmp_path / "c.png", "t").read_bytes()[:4] == b"\x89PNG"
    assert curves_plot(kcd, tmp_path / "r.png", "t").read_bytes()[:4] == b"\x89PNG"


def test_older_runs_without_ledger_fields_still_draw(tmp_path):
    old = [{"epoch": e, "top1": 10.0 * e} for e in range(3)]
    fig = Figure()
    by_epoch, by_compute = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    accuracy_axes(by_epoch, by_compute, {"old": old})
    assert len(by_epoch.get_lines()) == 1 and by_compute.get_lines() == []
    assert curves_plot(old, tmp_path / "r.png", "t").is_file()
