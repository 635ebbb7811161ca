"""Data-selection strategies (InfoBatch, UNIXKD, random subsets, KCD) and the compute ledger.

The rules on fixed inputs, the ledger's counts on tiny engine runs (plain Python batches, LocalServices), resume
of InfoBatch, and one short real run of each strategy (InfoBatch and UNIXKD with 2 Ray Train workers).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine_harness import batches, tiny_set
from kcd_ray.config import load_config
from kcd_ray.distill.base import StepOutput, kd_kl, kd_per_sample
from kcd_ray.engine import Hook, LocalServices, RunContext, assemble_engine
from kcd_ray.engine.assemble import run_hooks
from kcd_ray.engine.condenser import Condenser
from kcd_ray.engine.rundir import RunDir
from kcd_ray.engine.selection import (InfoBatch, RandomSubset, SelectionStrategy, UnixKD, epoch_rng, feed_batch_size,
                                      infobatch_keep_ratio, infobatch_prune, infobatch_prunes, per_sample_loss,
                                      random_subset, resolve_strategy, uncertainty, unixkd_mask, unixkd_mix,
                                      unixkd_sizes)
from kcd_ray.models import build_model, save_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(*overrides, **base):
    return load_config(base=base, overrides=list(overrides))


# --------------------------------------------------------------------------- strategy choice


def test_strategy_resolution_kcd_enabled_is_a_synonym_and_exactly_one_runs(tmp_path):
    assert resolve_strategy(_cfg()) == "kcd"  # auto + kcd.enabled (the default)
    assert resolve_strategy(_cfg("kcd.enabled=false")) == "none"  # plain KD
    assert resolve_strategy(_cfg("kcd.enabled=false", "selection.strategy=none")) == "none"
    assert resolve_strategy(_cfg("selection.strategy=kcd", "kcd.enabled=false")) == "kcd"
    assert resolve_strategy(_cfg("selection.strategy=infobatch")) == "infobatch"  # explicit wins over kcd.enabled
    assert resolve_strategy(_cfg("selection.strategy=random"), kind="teacher") == "none"
    run_dir = RunDir(tmp_path)
    for strategy, name in (("auto", "kcd"), ("none", None), ("kcd", "kcd"), ("infobatch", "infobatch"),
                           ("unixkd", "unixkd"), ("random", "random")):
        ctx = RunContext(cfg=_cfg(f"selection.strategy={strategy}"), kind="distill", run_dir=run_dir, data_dir="")
        hooks = run_hooks(ctx, 100)
        picked = [h.name for h in hooks if isinstance(h, SelectionStrategy)]
        assert picked == ([name] if name else []), (strategy, picked)
        kinds = [type(h).__name__ for h in hooks]
        assert kinds.index("ComputeLedger") < kinds.index("MetricsWriter")  # the ledger fills the row first
    ctx = RunContext(cfg=_cfg("selection.strategy=random"), kind="distill", run_dir=run_dir, data_dir="")
    with pytest.raises(ValueError, match="second data-selection strategy"):
        run_hooks(ctx, 100, extra=[Condenser])


# --------------------------------------------------------------------------- InfoBatch


def test_infobatch_threshold_pruning_rate_and_weights():
    scores = np.arange(10, dtype=np.float32)  # mean 4.5: samples 0..4 are "well learned"
    kept, w = infobatch_prune(scores, np.ones(10, bool), infobatch_keep_ratio(0.5), epoch_rng(0, 3))
    assert kept[5:].all() and (w[5:] == 1).all()  # at or above the mean: always kept, weight 1
    assert kept[:5].sum() == int(0.5 * 5) == 2  # int(keep_ratio * #well-learned) kept at random ...
    assert np.allclose(w[:5][kept[:5]], 2.0) and (w[:5][~kept[:5]] == 1).all()  # ... with weight 1/keep_ratio
    again, _ = infobatch_prune(scores, np.ones(10, bool), 0.5, epoch_rng(0, 3))
    assert np.array_equal(kept, again)  # seeded by (seed, epoch)
    # The rate on a large set: r = 0.3 drops 30% of the below-mean samples.
    rng = np.random.default_rng(1)
    s = rng.exponential(size=20000).astype(np.float32)
    kept, w = infobatch_prune(s, np.ones(len(s), bool), infobatch_keep_ratio(0.3), epoch_rng(0, 1))
    below = s < s.mean()
    assert (~kept).sum() == below.sum() - int(0.7 * below.sum())
    assert np.allclose(w[kept & below], 1 / 0.7)
    # Never-seen samples (initial score 3) are kept, even when the mean is above 3.
    s = np.array([3.0, 3.0, 9.0, 9.0, 1.0], np.float32)
    kept, _ = infobatch_prune(s, np.array([False, False, True, True, True]), 0.1, epoch_rng(0, 0))
    assert kept[:2].all()
    assert infobatch_keep_ratio(0.95) == pytest.approx(0.1)  # the reference's clamp


def test_infobatch_annealing_follows_the_reference_parameterisation():
    # The reference prunes unless epoch > num_epochs * delta (delta = 0.875: the first 0.875 of the epochs).
    assert [infobatch_prunes(e, 16, 0.875) for e in range(16)] == [True] * 15 + [False]
    assert [infobatch_prunes(e, 200, 0.875) for e in (175, 176)] == [True, False]
    hook = InfoBatch(_cfg("selection.infobatch.ratio=0.5", "selection.infobatch.delta=0.5", "optim.epochs=4"), 6)
    hook.scores[:] = [0, 0, 0, 10, 10, 10]
    hook.seen[:] = True
    engine = SimpleNamespace(parts=SimpleNamespace(temperature=lambda e: 4.0), device=torch.device("cpu"))
    hook.before_epoch(engine, 2)  # 2 <= 4 * 0.5: prunes
    assert hook.kept.sum() == 3 + 1 and hook.data_selection(engine).kept is hook.kept
    assert sorted(set(hook.weights.tolist())) == [1.0, 2.0]
    hook.before_epoch(engine, 3)  # annealed: the full set, every weight back to 1
    assert hook.kept is None and hook.data_selection(engine) is None and (hook.weights == 1).all()


def test_infobatch_rescales_the_per_sample_loss_and_records_scores():
    torch.manual_seed(0)
    z = torch.randn(6, 5, requires_grad=True)
    zt, y, T_ = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0]), 4.0
    gamma, alpha = 0.1, 0.9
    losses = {"ce": gamma * F.cross_entropy(z, y), "kd": alpha * kd_kl(z, zt, T_)}
    per = {"ce": gamma * F.cross_entropy(z, y, reduction="none"), "kd": alpha * kd_per_sample(z, zt, T_)}
    l_i = per_sample_loss(StepOutput(z, losses, zt, per))
    assert torch.allclose(l_i.mean(), sum(losses.values()))  # the distiller's terms, per sample
    with pytest.raises(ValueError, match="per-sample losses"):
        per_sample_loss(StepOutput(z, losses, zt))
    hook = InfoBatch(_cfg("selection.infobatch.ratio=0.5", "optim.epochs=8"), 6)
    hook.weights = np.array([1, 2, 1, 2, 1, 1], np.float32)
    hook._w_dev = torch.as_tensor(hook.weights)
    engine = SimpleNamespace(distiller=SimpleNamespace(name="kd", gamma=gamma, alpha=alpha))
    ids = torch.tensor([5, 1, 2, 3, 4, 0])
    batch = {"label": y, "sample_id": ids, "sample_id_cpu": ids}
    out = hook.adjust_loss(engine, batch, StepOutput(z, losses, zt, per), sum(losses.values()))
    w = torch.as_tensor(hook.weights)[ids]
    ref = (l_i * w).mean()  # InfoBatch.update: values.mul_(weights); values.mean()
    assert torch.allclose(out, ref)
    g_out = torch.autograd.grad(out, z, retain_graph=True)[0]
    g_ref = torch.autograd.grad(ref, z)[0]
    assert torch.allclose(g_out, g_ref, atol=1e-6)
    assert torch.equal(hook._ids[0], ids) and torch.allclose(hook._losses[0], l_i.detach())  # the next scores


# --------------------------------------------------------------------------- UNIXKD


def test_unixkd_sizes_follow_the_reference_defaults():
    u = _cfg().selection.unixkd
    assert unixkd_sizes(u, 64) == (64, 48, 32)  # --batch-size 64 --k 48 --b 32
    assert unixkd_sizes(SimpleNamespace(batch_size=48, ratio=0.75, pure_fraction=0.5), 999) == (64, 48, 32)
    cfg = _cfg("selection.strategy=unixkd", "selection.unixkd.batch_size=30", "selection.unixkd.ratio=0.5")
    assert feed_batch_size(cfg) == 60 and feed_batch_size(_cfg()) == 64


def test_unixkd_ranks_by_uncertainty_and_mixes_as_the_reference():
    logits = torch.tensor([[5.0, 0, 0], [0, 0, 0], [2, 1, 0], [9, 0, 0], [1, 1, 0], [0, 3, 0], [0, 0, 0.5], [4, 4, 0]])
    s = uncertainty(logits, "entropy")
    p = F.softmax(logits, 1)
    assert torch.allclose(s, -(p * p.log()).sum(1))
    rank = torch.argsort(s, descending=True)
    assert rank[0] == 1 and rank[-1] == 3  # uniform prediction first, the most confident last
    assert torch.allclose(uncertainty(logits, "confidence"), 1 - p.max(1).values)
    B, k, b, lam = 8, 6, 4, 0.3
    mask = unixkd_mask(B, B, b, 1000.0)
    ref = 1 / (1 + torch.exp(-1000.0 * (torch.arange(B).float() / B - (2 * b - 1) / (2 * B))))
    assert torch.allclose(mask, ref) and (mask[:b] < 1e-3).all() and (mask[b:] > 1 - 1e-3).all()
    x = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, 2, 2).clone()
    y = torch.arange(B) + 10
    perm = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    img, y_own, y_partner, m, top = unixkd_mix(x, y, s, perm, lam, k, B, b, 1000.0)
    assert img.shape[0] == k and torch.equal(top, rank[:k]) and torch.equal(y_own, y[rank[:k]])
    assert torch.equal(y_partner, y[perm[:k]])  # position i is mixed with candidate perm[i]
    expect = (1 - lam * ref[:k]).view(-1, 1, 1, 1) * x[rank[:k]] + (lam * ref[:k]).view(-1, 1, 1, 1) * x[perm[:k]]
    assert torch.allclose(img, expect)
    assert torch.allclose(img[:b], x[rank[:b]], atol=1e-3)  # the b most uncertain are (almost) unmixed
    assert torch.allclose(m, lam * ref[:k])
    # A short last batch (n < k) trains on all of it, positions still relative to the configured B.
    img, *_ = unixkd_mix(x[:5], y[:5], s[:5], torch.arange(5), lam, k, B, b, 1000.0)
    assert img.shape[0] == 5


def test_unixkd_hook_batch_mixed_label_ce_and_forward_only_count():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    from contextlib import nullcontext

    hook = UnixKD(_cfg("selection.strategy=unixkd", "optim.batch_size=8"), 8)
    engine = SimpleNamespace(distiller=SimpleNamespace(student=student, name="kd", gamma=0.5, alpha=0.9),
                             parts=SimpleNamespace(amp_ctx=nullcontext()), ctx=SimpleNamespace(rank=0))
    hook.before_epoch(engine, 0)
    ids = torch.arange(8) + 100
    batch = {"image": torch.randn(8, 3, 2, 2), "label": torch.arange(8) % 4, "sample_id": ids, "sample_id_cpu": ids}
    out = hook.before_step(engine, batch)
    assert out["image"].shape[0] == 6 and torch.equal(out["sample_id_cpu"], out["sample_id"])
    assert set(out["sample_id"].tolist()) <= set(ids.tolist()) and len(set(out["sample_id"].tolist())) == 6
    hook.before_epoch(engine, 0)
    again = hook.before_step(engine, batch)
    assert torch.equal(out["image"], again["image"])  # draws seeded by (seed, epoch, rank)
    assert (hook.pop_compute_counts() == {"student_forward_only": 16}
            and hook.pop_compute_counts()["student_forward_only"] == 0)
    z = student(out["image"])
    ce = 0.5 * F.cross_entropy(z, out["label"])
    new = hook.adjust_loss(engine, out, StepOutput(z, {"ce": ce}, None), ce)
    m = out["mix_weight"]
    ref = 0.5 * ((1 - m) * F.cross_entropy(z, out["label"], reduction="none")
                 + m * F.cross_entropy(z, out["mix_label"], reduction="none")).mean()
    assert torch.allclose(new, ref)


# --------------------------------------------------------------------------- random subsets


def test_random_subset_fraction_seeding_and_kcd_schedule():
    kept = random_subset(1000, 300, epoch_rng(0, 2))
    assert kept.sum() == 300 and np.array_equal(kept, random_subset(1000, 300, epoch_rng(0, 2)))
    assert not np.array_equal(kept, random_subset(1000, 300, epoch_rng(0, 3)))
    assert not np.array_equal(kept, random_subset(1000, 300, epoch_rng(1, 2)))
    cfg = _cfg("selection.random.fraction=0.3", "optim.epochs=5")
    hook = RandomSubset(cfg, 1000)
    hook.before_epoch(None, 2)
    assert np.array_equal(hook.kept, kept)
    other_rank = RandomSubset(cfg, 1000)
    other_rank.before_epoch(SimpleNamespace(ctx=SimpleNamespace(rank=1, world=2)), 2)
    assert np.array_equal(other_rank.kept, kept)  # every rank draws the same subset (no all-gather needed)
    cfg = _cfg("selection.random.follow_kcd_schedule=true", "kcd.interval=1", "kcd.stages=2", "kcd.rho=0.5",
               "optim.epochs=4")
    hook = RandomSubset(cfg, 100)
    sizes = []
    for e in range(4):
        hook.before_epoch(None, e)
        sizes.append(100 if hook.kept is None else int(hook.kept.sum()))
    assert sizes == [100, 75, 50, 50]  # KCD's planned sizes: equal compute, random samples


# --------------------------------------------------------------------------- engine runs (no Ray)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A prepared synthetic set (8x8, 4 classes, 96 training samples) in memory and a (random) teacher file."""
    return tiny_set(tmp_path_factory.mktemp("selection"), optim={"epochs": 2})


