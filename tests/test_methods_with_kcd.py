"""Every registered KD method runs through the real loop with KCD on (in-process Train, real Ray Data).

Two epochs with a condensation at the start of the second, so the method trains on condensed, blended data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kcd_ray.config import load_config
from kcd_ray.distill import DISTILLERS
from kcd_ray.models import build_model, save_model

pytestmark = pytest.mark.ray

METHODS = [m for m in DISTILLERS.names() if m not in ("ce", "ed", "mtkd")]  # ed, mtkd: tests/test_ed.py
# The default run: one of each kind (logits; logits + own term; a feature hint with a connector; relations; the
# holistic graph with its memory bank). Every method runs with `pytest -m slow` (~3 s each on 2 cores); CRD's
# memory bank is also checked under DDP in tests/test_distill_zoo.py.
DEFAULT = ("kd", "dkd", "fitnet", "rkd", "hkd")


@pytest.fixture(scope="module")
def setup(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("methods")
    teacher = tmp / "teacher.pt"
    save_model(teacher, build_model("resnet8x4", 4))  # untrained: this is about plumbing, not accuracy
    return tmp, teacher


@pytest.mark.parametrize("method", [m if m in DEFAULT else pytest.param(m, marks=pytest.mark.slow) for m in METHODS])
def test_method_runs_an_epoch_on_condensed_data(setup, method):
    from kcd_ray.ray_layer.trainer import fit

    tmp, teacher = setup
    cfg = load_config(base={
        "model": "resnet8",
        "data": {"name": "synthetic", "root": str(tmp / "data"),
                 "synthetic": {"num_train": 96, "num_test": 32, "num_classes": 4, "image_size": 16}},
        "optim": {"epochs": 2, "batch_size": 32, "threads": 1, "scheduler": "constant", "lr": 0.01},
        "scaling": {"num_workers": 0},
        "run": {"storage_path": str(tmp / "runs"), "name": method, "verbose": 0},
        "distill": {"method": method, "teacher": str(teacher), "init_epochs": 1},
        "kcd": {"interval": 1, "stages": 2, "rho": 0.5},
    })
    summary = fit(cfg, kind="distill")
    rows = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["samples_seen"] for r in rows] == [96, 72]  # the second epoch is on the condensed set
    assert rows[-1]["kept_fraction"] == pytest.approx(0.75)
    own = {k for k in rows[-1] if k.startswith("loss_")} - {"loss_ce", "loss_kd"}
    if method not in ("kd", "ab", "fsp"):  # AB and FSP add no own term after their init stage (RepDistiller)
        assert own, f"{method}: no loss term of its own was logged: {sorted(rows[-1])}"
    for r in rows:
        assert all(v == v and abs(v) < 1e9 for k, v in r.items() if k.startswith("loss_")), r
