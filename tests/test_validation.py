"""The validation split (``data.val_fraction``): carved out once at preparation, class-stratified and seeded, never
trained on, scored by the E-step or cached; every epoch is evaluated on it, ``run.select`` picks the best epoch by
it, and a sweep chooses its best trial by it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from engine_harness import config, feeds, make_engine, tiny_set
from kcd_ray.config import ConfigError, load_config
from kcd_ray.data import iter_split, load_meta, prepare_dataset

N_TRAIN, N_TEST, FRACTION = 120, 40, 0.25


def _column(path, split: str, name: str) -> np.ndarray:
    return np.concatenate([b.column(name).to_numpy(zero_copy_only=False) for b in iter_split(path, split)])


def _data(root: Path, seed: int = 0, fraction: float = FRACTION):
    cfg = load_config(overrides=["data.name=synthetic", f"data.root={root}", f"data.synthetic.num_train={N_TRAIN}",
                                 f"data.synthetic.num_test={N_TEST}", "data.synthetic.num_classes=4",
                                 "data.synthetic.image_size=8", f"data.val_fraction={fraction}",
                                 f"data.val_seed={seed}"])
    return prepare_dataset(cfg.data, verbose=False)


def test_the_split_is_stratified_seeded_recorded_and_part_of_the_key(tmp_path):
    path = _data(tmp_path / "a")
    meta = load_meta(path)
    assert {s: meta["splits"][s]["num_rows"] for s in ("train", "val", "test")} == {"train": 90, "val": 30, "test": 40}
    full = prepare_dataset(load_config(overrides=["data.name=synthetic", f"data.root={tmp_path / 'full'}",
                                                  f"data.synthetic.num_train={N_TRAIN}", "data.synthetic.num_classes=4",
                                                  f"data.synthetic.num_test={N_TEST}", "data.synthetic.image_size=8"]
                                       ).data, verbose=False)
    per_class = np.bincount(_column(full, "train", "label"))
    val_labels = _column(path, "val", "label")
    # each class gets its share of the 30 (largest remainder), and meta.json says so, with the seed
    assert np.abs(np.bincount(val_labels) - per_class * FRACTION).max() < 1
    assert meta["val_split"] == {"fraction": FRACTION, "seed": 0, "size": 30, "of": N_TRAIN,
                                 "per_class": {str(c): int(k) for c, k in enumerate(np.bincount(val_labels))}}
    again = _data(tmp_path / "b")  # the same seed, another folder: the same rows
    assert np.array_equal(_column(again, "val", "image"), _column(path, "val", "image"))
    other = _data(tmp_path / "a", seed=1)  # another seed: another folder beside it, other rows
    assert other != path and other.name.endswith("-val0.25-s1") and path.name.endswith("-val0.25-s0")
    assert not np.array_equal(_column(other, "val", "image"), _column(path, "val", "image"))


def test_no_sample_is_shared_between_train_validation_and_test(tmp_path):
    path = _data(tmp_path)
    ids = {s: _column(path, s, "sample_id") for s in ("train", "val", "test")}
    assert list(ids["train"]) == list(range(90))  # dense from 0: the engine's per-sample arrays index by it
    assert list(ids["val"]) == list(range(90, 120)) and list(ids["test"]) == list(range(120, 160))
    images = {s: {bytes(x) for x in _column(path, s, "image")} for s in ids}
    assert len(images["train"]) == 90 and len(images["val"]) == 30  # synthetic images are all distinct
    assert not (images["train"] & images["val"]) and not (images["test"] & (images["train"] | images["val"]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_set(tmp_path_factory.mktemp("validation"), num_train=N_TRAIN, data={"val_fraction": FRACTION},
                    kcd={"interval": 1, "stages": 2, "rho": 0.5, "value_fn": "random"})


def test_every_epoch_is_evaluated_on_validation_and_run_select_picks_its_best(tiny, tmp_path):
    cfg = config(tiny, **{"optim.epochs": 4, "optim.lr": 0.2})
    engine = make_engine(tiny, tmp_path / "run", cfg)
    assert engine.select == "val_top1"  # run.select=auto with a validation split
    summary = engine.run(*feeds(tiny, engine))
    rows = engine.history
    assert all(r["val_samples"] == 30 and r["test_samples"] == N_TEST for r in rows)
    best = max(rows, key=lambda r: (r["val_top1"], -r["epoch"]))  # ties keep the earlier epoch
    assert summary["selected_by"] == "val_top1" and summary["selected_epoch"] == best["epoch"]
    assert summary["selected_top1"] == best["top1"] and summary["selected_val_top1"] == best["val_top1"]
    assert summary["final_val_top1"] == rows[-1]["val_top1"] and not summary["selected_on_test"]
    saved = torch.load(tmp_path / "run" / "best_model.pt", weights_only=True)
    assert saved["epoch"] == best["epoch"] and saved["selected_by"] == "val_top1"
    # the E-step scored training samples only: every value table holds exactly the training ids
    for f in sorted((tmp_path / "run" / "values").glob("*.parquet")):
        assert set(pq.read_table(f).column("sample_id").to_pylist()) <= set(range(90)), f


def test_a_validation_metric_needs_a_validation_split(tmp_path):
    from kcd_ray.engine.plan import local_plan

    plain = tiny_set(tmp_path, teacher=False)
    with pytest.raises(ConfigError, match=r"run.select: val_top1 needs a validation split.*data.val_fraction"):
        local_plan(config(plain, **{"run.select": "val_top1"}), "teacher", plain["data_dir"])
    assert local_plan(config(plain), "teacher", plain["data_dir"]).select == "top1"  # auto: test, labelled


@pytest.mark.ray
def test_the_pipeline_never_serves_a_validation_id_to_training_or_the_estep(ray_session, tmp_path):
    """Through Ray Data (scaling.num_workers=0, the real pipeline): every trained id and every E-step value is a
    training id; the validation split is evaluated every epoch."""
    from kcd_ray.ray_layer.trainer import fit

    tiny = tiny_set(tmp_path, num_train=N_TRAIN, data={"val_fraction": FRACTION},
                    kcd={"interval": 1, "stages": 2, "rho": 0.5, "value_fn": "random"},
                    run={"storage_path": str(tmp_path / "runs"), "name": "val"})
    summary = fit(config(tiny, **{"optim.epochs": 2}), hooks=["record_ids"])
    run = Path(summary["run_dir"])
    seen = np.concatenate([np.load(f) for f in sorted((run / "ids").glob("*.npy"))])
    assert set(seen.tolist()) <= set(range(90)) and len(set(seen.tolist())) == 90  # epoch 0 trains all of train
    for f in sorted((run / "values").glob("*.parquet")):
        assert set(pq.read_table(f).column("sample_id").to_pylist()) <= set(range(90)), f
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_samples"] for r in rows] == [30, 30] and summary["selected_by"] == "val_top1"


def _fake_trial(runs: Path, name: str, val: float, test: float, ratio: float) -> None:
    """A finished trial's run folder: its summary and one metrics row (what a report reads)."""
    cfg = load_config(overrides=[f"run.name={name}", "data.val_fraction=0.2", f"kcd.rho={ratio}"])
    folder = runs / name
    folder.mkdir(parents=True)
    from kcd_ray.config import to_dict

    row = {"epoch": 0, "top1": test, "val_top1": val, "compute_ratio": ratio, "strategy": "kcd"}
    (folder / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (folder / "summary.json").write_text(json.dumps({
        "final_top1": test, "best_top1": test, "final_val_top1": val, "compute_ratio": ratio, "epochs": 1,
        "strategy": "kcd", "kind": "distill", "config": to_dict(cfg)}))


def test_a_sweeps_choice_follows_validation_and_reports_the_test_figure_once(tmp_path):
    from kcd_ray.report import report

    folder = tmp_path / "sw"
    (folder / "runs").mkdir(parents=True)
    (folder / "sweep.yaml").write_text(json.dumps({"name": "sw", "metric": "val_top1", "mode": "max"}))
    for name, val, test, ratio in (("sw_a", 80.0, 95.0, 0.5), ("sw_b", 90.0, 85.0, 0.6), ("sw_c", 85.0, 99.0, 0.7)):
        _fake_trial(folder / "runs", name, val, test, ratio)
    res = report(folder)
    assert res["best"]["run"] == "sw_b"  # best on validation, although sw_c is best on test
    assert "chosen on validation (val_top1); its test accuracy is reported once" in res["text"]
    assert "test top-1 85" in res["text"] and res["best_config"]["kcd"]["rho"] == 0.6
    front = [line.split(",")[0] for line in Path(res["pareto_csv"]).read_text().splitlines()[1:]]
    assert front == ["sw_a", "sw_b"]  # non-dominated on (compute, validation top-1): sw_c is dominated by sw_b
    (folder / "sweep.yaml").write_text(json.dumps({"name": "sw", "metric": "final_top1", "select_on_test": True}))
    res = report(folder)
    assert res["best"]["run"] == "sw_c" and "a TEST-split figure (select_on_test)" in res["text"]
