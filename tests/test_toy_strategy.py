"""Adding a data-selection strategy takes one registered class and one config section, and no edit anywhere else:
a toy strategy written here ("keep the samples with the highest last loss") runs end to end, in-process and on
2 Ray Train workers, is named by the config, planned, reported and drawn as it declares itself."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kcd_ray.config import _f, load_config
from kcd_ray.engine import distributed as D
from kcd_ray.engine.hooks import Selection
from kcd_ray.engine.selection import STRATEGIES, SelectionStrategy
from kcd_ray.models import build_model, save_model


@dataclass
class HighLossConfig:
    fraction: float = _f(0.5, gt=0.0, le=1.0, help="kept share: the samples whose last loss is highest")


class HighLoss(SelectionStrategy):
    """Epoch 0 trains on every sample; then each epoch keeps the ``fraction`` with the highest last loss (the
    per-sample CE of their last step, all-gathered by sample id: the same kept set on every rank)."""

    name = "high_loss"
    label, colour, marker = "highest loss", "tab:olive", "s"
    config_class = HighLossConfig

    def __init__(self, cfg, num_train: int):
        super().__init__(cfg, num_train)
        self.fraction = cfg.selection.high_loss.fraction
        self.loss = np.full(num_train, np.inf, np.float32)
        self.kept: Optional[np.ndarray] = None
        self._ids, self._losses = [], []

    @classmethod
    def planned_fractions(cls, cfg, num_train: int):
        epochs, f = int(cfg.optim.epochs), cfg.selection.high_loss.fraction
        return np.array([1.0] + [max(1, int(f * num_train)) / num_train] * (epochs - 1)), np.zeros(epochs)

    def before_epoch(self, engine, epoch: int) -> None:
        if epoch == 0:
            self.kept = None
            return
        k = max(1, int(self.fraction * self.num_samples))
        self.kept = np.zeros(self.num_samples, bool)
        self.kept[np.argsort(-self.loss, kind="stable")[:k]] = True

    def data_selection(self, engine) -> Optional[Selection]:
        return None if self.kept is None else Selection(kept=self.kept)

    def kept_set(self) -> Optional[np.ndarray]:
        return self.kept

    def after_step(self, engine, batch: dict, output) -> None:
        self._ids.append(batch["sample_id_cpu"])
        self._losses.append(F.cross_entropy(output.logits.detach().float(), batch["label"], reduction="none"))

    def after_epoch(self, engine, epoch: int, row: dict) -> None:
        ids, vals = D.gather_per_sample(self._ids, self._losses)
        self._ids, self._losses = [], []
        self.loss[ids] = vals

    def state_dict(self) -> dict:
        return {"loss": self.loss.copy()}

    def load_state_dict(self, state: dict) -> None:
        self.loss = np.asarray(state["loss"], np.float32).copy()


# --------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module", autouse=True)
def registered_only_here():
    """The toy strategy is in the registry only while this module's tests run. Registering it at import would put
    it there for the whole session (pytest imports every test module before running any): every other test's
    config would carry a ``selection.high_loss`` section whose class Ray's processes cannot import."""
    import ray.cloudpickle

    STRATEGIES.register("high_loss")(HighLoss)
    yield
    STRATEGIES.unregister("high_loss")
    try:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    except ValueError:  # the two-worker test did not run
        pass


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    teacher = save_model(root / "teacher.pt", build_model("resnet8", 10))  # untrained: the plumbing is under test
    return {"model": "resnet8",
            "data": {"name": "digits", "image_size": 8, "root": str(root.parent / "kcd_data")},
            "optim": {"epochs": 3, "batch_size": 64, "lr": 0.05, "scheduler": "cosine", "threads": 1},
            "scaling": {"num_workers": 0, "cpus_per_worker": 0.5, "data_cpus": 0.25},
            "distill": {"teacher": str(teacher)},
            "selection": {"strategy": "high_loss", "high_loss": {"fraction": 0.4}},
            "run": {"storage_path": str(root / "runs"), "verbose": 0}}


