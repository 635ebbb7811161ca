"""Teacher-output cache: exactness against the teacher on the pipeline's own batches, cached vs uncached
runs, one build per sweep, resumable builds, and the one-line refusals (mismatched teacher, data, seed; damaged
shards; methods the cache cannot serve)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kcd_ray.cache.store import (CacheError, CacheSpec, augment_uniforms, check_manifest, expand_topk, read_manifest,
                                 read_unit, shard_table, view_of, write_shard)
from kcd_ray.config import load_config
from kcd_ray.data import transforms as T
from kcd_ray.models import build_model, load_model, save_model


def _cfg(base: dict, **over):
    return load_config(base=copy.deepcopy(base), overrides=[f"{k}={json.dumps(v)}" for k, v in over.items()])


def _ensure(cfg, data_dir, **kw):
    """Build (or reuse) the cache the run of ``cfg`` on the prepared ``data_dir`` reads."""
    from kcd_ray.engine.plan import local_plan
    from kcd_ray.ray_layer.teacher_cache import ensure_teacher_cache

    return ensure_teacher_cache(local_plan(cfg, "distill", data_dir), **kw)


def _reason(cfg):
    from kcd_ray.engine.plan.derive import cache_reason, plan_selection

    return cache_reason(cfg, "distill", plan_selection(cfg, "distill", 100))


# --------------------------------------------------------------------------- pure parts (no Ray)


def test_shard_round_trip_fp16_and_topk(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.permutation(50).astype(np.int64)
    logits = rng.normal(size=(50, 10)).astype(np.float32) * 3
    feat = rng.normal(size=(50, 6)).astype(np.float32)
    entry = write_shard(tmp_path, "e0000", shard_table(ids, logits, feat, topk=0))
    u = read_unit(tmp_path, "e0000", entry, 10)
    order = np.argsort(ids)
    assert np.array_equal(u.ids, ids[order])
    np.testing.assert_allclose(u.logits.astype(np.float32), logits[order], atol=4e-3, rtol=1e-3)
    np.testing.assert_allclose(u.feat.astype(np.float32), feat[order], atol=4e-3, rtol=1e-3)
    # Top-k (FKD): the k largest logits kept, the rest's probability mass at T=1 preserved.
    entry = write_shard(tmp_path, "e0001", shard_table(ids, logits, None, topk=3))
    u = read_unit(tmp_path, "e0001", entry, 10)
    z = torch.from_numpy(logits[order])
    zk = torch.from_numpy(u.logits.astype(np.float32))
    top = torch.topk(z, 3, dim=1)
    np.testing.assert_allclose(zk.gather(1, top.indices), top.values, atol=1e-2)
    p, pk = z.softmax(1), zk.softmax(1)
    np.testing.assert_allclose(pk.gather(1, top.indices), p.gather(1, top.indices), atol=2e-3)
    assert u.feat is None


def test_expand_topk_keeps_the_rest_mass():
    top = np.array([[5.0, 4.0]], np.float16)
    idx = np.array([[2, 0]], np.int32)
    rest = np.log(np.exp([1.0, 2.0, 0.5]).sum())  # the 3 other logits of a 5-class row
    z = expand_topk(top, idx, np.array([rest], np.float32), 5).astype(np.float64)
    assert z[0, 2] == 5.0 and z[0, 0] == 4.0
    assert np.log(np.exp(z[0, [1, 3, 4]]).sum()) == pytest.approx(rest, abs=1e-2)


def test_augmentation_is_a_function_of_seed_epoch_id_and_views_pick_among_k():
    ids = np.arange(2000)
    a = augment_uniforms(ids, 3, seed=5, epoch=2)
    assert np.array_equal(a, T.sample_uniforms(ids, 3, (5, 2)))
    assert np.array_equal(augment_uniforms(ids[::-1], 3, 5, 2), a[::-1])  # batch order does not matter
    v = view_of(ids, 5, 2, 4)
    counts = np.bincount(v, minlength=4)
    assert counts.min() > 400  # roughly uniform over K=4
    assert not np.array_equal(v, view_of(ids, 5, 3, 4))  # another epoch, another choice
    u2, u3 = augment_uniforms(ids, 3, 5, 2, views=4), augment_uniforms(ids, 3, 5, 3, views=4)
    same = view_of(ids, 5, 2, 4) == view_of(ids, 5, 3, 4)
    assert np.array_equal(u2[same], u3[same]) and not np.array_equal(u2[~same], u3[~same])
    assert len({tuple(r) for r in np.concatenate([augment_uniforms([7], 3, 5, e, views=4) for e in range(40)])}) <= 4


def test_manifest_mismatch_and_damaged_shard_are_one_line_errors(tmp_path):
    key = {"teacher_sha256": "aa", "seed": 0, "data_checksum": "x"}
    check_manifest({"key": dict(key)}, key, tmp_path)
    with pytest.raises(CacheError, match=r"manifest.json: seed differs \(cache 0, this run 1\)"):
        check_manifest({"key": dict(key)}, {**key, "seed": 1}, tmp_path)
    entry = write_shard(tmp_path, "e0000", shard_table(np.arange(8), np.ones((8, 3), np.float32), None, 0))
    path = tmp_path / "e0000.parquet"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(CacheError, match=r"e0000.parquet: bytes differ .*truncated") as e:
        read_unit(tmp_path, "e0000", entry, 3)
    assert "\n" not in str(e.value)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="damaged manifest"):
        read_manifest(tmp_path)


def test_methods_the_cache_cannot_serve_say_why():
    base = {"distill": {"teacher": "t.pt", "cache": "exact"}}
    assert _reason(_cfg(base)) is None
    assert _reason(_cfg(base, **{"distill.method": "crd"})) is None  # feats[-1] is cached
    assert "feature maps" in _reason(_cfg(base, **{"distill.method": "fitnet"}))
    assert "several teachers" in _reason(_cfg(base, **{"distill.method": "mtkd"}))
    assert "remakes every training batch" in _reason(_cfg(base, **{"selection.strategy": "unixkd"}))


def test_distiller_reads_cached_outputs_and_runs_the_teacher_on_missing_rows_only():
    from kcd_ray.distill import build_distiller

    torch.manual_seed(0)
    teacher, student = build_model("resnet8", 4).eval(), build_model("resnet8", 4)
    spec = CacheSpec(dir="", mode="exact", views=0, topk=0, feat=True, seed=0, augment="cifar", epochs=1,
                     plain=False, teacher_shapes=((16, 8, 8), (16, 8, 8), (32, 4, 4), (64, 2, 2), (64,)))
    cfg = _cfg({"distill": {"method": "crd", "teacher": "t.pt", "options": {"num_samples": 8, "nce_k": 4}}}).distill
    live = build_distiller(cfg, student, teacher, 4, image_size=8, num_samples=8)
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        feats, z = teacher(x, is_feat=True)
    batch = {"image": x, "label": torch.arange(8) % 4, "sample_id": torch.arange(8),
             "t_logits": z.half(), "t_feat": feats[-1].flatten(1).half()}
    f_c, z_c = live.teacher_outputs_of(batch)
    assert live.teacher_rows == 0
    torch.testing.assert_close(z_c, z, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(f_c[0], feats[-1], atol=2e-2, rtol=1e-2)
    missing = torch.zeros(8, dtype=torch.bool)
    missing[[1, 5]] = True
    batch["t_logits"] = torch.zeros_like(batch["t_logits"])  # wrong on purpose: missing rows must be recomputed
    batch["t_missing_cpu"] = missing
    _, z_m = live.teacher_outputs_of(batch)
    assert live.teacher_rows == 2
    torch.testing.assert_close(z_m[[1, 5]], z[[1, 5]])
    assert float(z_m[[0, 2, 3, 4, 6, 7]].abs().max()) == 0.0
    # Without a teacher (the worker does not load it): connectors sized from the recorded shapes.
    cached_only = build_distiller(cfg, build_model("resnet8", 4), None, 4, image_size=8, num_samples=8,
                                  teacher_cache=spec)
    assert cached_only.teacher is None and cached_only.alpha > 0
    with pytest.raises(ValueError, match="KCD blends"):
        cached_only.teacher_outputs_of(batch)


# --------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def setup(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("tcache")
    torch.manual_seed(1)
    teacher = root / "teacher.pt"
    save_model(teacher, build_model("resnet8", 4))
    base = {"model": "resnet8",
            "data": {"name": "synthetic", "root": str(root / "data"),
                     "synthetic": {"num_train": 96, "num_test": 40, "num_classes": 4, "image_size": 8}},
            "optim": {"epochs": 3, "batch_size": 16, "lr": 0.05, "scheduler": "cosine", "threads": 1},
            "scaling": {"num_workers": 0, "cpus_per_worker": 0.5, "data_cpus": 0.25},
            "distill": {"teacher": str(teacher), "cache": "exact"}, "kcd": {"enabled": False},
            "run": {"verbose": 0, "storage_path": str(root / "runs")}}
    from kcd_ray.data import prepare_dataset

    data_dir = prepare_dataset(_cfg(base).data, verbose=False)
    spec = _ensure(_cfg(base), data_dir, verbose=False)
    return {"root": root, "base": base, "data_dir": str(data_dir), "spec": spec, "teacher": str(teacher)}


def test_pipeline_batches_carry_exactly_the_teachers_output_on_their_own_view(setup):
    """What the student is shown, through the teacher, equals what the batch says the teacher said."""
    from kcd_ray.ray_layer.mask_store import get_mask_store, set_epoch
    from kcd_ray.ray_layer.pipeline import train_dataset

    teacher = load_model(setup["teacher"]).eval()
    store = "kcd_mask_tcache_test"
    get_mask_store(store, create=True)
    ds = train_dataset(setup["data_dir"], seed=0, mask_store_name=store, teacher_cache=setup["spec"].to_dict())
    for epoch in (0, 2):
        set_epoch(store, epoch)
        seen = []
        for b in ds.iter_torch_batches(batch_size=32):
            with torch.no_grad():
                z = teacher(b["image"])
            torch.testing.assert_close(b["t_logits"].float(), z, atol=2e-2, rtol=1e-2)
            assert not b["t_missing"].any()
            seen.append(b["sample_id"])
        assert sorted(torch.cat(seen).tolist()) == list(range(96))
    m = read_manifest(setup["spec"].dir)
    assert sorted(m["units"]) == ["e0000", "e0001", "e0002"]
    assert [b["teacher_forwards"] for b in m["builds"]] == [3 * 96]


def test_cached_run_matches_the_teacher_in_the_loop_and_runs_no_teacher(setup):
    """Also across a resume: the cached run crashes after epoch 1 and a re-run finishes it."""
    from kcd_ray.ray_layer.trainer import fit

    rows = {}
    for mode in ("exact", "off"):
        cfg = _cfg(setup["base"], **{"distill.cache": mode, "run.name": f"kd_{mode}"})
        if mode == "exact":
            with pytest.raises(RuntimeError, match="injected failure after epoch 1"):
                fit(cfg, hooks=[("fail", {"epoch": 1, "mode": "raise"})])
        s = fit(cfg)
        rows[mode] = [json.loads(x) for x in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    history = (Path(setup["root"]) / "runs" / "kd_exact" / "history.jsonl").read_text()
    assert '"resume"' in history
    for a, b in zip(rows["exact"], rows["off"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=2e-3)
        assert abs(a["top1"] - b["top1"]) <= 2.5  # one test sample of 40 may flip on fp16 noise
    assert [r["teacher_forward_samples"] for r in rows["exact"]] == [0, 0, 0]
    assert [r["teacher_forward_samples"] for r in rows["off"]] == [96, 96, 96]
    assert rows["exact"][-1]["flops_teacher_forward"] == pytest.approx(rows["off"][-1]["flops_teacher_forward"])


def test_build_resumes_at_the_missing_unit_and_grows_with_epochs(setup):

    folder = Path(setup["spec"].dir)
    before = read_manifest(folder)
    (folder / "e0001.parquet").unlink()
    m = dict(before)
    m["units"] = {k: v for k, v in before["units"].items() if k != "e0001"}
    from kcd_ray.cache.store import write_manifest

    write_manifest(folder, m)  # as an interrupted build leaves it
    sha0 = before["units"]["e0000"]["sha256"]
    _ensure(_cfg(setup["base"], **{"optim.epochs": 4}), setup["data_dir"], verbose=False)
    after = read_manifest(folder)
    assert after["units"]["e0000"]["sha256"] == sha0
    assert after["units"]["e0001"]["sha256"] == before["units"]["e0001"]["sha256"]  # recomputed identically
    assert after["builds"][-1]["units"] == ["e0001", "e0003"]


def test_mismatched_teacher_data_or_seed_is_refused_with_one_line(setup, tmp_path):
    from kcd_ray.data import prepare_dataset

    cache_dir = setup["spec"].dir
    pinned = {"distill.cache_dir": cache_dir}
    with pytest.raises(CacheError, match=r"manifest.json: seed differs \(cache 0, this run 1\)"):
        _ensure(_cfg(setup["base"], **pinned, **{"optim.seed": 1}), setup["data_dir"], verbose=False)
    other = tmp_path / "other.pt"
    torch.manual_seed(7)
    save_model(other, build_model("resnet8", 4))
    with pytest.raises(CacheError, match="teacher_sha256 differs"):
        _ensure(_cfg(setup["base"], **pinned, **{"distill.teacher": str(other)}), setup["data_dir"],
                             verbose=False)
    data = _cfg(setup["base"], **{"data.root": str(tmp_path / "d2"), "data.synthetic.seed": 3}).data
    d2 = prepare_dataset(data, verbose=False)
    with pytest.raises(CacheError, match="data_checksum differs"):
        _ensure(_cfg(setup["base"], **pinned, **{"data.root": str(tmp_path / "d2"),
                                                              "data.synthetic.seed": 3}), d2, verbose=False)


# That a sweep builds the cache once and its trials run no teacher is checked by the default run's in-process
# sweep (tests/test_tune.py::test_in_process_sweep_reports_every_epoch): one Tune sweep checks both.


def test_cache_teacher_command_builds_or_reuses_and_names_what_it_cannot_serve(setup, tmp_path, capsys):
    import yaml

    from kcd_ray.cli import main

    f = tmp_path / "kd.yaml"
    f.write_text(yaml.safe_dump({**setup["base"], "distill": {**setup["base"]["distill"], "cache": "off"}}))
    assert main(["cache-teacher", "--config", str(f)]) == 0  # off -> exact: the fixture's cache, reused
    out = capsys.readouterr().out
    assert f"reusing {setup['spec'].dir}" in out and "ready:" in out
    assert main(["cache-teacher", "--config", str(f), "distill.method=fitnet"]) == 2
    err = capsys.readouterr().err
    assert "distill.cache: nothing to build: method 'fitnet' needs the teacher's feature maps" in err


def test_a_bare_yaml_off_is_the_off_mode(tmp_path):
    import yaml

    f = tmp_path / "c.yaml"
    f.write_text("distill:\n  cache: off\n")  # YAML 1.1: a boolean false
    assert yaml.safe_load(f.read_text())["distill"]["cache"] is False
    assert load_config(str(f)).distill.cache == "off"
    assert _cfg({}, **{"distill.cache": "views"}).distill.cache == "views"