_batches = batches


def _engine(tiny, path, hooks_extra=(), services=None, **over):
    cfg = load_config(base={**copy.deepcopy(tiny["base"]), "distill": {"teacher": tiny["teacher"]}},
                      overrides=[f"{k}={json.dumps(v)}" for k, v in over.items()])
    return assemble_engine(cfg, torch.device("cpu"), services, data_dir=tiny["data_dir"], run_dir=path / "run",
                           hooks=list(hooks_extra))


def _run(tiny, engine):
    services, bs = engine.services, engine.cfg.optim.batch_size

    def train(epoch):
        return _batches(tiny["split"]["train"], bs, epoch, keep=services.mask[0])

    return engine.run(train, lambda: _batches(tiny["split"]["test"], 64, 0))


def _rows(engine):
    return [json.loads(x) for x in (engine.ctx.run_dir.path / "metrics.jsonl").read_text().splitlines()]


def _real_flops(arch, shape=(3, 8, 8)):
    from torch.utils.flop_counter import FlopCounterMode

    net = build_model(arch, 4).train()
    with FlopCounterMode(display=False) as fc:
        out = net(torch.zeros(2, *shape))
    fwd = fc.get_total_flops() / 2
    with FlopCounterMode(display=False) as fc:
        out.sum().backward()
    return fwd, fc.get_total_flops() / 2