def _check_run(summary: dict, run_dir: Path, world: int) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    n = summary["num_train"]
    k = int(0.4 * n)
    assert [r["strategy"] for r in rows] == ["high_loss"] * 3
    assert [r["kept_fraction"] for r in rows] == pytest.approx([1.0, k / n, k / n])
    assert [r["samples_seen"] for r in rows[1:]] == [k + (-k) % world] * 2  # padded to equal shards
    assert summary["strategy_info"] == {"name": "high_loss", "tag": "high_loss", "label": "highest loss",
                                        "colour": "tab:olive", "marker": "s", "sections": ["selection.high_loss"]}
    assert summary["config"]["selection"]["high_loss"] == {"fraction": 0.4}
    assert summary["compute_ratio"] < 0.8  # trained on 40% of the set after the first epoch
    kept = [np.load(run_dir / "selection" / f"e{e:04d}_r{r}.npz")["kept"] for e in (1, 2) for r in range(world)]
    assert all(x.sum() == k for x in kept) and all(np.array_equal(kept[0], x) for x in kept[:world])


@pytest.mark.ray
def test_a_toy_strategy_runs_in_process_with_its_plan_and_report(ray_session, base, tmp_path):
    from kcd_ray.engine.plan import describe_plan, plan_run
    from kcd_ray.ray_layer.trainer import fit
    from kcd_ray.report import report

    cfg = load_config(base=base)
    plan = plan_run(cfg, "distill")
    assert plan.selection.cls is HighLoss and plan.selection.params == {"selection.high_loss.fraction": 0.4}
    assert "highest loss (high_loss.fraction=0.4)" in describe_plan(plan)
    one = fit(cfg, "distill", hooks=["record_selection"])
    _check_run(one, Path(one["run_dir"]), world=1)
    text = report([one["run_dir"]], tmp_path / "report")["text"]
    assert "high_loss" in text, text


@pytest.mark.ray
# ~40 s of two Train workers. The default run's 2-worker selection path (per-sample scores all-gathered by id
# through ``gather_per_sample``, the same kept set on every rank, reaching the pipeline) is KCD's:
# tests/test_train.py::test_two_workers_kcd_mask_sharding_and_values.
@pytest.mark.slow
def test_a_toy_strategy_runs_on_two_train_workers(ray_session, base, tmp_path):
    import ray.cloudpickle

    from kcd_ray.ray_layer.trainer import fit

    # Train workers get the class with the plan: registered by value, as a user's unimportable module would be.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    two = fit(load_config(base=base, overrides=["scaling.num_workers=2", "run.name=toy2"]), "distill",
              hooks=["record_selection"])
    _check_run(two, Path(two["run_dir"]), world=2)


def test_run_plugins_import_a_users_module_before_the_config_is_checked(tmp_path, monkeypatch):
    """A strategy in the user's own module: ``run.plugins`` imports it first, so its name and section check."""
    (tmp_path / "my_strategies.py").write_text(
        "from dataclasses import dataclass\n"
        "from kcd_ray.config import _f\n"
        "from kcd_ray.engine.selection import STRATEGIES, SelectionStrategy\n\n\n"
        "@dataclass\nclass EveryOtherConfig:\n    offset: int = _f(0, ge=0, le=1)\n\n\n"
        "@STRATEGIES.register('every_other')\nclass EveryOther(SelectionStrategy):\n"
        "    name = 'every_other'\n    config_class = EveryOtherConfig\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        cfg = load_config(overrides=["run.plugins=[my_strategies]", "selection.strategy=every_other",
                                     "selection.every_other.offset=1"])
        assert cfg.selection.every_other.offset == 1
    finally:
        STRATEGIES.unregister("every_other")
    with pytest.raises(Exception, match=r"run.plugins: module 'no_such_module' does not import"):
        load_config(overrides=["run.plugins=[no_such_module]"])
