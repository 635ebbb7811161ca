"""Population Based Training over the temperature and KCD's kept fraction: the sweep-file
checks, and one real PBT sweep on Ray Tune whose trials take over each other's kcd_ray checkpoints."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from kcd_ray.config import ConfigError
from kcd_ray.models import build_model, save_model
from kcd_ray.sweeps.spec import load_sweep

BASE = {"data": {"name": "digits", "image_size": 16, "val_fraction": 0.2}, "optim": {"epochs": 4},
        "scaling": {"num_workers": 0}, "kcd": {"enabled": True, "summary": False}}
SPACE = {"distill.temperature.T": [2.0, 4.0, 8.0], "kcd.rho": [0.5, 0.7, 0.9]}


def test_pbt_settings_are_checked_with_one_line_each():
    sw = load_sweep({"base": BASE, "space": SPACE, "pbt": True})
    assert sw.pbt == {"interval": 2, "metric": "val_top1", "mode": "max", "quantile": 0.25,
                      "resample_probability": 0.25,
                      "mutate": ["distill.temperature.T", "kcd.rho"]}
    cases = [({"pbt": {"intervall": 2}}, "pbt.intervall: unknown key"),
             ({"pbt": {"interval": 4}}, r"pbt.interval: expected an integer in 1..optim.epochs-1 \(3\)"),
             ({"pbt": {"mutate": ["optim.lr"]}}, r"pbt.mutate: \['optim.lr'\]: expected keys of space"),
             ({"pbt": {"metric": "final_top1"}},
              "pbt.metric: 'final_top1' is not a metric the runs report every epoch"),
             ({"pbt": True, "asha": True}, "pick one scheduler"),
             ({"pbt": True, "include_kd_baseline": True}, "the baseline would join the population"),
             ({"pbt": True, "base": {**BASE, "kcd": {"enabled": True}}}, "pbt: set kcd.summary=false"),
             ({"pbt": True, "base": {**BASE, "scaling": {"num_workers": 1}}}, r"pbt: needs in-process trials")]
    for extra, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            load_sweep({"base": BASE, "space": SPACE, **extra})


@pytest.mark.ray
@pytest.mark.slow  # ~35 s; the default run's Tune path: tests/test_tune.py (grid, budgets, ASHA, the cache)
def test_pbt_trials_take_over_checkpoints_and_the_winning_schedule_is_drawn(ray_session, tmp_path):
    from kcd_ray.ray_layer.tune.sweep import run_sweep

    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    save_model(teacher, build_model("resnet8", 4))
    base = {"model": "resnet8",
            "data": {"name": "synthetic", "root": str(tmp_path / "data"), "val_fraction": 0.25,
                     "synthetic": {"num_train": 96, "num_test": 40, "num_classes": 4, "image_size": 8}},
            "optim": {"epochs": 3, "batch_size": 32, "lr": 0.05, "threads": 1},
            "scaling": {"num_workers": 0, "cpus_per_worker": 0.5, "data_cpus": 0.25},
            "distill": {"teacher": str(teacher), "temperature": {"schedule": "constant", "T": 4.0}},
            "kcd": {"enabled": True, "summary": False, "interval": 1, "stages": 2}, "run": {"verbose": 0}}
    folder = run_sweep({"name": "pbt", "base": base, "space": {"distill.temperature.T": [2.0, 8.0]}, "search": "grid",
                        "pbt": {"interval": 1, "quantile": 0.5}, "storage_path": str(tmp_path / "sweeps")})
    runs = sorted((folder / "runs").iterdir())
    assert len(runs) == 2

    def rows(r):
        return [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]

    def takeover(r):
        return [h for h in map(json.loads, (r / "history.jsonl").read_text().splitlines())
                if h["event"] == "resume" and h["start_epoch"] == 2]

    taken = [r for r in runs if takeover(r)]
    assert taken, "no trial took over the other's checkpoint at epoch 1 (quantile 0.5, 2 trials)"
    donor = next(r for r in runs if r != taken[0])
    # The exploited trial continues the donor's run: its first two epochs are the donor's, loss for loss.
    assert [x["train_loss"] for x in rows(taken[0])[:2]] == [x["train_loss"] for x in rows(donor)[:2]]
    assert rows(taken[0])[0]["T"] == rows(donor)[0]["T"]
    sched = list(csv.DictReader(open(folder / "pbt_schedule.csv")))
    assert [int(r["epoch"]) for r in sched] == [0, 1, 2]
    assert {float(r["T"]) for r in sched} <= {2.0, 8.0}
    assert 0 < float(sched[-1]["kept_fraction"]) < 1.0  # KCD condensed along the winner's lineage
    assert (folder / "pbt_schedule.png").stat().st_size > 1000