def test_ledger_counts_passes_and_flops_on_a_tiny_run(tiny, tmp_path):
    sf, sb = _real_flops("resnet8")
    n, per_kd = 96, None
    ref = {}
    for strategy, over in (("none", {"kcd.enabled": False}), ("random", {"selection.random.fraction": 0.5}),
                           ("unixkd", {"selection.unixkd.ratio": 0.75})):
        engine = _engine(tiny, tmp_path / strategy, **{"selection.strategy": strategy, **over})
        summary = _run(tiny, engine)
        rows = _rows(engine)
        assert all(r["strategy"] == strategy for r in rows) and summary["strategy"] == strategy
        r0 = rows[0]
        assert r0["flops_student_forward"] == sf and r0["flops_student_backward"] == sb
        assert r0["flops_teacher_forward"] == sf  # the teacher is a resnet8 too
        per_kd = sf + sb + sf
        trained = {"none": n, "random": n // 2, "unixkd": 6 * 12}[strategy]  # unixkd: 6 candidate batches of 16 -> 12
        fwd_only = {"none": 0, "random": 0, "unixkd": n}[strategy]
        for e, r in enumerate(rows):
            assert r["samples_seen"] == trained and r["teacher_forward_samples"] == trained
            assert r["student_forward_only_samples"] == fwd_only
            assert r["flops"] == pytest.approx(trained * (sf + sb) + fwd_only * sf + trained * sf)
            assert r["flops_total"] == pytest.approx((e + 1) * r["flops"])
            assert r["sample_pass_ratio"] == pytest.approx(trained / n)
            assert r["compute_ratio"] == pytest.approx(r["flops"] / (n * per_kd))
        assert summary["sample_passes"] == 2 * trained and summary["student_forward_only_passes"] == 2 * fwd_only
        assert (summary["teacher_forward_passes"] == 2 * trained
                and summary["full_flops"] == pytest.approx(2 * n * per_kd))
        assert summary["compute_ratio"] == pytest.approx(summary["flops_total"] / (2 * n * per_kd))
        assert summary["sample_pass_ratio"] == pytest.approx(trained / n)
        ref[strategy] = summary["compute_ratio"]
        # Every numeric row field is a metric a sweep may name, and every such metric is in every row.
        from kcd_ray.engine.engine import ENGINE_COLUMNS
        from kcd_ray.sweeps.metrics import is_epoch_metric

        for r in rows:
            numeric = {k for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            assert all(is_epoch_metric(k) for k in numeric), sorted(k for k in numeric if not is_epoch_metric(k))
            assert set(ENGINE_COLUMNS) <= set(r), sorted(set(ENGINE_COLUMNS) - set(r))
    assert ref["none"] == pytest.approx(1.0) and ref["random"] == pytest.approx(0.5)
    assert ref["unixkd"] == pytest.approx((72 * per_kd + 96 * sf) / (96 * per_kd))  # UNIXKD pays for its ranking


def test_ledger_counts_the_offline_estep_as_forward_only(tiny, tmp_path):
    def scorer(student_state, epoch):
        ids = tiny["split"]["train"][0].numpy()
        return ids, (ids % 7).astype(np.float32)

    services = LocalServices(checkpoint_dir=tmp_path / "run" / "local_checkpoint", scorer=scorer)
    engine = _engine(tiny, tmp_path, services=services, **{"kcd.estep": "offline", "kcd.interval": 1,
                                                          "kcd.stages": 2, "kcd.rho": 0.5, "kcd.summary": False,
                                                          "selection.strategy": "kcd", "kcd.enabled": False})
    summary = _run(tiny, engine)
    assert summary["kcd_enabled"] is True  # an explicit selection.strategy=kcd runs KCD whatever kcd.enabled says
    rows = _rows(engine)
    assert [r["student_forward_only_samples"] for r in rows] == [0, 96]  # epoch 1: all N scored (entropy: no teacher)
    assert [r["teacher_forward_samples"] for r in rows] == [96, 72]
    assert summary["strategy"] == "kcd" and summary["sample_passes"] == 96 + 72
    sf, sb, tf = rows[0]["flops_student_forward"], rows[0]["flops_student_backward"], rows[0]["flops_teacher_forward"]
    assert summary["flops_total"] == pytest.approx(168 * (sf + sb + tf) + 96 * sf)


def test_infobatch_prunes_in_the_loop_and_resume_continues_exactly(tiny, tmp_path):
    over = {"selection.strategy": "infobatch", "optim.epochs": 4, "selection.infobatch.delta": 0.5}
    ref = _engine(tiny, tmp_path / "ref", **over)
    ref_summary = _run(tiny, ref)
    rows = _rows(ref)
    seen = [r["samples_seen"] for r in rows]
    assert seen[0] == 96 and seen[1] < 96 and seen[2] < 96 and seen[3] == 96  # epochs 0..2 prune (<= 4 * 0.5)
    assert [r["kept_fraction"] for r in rows][1] == pytest.approx(seen[1] / 96)
    ref_masks = [ids.tolist() for _, ids, _ in ref.services.masks]

    class Stop(Hook):
        def after_checkpoint(self, engine, epoch, row):
            if epoch == 1:
                raise KeyboardInterrupt

    first = _engine(tiny, tmp_path / "cut", hooks_extra=[Stop()], **over)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, first)
    again = _engine(tiny, tmp_path / "cut", **over)
    again.restore(again.services.latest_checkpoint())
    assert again.start_epoch == 2
    summary = _run(tiny, again)
    ib_ref, ib = ref.hook("infobatch"), again.hook("infobatch")
    assert np.array_equal(ib_ref.scores, ib.scores) and np.array_equal(ib_ref.seen, ib.seen)
    assert [m.tolist() for _, m, _ in again.services.masks] == ref_masks[-len(again.services.masks):]
    for k, v in ref.distiller.student.state_dict().items():
        assert torch.allclose(v.float(), again.distiller.student.state_dict()[k].float(), atol=1e-5), k
    for key in ("final_top1", "sample_passes", "flops_total", "compute_ratio", "teacher_forward_passes"):
        assert summary[key] == pytest.approx(ref_summary[key]), key


# --------------------------------------------------------------------------- 2 Ray Train workers


@pytest.mark.ray
@pytest.mark.parametrize("strategy", [pytest.param("infobatch", marks=pytest.mark.slow), "random",
                                      pytest.param("unixkd", marks=pytest.mark.slow)])
def test_each_strategy_runs_with_two_workers(ray_session, tmp_path, strategy):
    """unixkd and random one epoch, infobatch two (its first prunes nothing), on digits through fit(): the
    selection reaches the pipeline (no worker trains a sample outside it), every rank holds the same selection
    state (InfoBatch's all-gathered scores and its weights too), the ledger counts. InfoBatch and UNIXKD (the
    all-gather; the ranking forward through DDP) run 2 Train workers. Random runs in-process (the same fit(), the
    same Ray Data pipeline): its kept set reaches the pipeline as InfoBatch's does (``data_selection`` -> the mask
    store -> the split), and needs nothing from the other ranks (test_random_subset_...: rank-independent), so a
    third 2-worker run (~20 s of Train start-up on 2 cores) would check that path twice. KCD with 2 workers (the
    same hook, built through selection.strategy) is
    tests/test_train.py::test_two_workers_kcd_mask_sharding_and_values. The 2-worker runs of InfoBatch and UNIXKD
    (~30 s each on 2 cores) are `slow`: the default suite's 2-worker selection path (a strategy whose per-sample
    scores are all-gathered by sample id, the kept set the same on every rank, reaching the pipeline) is
    tests/test_toy_strategy.py's, through the same ``gather_per_sample`` InfoBatch uses."""
    from kcd_ray.ray_layer.trainer import fit

    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    save_model(teacher, build_model("resnet8", 10))
    base = {"model": "resnet8", "data": {"name": "digits", "image_size": 8, "root": str(tmp_path / "data")},
            "optim": {"epochs": 1, "batch_size": 64, "lr": 0.05, "scheduler": "cosine", "threads": 1},
            "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "data_cpus": 0.25},
            "run": {"storage_path": str(tmp_path / "runs"), "verbose": 0},
            "distill": {"teacher": str(teacher)}}
    runs = {"infobatch": (2, ["optim.epochs=2"]), "random": (0, ["selection.random.fraction=0.4"]), "unixkd": (2, [])}
    workers, extra = runs[strategy]
    cfg = load_config(base=base, overrides=[f"selection.strategy={strategy}", f"run.name={strategy}",
                                            f"scaling.num_workers={workers}", *extra])
    summary = fit(cfg, kind="distill", hooks=["record_ids", "record_selection"])
    run_dir, n, world = Path(summary["run_dir"]), summary["num_train"], max(workers, 1)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["strategy"] == strategy and [r["strategy"] for r in rows] == [strategy] * cfg.optim.epochs
    for e, row in enumerate(rows):
        parts = [np.load(run_dir / "ids" / f"e{e:04d}_r{r}.npy") for r in range(world)]
        seen = np.concatenate(parts)
        assert len(seen) - len(np.unique(seen)) <= world - 1, (strategy, e)  # padding to equal shards
        assert row["samples_seen"] == len(seen)
        sel = [np.load(run_dir / "selection" / f"e{e:04d}_r{r}.npz") for r in range(world)]
        for key in sel[0].files:  # identical selection state on both ranks
            assert all(np.array_equal(sel[0][key], other[key]) for other in sel[1:]), (strategy, e, key)
        kept = sel[0]["kept"]
        assert kept[seen].all(), (strategy, e)  # nothing outside the selection was trained on
        if strategy != "unixkd":
            assert kept.sum() == len(np.unique(seen)), (strategy, e)  # the whole kept set, none dropped
        else:
            # candidates cover the set; 48 of each 64 train
            assert row["student_forward_only_samples"] >= n - 1 and len(seen) < 0.8 * n
    if strategy == "random":
        assert rows[0]["samples_seen"] >= int(0.4 * n) - 1 and rows[0]["compute_ratio"] < 0.45
    if strategy == "infobatch":
        assert rows[0]["samples_seen"] >= n - 1 and rows[1]["samples_seen"] < 0.95 * n  # epoch 1 prunes
        assert (sel[0]["weights"][kept] >= 1).all() and (sel[0]["weights"] > 1).any()
    assert summary["compute_ratio"] == pytest.approx(summary["flops_total"] / summary["full_flops"])
    if strategy != "unixkd":  # UNIXKD's ranking costs more than it saves with a student-sized teacher
        assert 0 < summary["compute_ratio"] < 1.0
