"""The training engine and its hooks, driven by plain Python batch lists: no Ray anywhere in this module."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from engine_harness import batches, config, feeds, make_engine, tiny_set
from kcd_ray.engine import Hook, LocalServices
from kcd_ray.models import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A prepared synthetic set (8x8, 4 classes), its tensors in memory, and a (random) teacher file."""
    return tiny_set(tmp_path_factory.mktemp("engine"), kcd={"interval": 1, "stages": 2, "rho": 0.5})


def _engine(tiny, tmp_path, hooks_extra=(), services=None, kind="distill", **over):
    return make_engine(tiny, tmp_path / "run", config(tiny, **over), hooks_extra, services, kind)


_batches, _feeds = batches, feeds


def _run(tiny, engine):
    return engine.run(*_feeds(tiny, engine))


class Recorder(Hook):
    def __init__(self):
        self.calls = []

    def before_run(self, engine, start_epoch):
        self.calls.append(("before_run", start_epoch))

    def before_epoch(self, engine, epoch):
        self.calls.append(("before_epoch", epoch))

    def after_step(self, engine, batch, output):
        if not self.calls or self.calls[-1][0] != "after_step":
            self.calls.append(("after_step", epoch_of(self.calls)))

    def after_epoch(self, engine, epoch, row):
        assert "top1" in row and "kept_fraction" in row
        self.calls.append(("after_epoch", epoch))

    def after_checkpoint(self, engine, epoch, row):
        self.calls.append(("after_checkpoint", epoch))

    def end_run(self, engine, summary):
        self.calls.append(("end_run", summary is not None))


def epoch_of(calls):
    return next(c[1] for c in reversed(calls) if c[0] == "before_epoch")


def test_hooks_are_called_at_their_points_in_order(tiny, tmp_path):
    rec = Recorder()
    engine = _engine(tiny, tmp_path, hooks_extra=[rec], **{"optim.epochs": 2})
    summary = _run(tiny, engine)
    def per_epoch(e):
        return [("before_epoch", e), ("after_step", e), ("after_epoch", e), ("after_checkpoint", e)]

    assert rec.calls == [("before_run", 0), *per_epoch(0), *per_epoch(1), ("end_run", True)]
    assert engine.services.epochs == [0, 1]  # the data pipeline is told each epoch before it is read
    assert summary["epochs"] == 2 and len(engine.history) == 2


def test_engine_writes_the_run_folder_and_the_kcd_mask(tiny, tmp_path):
    engine = _engine(tiny, tmp_path)
    summary = _run(tiny, engine)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert [r["kept_fraction"] for r in rows] == [1.0, 0.75, 0.5]  # rho 0.5 in 2 stages, condensing at 1 and 2
    assert [r["samples_seen"] for r in rows] == [96, 72, 48]
    assert summary["sample_passes"] == 216 and summary["compute_ratio"] == pytest.approx(216 / 288)
    assert json.loads((run / "summary.json").read_text())["final_top1"] == summary["final_top1"]
    assert load_model(run / "final_model.pt").arch == "resnet8"
    assert [v for v, _, _ in engine.services.masks] == [1, 2]
    kept = pq.read_table(run / "masks" / "mask_final.parquet").to_pydict()["kept"]
    assert sum(kept) == 48


def test_resume_from_the_engine_checkpoint_matches_the_uninterrupted_run(tiny, tmp_path):
    ref = _engine(tiny, tmp_path / "ref")
    ref_summary = _run(tiny, ref)

    class Stop(Hook):
        def after_checkpoint(self, engine, epoch, row):
            if epoch == 1:
                raise KeyboardInterrupt

    first = _engine(tiny, tmp_path / "cut", hooks_extra=[Stop()])
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, first)
    again = _engine(tiny, tmp_path / "cut")
    again.services.masks[:] = []
    again.restore(again.services.latest_checkpoint())
    assert again.start_epoch == 2
    summary = _run(tiny, again)
    assert again.services.masks[0][0] == 1  # the checkpoint's mask is served again before training resumes
    for k, v in ref.distiller.student.state_dict().items():
        assert torch.allclose(v.float(), again.distiller.student.state_dict()[k].float(), atol=1e-5), k
    assert summary["final_top1"] == ref_summary["final_top1"]
    assert summary["sample_passes"] == ref_summary["sample_passes"]


