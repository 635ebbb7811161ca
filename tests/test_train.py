"""Ray Train integration: teacher training, sharding, KCD's mask in the pipeline, resume and faults.

These use a real local Ray (Ray Data pipelines, real Train workers where the test is about workers) on the
offline digits data: the teacher trains at 16x16 (resnet8 reaches 90% there, ~73% at 8x8), the distillation runs,
which check plumbing and not accuracy, at 8x8 (a quarter of the compute; resnet8 takes either size).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from kcd_ray.config import load_config
from kcd_ray.models import CheckpointError

pytestmark = pytest.mark.ray


def _cfg(tmp_path, image_size=8, **over):
    base = {
        "model": "resnet8",
        "data": {"name": "digits", "image_size": image_size, "root": str(tmp_path.parent / "kcd_data")},
        "optim": {"epochs": 2, "batch_size": 64, "lr": 0.05, "scheduler": "cosine", "threads": 1},
        "scaling": {"num_workers": 0, "cpus_per_worker": 0.5, "data_cpus": 0.25},
        "run": {"storage_path": str(tmp_path / "runs"), "verbose": 0},
    }
    flat = [f"{k}={json.dumps(v)}" for k, v in over.items()]
    return load_config(base=base, overrides=flat)


@pytest.fixture(scope="module")
def teacher(ray_session, tmp_path_factory):
    """A digits teacher, trained in-process; also the accuracy check of teacher training."""
    from kcd_ray.ray_layer.trainer import fit

    tmp = tmp_path_factory.mktemp("teacher")
    cfg = _cfg(tmp, image_size=16, **{"optim.epochs": 10, "optim.lr": 0.1, "run.name": "teacher", "optim.threads": 2})
    summary = fit(cfg, kind="teacher")
    return summary, Path(summary["run_dir"])


def test_teacher_training_reaches_90_percent(teacher):
    summary, run_dir = teacher
    assert summary["final_top1"] >= 90.0, summary
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(10))
    assert summary["compute_ratio"] == pytest.approx(1.0)
    from kcd_ray.models import load_model

    model = load_model(run_dir / "final_model.pt")  # kcd_ray format: no name needed
    assert model.arch == "resnet8" and model.num_classes == 10


def _seen(run_dir: Path, epoch: int, world: int) -> list[np.ndarray]:
    return [np.load(run_dir / "ids" / f"e{epoch:04d}_r{r}.npy") for r in range(world)]


def test_two_workers_kcd_mask_sharding_and_values(teacher, tmp_path):
    """2 Train workers at fractional CPUs: each epoch covers the whole kept set (an odd count is padded by one
    repeated row, so equal sharding drops none), never a dropped sample, and the gathered values cover exactly
    the ids seen. The run asks for a compute budget: rho is resolved on the driver, and the ledger's count over
    both ranks lands on it."""
    from kcd_ray.ray_layer.trainer import fit

    _, tdir = teacher
    cfg = _cfg(tmp_path, **{
        "optim.epochs": 4, "scaling.num_workers": 2, "run.name": "kcd2w",
        "distill.teacher": str(tdir / "final_model.pt"),
        "kcd.interval": 1, "kcd.stages": 3, "selection.strategy": "kcd", "selection.budget": 0.7,
    })
    summary = fit(cfg, kind="distill", hooks=["record_ids"])
    run_dir = Path(summary["run_dir"])
    n = summary["num_train"]
    kept_by_epoch = {0: np.arange(n)}
    for v in (1, 2, 3):
        t = pq.read_table(run_dir / "masks" / f"mask_v{v:03d}.parquet").to_pydict()
        kept_by_epoch[v] = np.array([i for i, k in zip(t["sample_id"], t["kept"]) if k])
    sizes = [len(kept_by_epoch[e]) for e in range(4)]
    rho = summary["budget_resolved"]["kcd.rho"]
    assert sizes[0] > sizes[1] > sizes[2] > sizes[3] >= int(rho * n) and summary["config"]["kcd"]["rho"] == rho
    for e in range(4):
        parts = _seen(run_dir, e, 2)
        assert len(parts[0]) == len(parts[1])  # equal shards, as DDP needs
        seen = np.concatenate(parts)
        assert len(seen) - len(np.unique(seen)) == len(kept_by_epoch[e]) % 2, f"epoch {e}: wrong padding"
        kept = set(kept_by_epoch[e].tolist())
        assert set(seen.tolist()) == kept, f"epoch {e}: a dropped sample trained on, or a kept one missed"
        values = pq.read_table(run_dir / "values" / f"values_e{e:04d}_online.parquet")
        assert sorted(values.column("sample_id").to_pylist()) == sorted(seen.tolist())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["samples_seen"] for m in metrics] == [len(np.concatenate(_seen(run_dir, e, 2))) for e in range(4)]
    assert abs(summary["compute_ratio"] - 0.7) <= 0.02, summary["compute_ratio"]
    nodes = {(run_dir / "nodes" / f"rank_{r}.txt").read_text() for r in range(2)}
    assert len(nodes) == 1  # one local node; the loopback-cluster test checks placement over two


def test_rho_one_trains_as_many_samples_as_kd(teacher, tmp_path):
    from kcd_ray.ray_layer.trainer import fit

    _, tdir = teacher
    common = {"optim.epochs": 3, "distill.teacher": str(tdir / "final_model.pt"), "kcd.interval": 1, "kcd.rho": 1.0}
    kcd = fit(_cfg(tmp_path, **common, **{"run.name": "rho1"}), kind="distill")
    kd = fit(_cfg(tmp_path, **common, **{"run.name": "kd", "kcd.enabled": False, "optim.eval_every": 3}),
             kind="distill")
    assert kcd["sample_passes"] == kd["sample_passes"] == 3 * kd["num_train"]
    rows = [json.loads(x) for x in (Path(kd["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["evaluated"] for r in rows] == [True, False, True]  # first, every 3rd and the last epoch
    assert rows[1]["top1"] == rows[0]["top1"] and all(r["skipped_steps"] == 0 for r in rows)
    assert kd["kcd_enabled"] is False and kcd["kcd_enabled"] is True


def _final_kept(run_dir: Path) -> list[int]:
    t = pq.read_table(Path(run_dir) / "masks" / "mask_final.parquet").to_pydict()
    return [i for i, k in zip(t["sample_id"], t["kept"]) if k]


KCD_RESUME = {"optim.epochs": 5, "kcd.interval": 1, "kcd.stages": 4, "kcd.rho": 0.6, "kcd.value_fn": "random"}


def test_resume_ends_with_the_same_kept_set(teacher, tmp_path):
    """An interrupted in-process run, re-run with the same name, resumes and matches an uninterrupted run."""
    from kcd_ray.ray_layer.trainer import fit

    _, tdir = teacher
    over = {**KCD_RESUME, "distill.teacher": str(tdir / "final_model.pt")}
    ref = fit(_cfg(tmp_path, **over, **{"run.name": "ref"}), kind="distill")
    cfg = _cfg(tmp_path, **over, **{"run.name": "interrupted"})
    with pytest.raises(RuntimeError, match="injected failure"):
        fit(cfg, kind="distill", hooks=[("fail", {"epoch": 2, "mode": "raise"})])
    run_dir = Path(ref["run_dir"]).parent / "interrupted"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    resumed = fit(cfg, kind="distill")
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(5))
    assert resumed["sample_passes"] == ref["sample_passes"]
    assert _final_kept(run_dir) == _final_kept(ref["run_dir"])


def test_corrupt_checkpoint_names_the_file_and_keeps_the_run(teacher, tmp_path):
    from kcd_ray.ray_layer.trainer import fit

    _, tdir = teacher
    over = {"run.name": "corrupt", "distill.teacher": str(tdir / "final_model.pt"), "kcd.interval": 1,
            "kcd.stages": 2, "kcd.rho": 0.5}
    fit(_cfg(tmp_path, **over, **{"optim.epochs": 2}), kind="distill")
    run_dir = tmp_path / "runs" / "corrupt"

    def snapshot():  # what the run wrote; the bookkeeping of attempts (history, status, error log) may grow
        skip = {"history.jsonl", "status.json", "error.log"}
        return sorted((str(p.relative_to(run_dir)), p.stat().st_size) for p in run_dir.rglob("*")
                      if p.is_file() and p.name not in skip)

    # a damaged blend file of the current mask: named before any training restarts
    bucket = sorted((run_dir / "blends").rglob("bucket-*.parquet"))[-1]
    good = bucket.read_bytes()
    bucket.write_bytes(good[:16])
    before = snapshot()
    with pytest.raises(ValueError, match=str(bucket)):
        fit(_cfg(tmp_path, **over, **{"optim.epochs": 3}), kind="distill")
    assert snapshot() == before
    bucket.write_bytes(good)
    # a corrupt run state
    state = run_dir / "local_checkpoint" / "state.pt"
    state.write_bytes(b"not a checkpoint")
    before = snapshot()
    with pytest.raises(CheckpointError, match=str(state)):
        fit(_cfg(tmp_path, **over, **{"optim.epochs": 3}), kind="distill")
    assert snapshot() == before
    assert state.read_bytes() == b"not a checkpoint"  # nothing overwritten


def test_distill_from_a_repdistiller_teacher_file(teacher, tmp_path):
    """A RepDistiller-format teacher ({'model': state_dict}, architecture named in the config) distils as is."""
    import torch

    from kcd_ray.models import load_model
    from kcd_ray.ray_layer.trainer import fit

    _, tdir = teacher
    sd = load_model(tdir / "final_model.pt").state_dict()
    f = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": sd, "epoch": 240}, f)
    cfg = _cfg(tmp_path, **{"optim.epochs": 1, "run.name": "rep", "distill.teacher": str(f),
                            "distill.teacher_model": "resnet8", "kcd.enabled": False})
    summary = fit(cfg, kind="distill")
    metrics = json.loads((Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["loss_kd"] > 0 and np.isfinite(metrics["loss_kd"])
    x = torch.randn(4, 3, 16, 16)
    rep = load_model(f, name="resnet8")
    assert torch.allclose(rep(x), load_model(tdir / "final_model.pt")(x))  # same function as the original


def test_offline_estep_scores_every_sample_on_an_actor_pool(teacher, tmp_path):
    """Offline E-step: a Ray Data actor pool scores all N samples (condensed-away ones too) with the current
    student and the teacher (value function `kd`), in the same value-table format as the online E-step."""
    from kcd_ray.ray_layer.trainer import fit

    _, tdir = teacher
    cfg = _cfg(tmp_path, **{"optim.epochs": 3, "run.name": "offline", "distill.teacher": str(tdir / "final_model.pt"),
                            "kcd.estep": "offline", "kcd.value_fn": "kd", "kcd.interval": 1, "kcd.stages": 2,
                            "kcd.rho": 0.5})
    summary = fit(cfg, kind="distill")
    run_dir = Path(summary["run_dir"])
    n = summary["num_train"]
    for e in (1, 2):
        t = pq.read_table(run_dir / "values" / f"values_e{e:04d}_offline.parquet")
        assert t.column_names == ["sample_id", "value", "epoch", "source"]
        assert t.column("sample_id").to_pylist() == list(range(n))  # every sample, dropped ones included
        assert all(v >= 0 for v in t.column("value").to_pylist())  # KL values
    mask = pq.read_table(run_dir / "masks" / "mask_v002.parquet").to_pydict()
    # docs/methods/kcd.md §4: K -= floor(N (1 - rho) / stages) per stage
    assert sum(mask["kept"]) == n - 2 * int(n * 0.5 / 2)
