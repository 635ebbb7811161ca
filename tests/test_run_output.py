"""What a run prints on the driver (no Ray cluster needed)."""

from __future__ import annotations


def test_known_ray_noise_is_not_echoed_but_our_lines_are():
    """Lines Ray's own actors print on every run are dropped from the driver's echo; kcd_ray's lines are not."""
    from ray._private import ray_logging

    from kcd_ray.ray_layer.logs import skip_known_ray_noise as _skip_known_ray_noise

    d = ray_logging.stdout_deduplicator
    # The session's deduplicator also holds the lines other tests' Ray workers printed in the last few seconds: a
    # "[kcd_ray] epoch" line from another process would be folded into a "[repeated ...]" count. Start empty.
    before, before_recent = d.skip_re, d.recent
    d.skip_re, d.recent = None, {}
    try:
        _skip_known_ray_noise(state_api_missing=True)
        lines = [
            "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.",
            "[2026-11-22 E 1 2] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: 'c1' has "
            "constructor arguments in the object store and max_restarts > 0. If the arguments ...",
            "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
            "\u2714\ufe0f  Dataset train_03524DAxX5atJ9JuYX6LLZ_0 execution finished in 3.68 seconds",
            "[kcd_ray] epoch 1/18 | loss 0.33 | top1 92.44",
            "ValueError: /runs/x/blends/v000001/bucket-000000.parquet: unreadable blend overlay file",
        ]
        out = d.deduplicate({"ip": "1", "pid": 7, "lines": lines}) + d.flush()
        shown = [line for b in out for line in b["lines"]]
        assert shown == lines[4:]
        d.skip_re = None
        _skip_known_ray_noise(state_api_missing=False)  # a cluster with the dashboard: its warning is real
        assert d.skip_re.search(lines[0]) is None and d.skip_re.search(lines[2])
    finally:
        d.skip_re, d.recent = before, before_recent