def test_a_non_finite_step_is_skipped_on_the_device_and_counted(tiny, tmp_path):
    engine = _engine(tiny, tmp_path, **{"optim.epochs": 1})
    assert engine.parts.fused  # CPU has the fused SGD kernel: the skip needs no host read
    engine.train_batches = _feeds(tiny, engine)[0]
    batch = engine.to_device(next(_batches(tiny["split"]["train"], 16, 0)))
    before = {k: v.clone() for k, v in engine.distiller.student.state_dict().items()}
    bad = dict(batch, image=batch["image"] * float("nan"))
    _, _, finite = engine.step(bad, 4.0, 0)
    assert not bool(finite)
    after = engine.distiller.student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point()
               and "running" not in k)  # BN running stats move on any forward; weights must not
    _, _, finite = engine.step(batch, 4.0, 0)
    assert bool(finite)
    assert not torch.equal(before["fc.weight"], engine.distiller.student.state_dict()["fc.weight"])


def test_persistent_non_finite_steps_stop_the_run_naming_the_method(tiny, tmp_path):
    engine = _engine(tiny, tmp_path, **{"optim.epochs": 1, "optim.lr": 1e30})
    with pytest.raises(FloatingPointError, match="non-finite gradients.*distill.beta for method 'kd'"):
        _run(tiny, engine)


def test_offline_estep_scores_through_the_services(tiny, tmp_path):
    seen = []

    def scorer(student_state, epoch):
        seen.append((epoch, sorted(student_state)[:1]))
        ids = tiny["split"]["train"][0].numpy()
        return ids, (ids % 7).astype(np.float32)  # a value that decides the selection

    services = LocalServices(checkpoint_dir=tmp_path / "run" / "local_checkpoint", scorer=scorer)
    engine = _engine(tiny, tmp_path, services=services, **{"kcd.estep": "offline", "optim.epochs": 2,
                                                          "kcd.summary": False})
    _run(tiny, engine)
    assert [e for e, _ in seen] == [1]
    kept, _ = services.mask
    assert len(kept) == 72 and set((kept % 7).tolist()) >= {6, 5, 4}
    dropped = np.setdiff1d(tiny["split"]["train"][0].numpy(), kept)
    assert len(dropped) > 0 and (dropped % 7).max() <= (kept % 7).min()  # the lowest values were dropped
    assert (tmp_path / "run" / "values" / "values_e0001_offline.parquet").exists()


def test_online_values_use_the_seeded_value_context(tiny, tmp_path):
    """``random`` is a function of (seed, epoch, id): two runs that see batches in other orders keep the same set."""
    keeps = []
    for shift in (0, 5):
        engine = _engine(tiny, tmp_path / f"s{shift}", **{"optim.epochs": 2, "kcd.value_fn": "random"})
        train, test = _feeds(tiny, engine)
        engine.run(lambda e, s=shift: _batches(tiny["split"]["train"], 16, e + s), test)
        keeps.append(engine.services.mask[0])
    assert np.array_equal(keeps[0], keeps[1])


def test_test_hooks_are_registered_classes_not_config(tiny, tmp_path):
    from kcd_ray.engine import build_hooks

    fail = build_hooks([("fail", {"epoch": 0, "mode": "raise"})])
    engine = _engine(tiny, tmp_path, hooks_extra=fail, **{"optim.epochs": 2})
    with pytest.raises(RuntimeError, match="injected failure after epoch 0"):
        _run(tiny, engine)
    assert (tmp_path / "run" / "injected_failure_epoch_0").exists()
    with pytest.raises(KeyError, match="unknown hook 'nope'"):
        build_hooks(["nope"])


def test_the_plain_epoch_drill_measures_beside_the_run_without_changing_it(tiny, tmp_path):
    """bench/train_throughput.py --paired: a plain-loop epoch before each epoch, its img/s in plain_epochs.jsonl,
    on its own model and random streams (the run's history and weights are those of a run without it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from plain_loop import PlainEpochBeside

    over = {"optim.epochs": 2}
    alone = _engine(tiny, tmp_path / "alone", kind="teacher", **over)
    _run(tiny, alone)
    hook = [PlainEpochBeside()]
    beside = _engine(tiny, tmp_path / "beside", hooks_extra=hook, kind="teacher", **over)
    _run(tiny, beside)
    lines = [json.loads(x) for x in (tmp_path / "beside" / "run" / "plain_epochs.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1] and all(r["images_per_s"] > 0 for r in lines)
    assert [h["train_loss"] for h in beside.history] == [h["train_loss"] for h in alone.history]
    for a, b in zip(alone.distiller.student.state_dict().values(), beside.distiller.student.state_dict().values()):
        assert torch.equal(a, b)
    before = torch.get_rng_state()
    hook[0].before_epoch(beside, 2)  # the plain loop draws its init and augmentation from its own streams
    assert torch.equal(torch.get_rng_state(), before)
    assert hook[0].loop.epochs == 3
