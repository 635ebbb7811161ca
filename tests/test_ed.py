"""Education distillation (docs/methods/ed.md): class groups, the growing student, the ed and mtkd losses, the grade
curriculum on the in-process engine (plain Python batch lists, no Ray), and two Ray Train runs at the end."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine_harness import batches, tiny_set
from kcd_ray.config import ConfigError, load_config
from kcd_ray.data.groups import ClassGroups, group_sizes, relabel_batches, sequential_order, subset_num_classes
from kcd_ray.distill import build_distiller
from kcd_ray.engine import Hook, assemble_engine
from kcd_ray.engine.build import build_scheduler
from kcd_ray.engine.curriculum import GradeSchedule, check_curriculum, group_teacher_config
from kcd_ray.models import build_model, load_model, save_model
from kcd_ray.models.growing import GrowingStudent

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "cifar_model_state_dicts.json").read_text())

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- class groups (pure)


def test_group_sizes_sum_to_k_with_the_remainder_last():
    assert group_sizes(100, 3) == [33, 33, 34]  # docs/methods/ed.md §3: classes 0-32, 33-65, 66-99
    assert group_sizes(10, 3) == [3, 3, 4] and group_sizes(10, 1) == [10]
    for k, g in [(100, 3), (10, 3), (7, 7), (1000, 6)]:
        assert sum(group_sizes(k, g)) == k
    assert group_sizes(10, 2, [3, 7]) == [3, 7]
    with pytest.raises(ConfigError, match="sum to the 10 classes"):
        group_sizes(10, 2, [3, 6])
    with pytest.raises(ConfigError, match="curriculum.groups"):
        group_sizes(3, 4)


def test_class_order_offsets_and_local_labels():
    g = ClassGroups.build(100, 3)
    assert [g.offset(h) for h in (1, 2, 3)] == [0, 33, 66] and [g.seen(h) for h in (1, 2, 3)] == [33, 66, 100]
    assert g.classes(2).tolist() == list(range(33, 66))
    lut = g.local_lut([2])
    assert lut[33] == 0 and lut[65] == 32 and lut[32] == -1 and lut[66] == -1  # y - o_g
    p1, p2 = (ClassGroups.build(10, 3, class_order="permuted", seed=5),
              ClassGroups.build(10, 3, class_order="permuted", seed=5))
    assert np.array_equal(p1.order, p2.order) and sorted(p1.order.tolist()) == list(range(10))
    assert not np.array_equal(p1.order, np.arange(10))
    assert not np.array_equal(p1.order, ClassGroups.build(10, 3, class_order="permuted", seed=6).order)
    assert np.array_equal(p1.position[p1.order], np.arange(10))
    assert p1.group_of_label[p1.classes(3)].tolist() == [3, 3, 3, 3]
    lut = p1.local_lut([3])
    assert lut[p1.classes(3)].tolist() == [0, 1, 2, 3]


def test_relabel_and_sequential_order():
    g = ClassGroups.build(6, 3)
    lut = g.local_lut([2])
    batch = {"image": torch.arange(6.0)[:, None], "label": torch.tensor([0, 2, 3, 5, 2, 1]),
             "sample_id": torch.arange(6)}
    out = list(relabel_batches([batch], lut))
    assert out[0]["label"].tolist() == [0, 1, 0] and out[0]["sample_id"].tolist() == [1, 2, 4]
    assert out[0]["image"][:, 0].tolist() == [1.0, 2.0, 4.0]
    labels = np.array([0, 1, 2, 3, 4, 5, 0, 2])
    passes = sequential_order(np.arange(8), labels, g, 2, np.random.default_rng(0))
    assert [sorted(p.tolist()) for p in passes] == [[0, 1, 6], [2, 3, 7]]
    cfg = load_config(None, ["curriculum.only_groups=[3]", "curriculum.labels=local"])
    assert subset_num_classes(cfg.curriculum, 10) == 4


# --------------------------------------------------------------------------- the growing student (pure)


@pytest.mark.parametrize("name", sorted(FIXTURE))
def test_growing_student_is_the_zoo_model(name):
    """Same state-dict keys and shapes as the fixture at every grade; grade G is the native forward; K_g outputs."""
    torch.manual_seed(0)
    net = build_model(name, 100)
    gs = GrowingStudent(net, [33, 66, 100])
    assert [(k, list(v.shape)) for k, v in gs.state_dict().items()] == [tuple(x) for x in FIXTURE[name]["state_dict"]]
    assert sum(p.numel() for p in gs.parameters()) == FIXTURE[name]["num_parameters"]
    gs.eval()
    x = torch.randn(2, 3, 32, 32)
    for g, k in ((1, 33), (2, 66), (3, 100)):
        gs.set_grade(g)
        assert gs.grade_logits(x).shape == (2, k)
        assert gs(x).shape == (2, 100)
    assert torch.equal(gs(x), net(x))


def test_tr_heads_follow_ed_md_5():
    gs = GrowingStudent(build_model("resnet20", 100), [33, 66, 100], tr1_grid=4)
    tr1, tr2 = gs.tr_heads
    assert tuple(tr1.conv.weight.shape) == (64, 16, 1, 1) and tr1.fc.in_features == 1024 and tr1.fc.out_features == 33
    assert tuple(tr2.conv.weight.shape) == (64, 32, 1, 1) and tr2.fc.in_features == 64 and tr2.fc.out_features == 66
    # docs/methods/ed.md §5.3: the final student is exactly resnet20
    assert sum(p.numel() for p in gs.parameters()) == 278324
    for name, (c1, c2, cfin) in {"wrn_16_2": (32, 64, 128), "vgg8": (128, 256, 512), "MobileNetV2": (12, 48, 1280),
                                  "ShuffleV1": (240, 480, 960), "ShuffleV2": (116, 232, 1024),
                                  "resnet8x4": (64, 128, 256)}.items():
        h = GrowingStudent(build_model(name, 10), [3, 6, 10]).tr_heads
        assert [h[0].conv.in_channels, h[1].conv.in_channels, h[0].fc.in_features] == [c1, c2, cfin], name


def test_fewer_stages_than_grades_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"4 grades but model 'resnet8' has 3 resolution stages") as e:
        GrowingStudent(build_model("resnet8", 10), [2, 4, 6, 10])
    assert "\n" not in str(e.value)
    GrowingStudent(build_model("ResNet50", 10), [2, 4, 6, 10])  # 4 stages: G = 4 is fine
    with pytest.raises(ConfigError, match="no education-distillation split"):
        GrowingStudent(build_model("imagenet_resnet18", 10), [5, 10])


# --------------------------------------------------------------------------- losses (pure)


class Fixed(torch.nn.Module):
    """A 'teacher' returning fixed logits per sample (looked up by the first pixel, which holds the row index)."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.num_classes = table.shape[1]

    def forward(self, x):
        return self.table[x[:, 0, 0, 0].long()]


def _ed(order="identity", source="per_group", alpha=0.3):
    cur = load_config(None, ["curriculum.name=ed", f"curriculum.class_order={order}", "curriculum.seed=3",
                             f"curriculum.teacher_source={source}", f"curriculum.alpha={alpha}"]).curriculum
    groups = ClassGroups.from_config(cur, 10)  # 3/3/4
    torch.manual_seed(0)
    B = 12
    if source == "per_group":
        teachers = [Fixed(torch.randn(B, n)) for n in groups.sizes]
    else:
        teachers = [Fixed(torch.randn(B, 10))]
    dcfg = load_config(None, ["distill.method=ed"]).distill
    d = build_distiller(dcfg, build_model("resnet8", 10), teachers, 10, groups=groups, curriculum=cur, image_size=16)
    x = torch.randn(B, 3, 16, 16)
    x[:, 0, 0, 0] = torch.arange(B).float()
    return d, groups, teachers, x


@pytest.mark.parametrize("order,source", [("identity", "per_group"), ("permuted", "per_group"), ("identity", "sliced")])
def test_ed_loss_uses_the_groups_kd_slice(order, source):
    d, groups, teachers, x = _ed(order, source)
    d.train()
    T = 4.0
    for g in (1, 2, 3):
        d.set_grade(g)
        labels = torch.as_tensor(np.resize(groups.seen_classes(g), 12))
        out = d({"image": x, "label": labels, "sample_id": torch.arange(12)}, T=T, epoch=0)
        z = d.student.grade_logits(x).detach()  # same BN batch statistics: the forward is deterministic
        assert z.shape == (12, groups.seen(g)) and out.logits.shape == (12, 10)
        pos = torch.as_tensor(groups.position)[labels]
        assert torch.allclose(out.losses["ce"], 0.3 * F.cross_entropy(z, pos), atol=1e-5)
        kl = 0.0
        for i, y in enumerate(labels.tolist()):
            h = int(groups.group_of_label[y])
            o, n = groups.offset(h), groups.size(h)
            s = z[i, o:o + n]  # docs/methods/ed.md §6: the student's slice [o_h, o_h + n_h)
            t = teachers[h - 1].table[i] if source == "per_group" else teachers[0].table[i][groups.classes(h)]
            q = F.softmax(t / T, 0)
            kl += float((q * (q.log() - F.log_softmax(s / T, 0))).sum())
        assert out.losses["kd"].item() == pytest.approx(0.7 * T * T * kl / 12, rel=1e-4)
        # teacher logits for KCD: label order, the teacher's argmax inside the sample's group
        tl = out.teacher_logits.argmax(1)
        assert all(int(groups.group_of_label[a]) == int(groups.group_of_label[b])
                   for a, b in zip(tl.tolist(), labels.tolist()))


def test_ed_refuses_a_batch_from_a_future_group_and_wrong_teachers():
    d, groups, teachers, x = _ed()
    d.set_grade(1)
    with pytest.raises(ValueError, match="group 2 in grade 1"):
        d({"image": x, "label": torch.full((12,), 4), "sample_id": torch.arange(12)}, T=4.0, epoch=0)
    cur = load_config(None, ["curriculum.name=ed"]).curriculum
    with pytest.raises(ConfigError, match=r"expected 3 teacher\(s\) with \[3, 3, 4\] outputs"):
        build_distiller(load_config(None, ["distill.method=ed"]).distill, build_model("resnet8", 10), teachers[:2], 10,
                        groups=groups, curriculum=cur)


def test_mtkd_is_ce_plus_the_mean_of_kd_losses():
    torch.manual_seed(0)
    teachers = [build_model("resnet8", 10).eval() for _ in range(3)]
    cfg = load_config(None, ["distill.method=mtkd"]).distill
    d = build_distiller(cfg, build_model("resnet8", 10), teachers, 10, image_size=16)
    assert (not any(n.startswith("_teachers") for n, _ in d.named_parameters())
            and "teacher" not in str(list(d.state_dict())))
    d.eval()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    out = d({"image": x, "label": y, "sample_id": torch.arange(4)}, T=4.0, epoch=0)
    s = d.student(x)
    kd = sum(16 * F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t(x) / 4, 1), reduction="batchmean")
             for t in teachers) / 3
    assert out.losses["ce"].item() == pytest.approx(0.1 * F.cross_entropy(s, y).item(), rel=1e-5)
    assert out.losses["kd"].item() == pytest.approx(0.9 * kd.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="distill.teachers"):
        build_distiller(cfg, build_model("resnet8", 10), [], 10)


# --------------------------------------------------------------------------- schedule and config (pure)


def test_learning_rate_and_grades_per_epoch_follow_ed_md_7():
    cfg = load_config(None, ["optim.epochs=240", "optim.scheduler=multistep"])
    sched = GradeSchedule([149, 30, 61])
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optim.lr)
    lr_sched = build_scheduler(opt, cfg.optim)
    lrs = []
    for _ in range(240):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        lr_sched.step()
    grade = [sched.grade_of(e) for e in range(240)]  # 0-based epochs; docs/methods/ed.md counts from 1
    assert grade.index(2) == 149 and grade.index(3) == 179 and grade[-1] == 3  # grades from epochs 150 and 180
    # grade 2: one epoch at 0.05
    assert lrs[148] == lrs[149] == pytest.approx(0.05) and lrs[150] == pytest.approx(0.005)
    assert lrs[179] == pytest.approx(0.005) and lrs[180] == pytest.approx(5e-4) and lrs[210] == pytest.approx(5e-5)
    per = GradeSchedule([149, 30, 61], "per_grade", 0.05, 0.1)
    # 0.625*149=93
    assert per.lr(0) == 0.05 and per.lr(92) == pytest.approx(0.05) and per.lr(93) == pytest.approx(0.005)
    assert per.lr(149) == 0.05 and per.lr(149 + 18) == pytest.approx(0.005) and per.lr(149 + 26) == pytest.approx(5e-5)
    assert per.lr(179) == 0.05 and per.lr(239) == pytest.approx(5e-5)


def test_config_errors_are_one_line():
    def cfg(*over):
        return load_config(None, ["curriculum.name=ed", "distill.method=ed", "optim.epochs=6",
                                  "curriculum.grade_epochs=[2,2,2]", *over])

    check_curriculum(cfg(), "distill")
    cases = [(cfg("distill.method=kd"), "distill.method"),
             (cfg("curriculum.grade_epochs=[2,2,3]"), "sum to optim.epochs"),
             (cfg("curriculum.grade_epochs=[3,3]"), "2 grades for curriculum.groups=3"),
             (cfg("kcd.estep=offline"), "kcd.estep"), (load_config(None, ["distill.method=ed"]), "curriculum.name=ed"),
             (load_config(None, ["curriculum.labels=local"]), "only_groups")]
    for c, msg in cases:
        with pytest.raises(ConfigError, match=msg) as e:
            check_curriculum(c, "distill")
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="mix_groups.*data.shuffle=full"):
        check_curriculum(cfg("data.shuffle=block_local"), "distill")
    check_curriculum(cfg(), "distill")  # sequential passes: served by the cached full shuffle
    check_curriculum(cfg("curriculum.mix_groups=true", "data.shuffle=block_local"), "distill")


def test_group_teacher_config():
    cfg = load_config(None, ["curriculum.name=ed", "distill.method=ed", "curriculum.teacher_model=resnet20",
                             "curriculum.teacher_epochs=5", "kcd.enabled=true", "curriculum.alpha=0.5"])
    t = group_teacher_config(cfg, 2)
    assert (t.model, t.optim.epochs, t.kcd.enabled, t.curriculum.only_groups, t.curriculum.labels) == (
        "resnet20", 5, False, [2], "local")
    check_curriculum(t, "teacher")
    other = load_config(None, ["curriculum.name=ed", "distill.method=ed", "curriculum.teacher_model=resnet20",
                               "curriculum.teacher_epochs=5", "curriculum.alpha=0.3"])
    assert group_teacher_config(other, 2).run.name == t.run.name != group_teacher_config(cfg, 1).run.name
    with pytest.raises(ConfigError, match="curriculum.teacher_model"):
        group_teacher_config(load_config(None, ["curriculum.name=ed"]), 1)


def test_new_modules_import_no_ray():
    code = ("import sys; import kcd_ray.engine.curriculum, kcd_ray.models.growing, kcd_ray.distill.multi_teacher, "
            "kcd_ray.data.groups; bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------- the engine, in process


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A synthetic set (8x8, 6 classes: groups of 2), its tensors in memory, random group/full teachers."""
    root = tmp_path_factory.mktemp("ed")
    teachers = []
    for g in range(3):
        torch.manual_seed(10 + g)
        teachers.append(str(save_model(root / f"group{g + 1}.pt", build_model("resnet8", 2))))
    return tiny_set(root, num_test=48, num_classes=6, teacher=False, kcd={"enabled": False},
                    optim={"epochs": 6, "scheduler": "multistep", "milestones": [3, 5]}, distill={"method": "ed"},
                    curriculum={"name": "ed", "groups": 3, "grade_epochs": [2, 2, 2], "mix_groups": True,
                                "teachers": teachers})


_batches = batches


def _engine(tiny, folder, hooks_extra=(), **over):
    flat = [f"{k}={json.dumps(v)}" for k, v in over.items()]
    cfg = load_config(base=copy.deepcopy(tiny["base"]), overrides=flat)
    engine = assemble_engine(cfg, torch.device("cpu"), data_dir=tiny["data_dir"], run_dir=folder,
                             hooks=list(hooks_extra))
    engine.test_batches = lambda: _batches(tiny["split"]["test"], 16, 0)  # the Ray worker does the same
    return engine


def _run(tiny, engine):
    services = engine.services
    return engine.run(lambda e: _batches(tiny["split"]["train"], 16, e, keep=services.mask[0]), engine.test_batches)


class Watch(Hook):
    """Snapshots of parameters/buffers by grade, and the optimiser state seen right after a grade change."""

    def __init__(self):
        self.snap, self.state_at_change = {}, {}

    def before_epoch(self, engine, epoch):
        g = engine.hook("ed").grade
        if epoch in (2, 4):
            self.state_at_change[epoch] = len(engine.optimizer.state)
        if epoch == 0 or epoch in (1, 2):
            self.snap[epoch] = {k: v.clone() for k, v in engine.distiller.state_dict().items()}
        assert engine.distiller.student.grade == g


def test_grades_rows_frozen_stages_and_final_model(tiny, tmp_path):
    watch = Watch()
    engine = _engine(tiny, tmp_path / "run", hooks_extra=[watch])
    summary = _run(tiny, engine)
    rows = engine.history
    assert [r["grade"] for r in rows] == [1, 1, 2, 2, 3, 3]
    assert [r["active_classes"] for r in rows] == [2, 2, 4, 4, 6, 6]
    n = {g: int(np.isin(tiny["split"]["train"][1].numpy(), range(2 * g)).sum()) for g in (1, 2, 3)}
    assert [r["samples_seen"] for r in rows] == [n[1], n[1], n[2], n[2], n[3], n[3]]  # the grade's union only
    assert summary["sample_passes"] == 2 * (n[1] + n[2] + n[3])
    assert (all(r["seen_class_top1"] is not None for r in rows)
            and rows[-1]["seen_class_top1"] == pytest.approx(rows[-1]["top1"]))
    assert rows[0]["group_top1_2"] is None and rows[-1]["group_top1_3"] is not None
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.05, 0.05, 0.005, 0.005, 0.0005])  # global schedule
    assert watch.state_at_change == {2: 0, 4: 0}  # momentum reset at each grade change
    # inactive stages (and the native head, and later TR heads) are untouched through grade 1; grade 2's join
    before, after_g1 = watch.snap[0], watch.snap[2]
    moved = {k for k in before if not torch.equal(before[k], after_g1[k])}
    assert moved and all(k.startswith(("student.conv1", "student.bn1", "student.layer1", "tr_heads.0")) for k in moved)
    assert any(k.startswith("student.layer1") for k in moved) and any(k.startswith("tr_heads.0") for k in moved)
    final = engine.distiller.state_dict()
    assert not torch.equal(after_g1["student.layer2.0.conv1.weight"], final["student.layer2.0.conv1.weight"])
    assert torch.equal(after_g1["tr_heads.0.fc.weight"], final["tr_heads.0.fc.weight"])  # discarded head: frozen
    model = load_model(tmp_path / "run" / "final_model.pt")
    assert model.arch == "resnet8" and list(model.state_dict()) == list(build_model("resnet8", 6).state_dict())
    assert summary["curriculum"]["seen_class_top1_at_grade_end"][2] == pytest.approx(rows[-1]["seen_class_top1"])
    assert not (tmp_path / "run" / "best_model.pt").exists() or torch.load(
        tmp_path / "run" / "best_model.pt", weights_only=False)["epoch"] >= 4  # best only from the complete model


@pytest.mark.parametrize("stop", [2, 1], ids=["in-grade-2", "at-the-grade-change"])
def test_resume_in_grade_2_equals_the_uninterrupted_run(tiny, tmp_path, stop):
    """Interrupted after epoch 2 (inside grade 2: epochs 2, 3) or 1 (the resume starts grade 2) and resumed from
    the engine checkpoint: the same final weights, heads included, as the uninterrupted run."""
    over = {"curriculum.lr_mode": "per_grade"}
    ref = _engine(tiny, tmp_path / "ref", **over)
    ref_summary = _run(tiny, ref)

    class Stop(Hook):
        def after_checkpoint(self, engine, epoch, row):
            if epoch == stop:
                raise KeyboardInterrupt

    cut = _engine(tiny, tmp_path / "cut", hooks_extra=[Stop()], **over)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, cut)
    again = _engine(tiny, tmp_path / "cut", **over)
    again.restore(again.services.latest_checkpoint())
    assert again.start_epoch == stop + 1 and again.hook("ed").grade == (2 if stop == 2 else 1)
    summary = _run(tiny, again)
    a, b = ref.distiller.state_dict(), again.distiller.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    assert summary["final_top1"] == ref_summary["final_top1"]
    # per grade: a restart at optim.lr, then all three decays at floor(f * 2) = 1 of a 2-epoch grade
    assert [r["lr"] for r in again.history] == pytest.approx([0.05, 5e-5] * 3)


def test_ed_with_kcd_condenses_within_the_active_groups(tiny, tmp_path):
    """KCD's M-step ranges over the valued samples of the active groups; a group that just joined is kept whole
    until it has values; what trains is the intersection (the engine publishes it, the feed follows it)."""
    engine = _engine(tiny, tmp_path / "kcd", **{"kcd.enabled": True, "kcd.interval": 1, "kcd.stages": 2,
                                                "kcd.rho": 0.5, "kcd.summary": False})
    summary = _run(tiny, engine)
    labels = tiny["split"]["train"][1].numpy()
    published = [np.asarray(m[1]) for m in engine.services.masks]
    assert len(published) == 6  # a new set every epoch here
    group = {h: set(np.flatnonzero(np.isin(labels, [2 * h - 2, 2 * h - 1])).tolist()) for h in (1, 2, 3)}
    for e, (ids, row) in enumerate(zip(published, engine.history)):
        assert set(labels[ids].tolist()) <= set(range(2 * row["grade"])), e  # inside the grade's groups
        assert row["samples_seen"] == len(ids)
    assert set(published[0].tolist()) == group[1]
    # grade 1: docs/methods/kcd.md §4's step within group 1's 32 samples
    assert len(published[1]) == 32 - int(32 * 0.5 / 2)
    assert group[2] <= set(published[2].tolist()) and group[3] <= set(published[4].tolist())  # joins whole
    assert summary["sample_passes"] == sum(len(ids) for ids in published)


def _ddp_worker(rank, world, folder):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    cur = load_config(None, ["curriculum.name=ed"]).curriculum
    groups = ClassGroups.from_config(cur, 6)
    torch.manual_seed(0)  # identical models on both ranks
    teachers = [build_model("resnet8", n).eval() for n in groups.sizes]
    d = build_distiller(load_config(None, ["distill.method=ed"]).distill, build_model("resnet8", 6), teachers, 6,
                        groups=groups, curriculum=cur, image_size=8)
    ddp = DistributedDataParallel(d, find_unused_parameters=d.find_unused_parameters)
    opt = torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=5e-4,
                          fused=True)
    before = {k: v.clone() for k, v in d.state_dict().items()}
    gen = torch.Generator().manual_seed(rank)
    for _step in range(3):
        d.set_grade(1)
        x = torch.randn(8, 3, 8, 8, generator=gen)
        y = torch.randint(0, 2, (8,), generator=gen)
        loss = sum(ddp({"image": x, "label": y, "sample_id": torch.arange(8)}, T=4.0, epoch=0).losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = d.state_dict()
    moved = sorted({".".join(k.split(".")[:2]) for k in before if not torch.equal(before[k], after[k])})
    unused = [n for n, p in d.named_parameters() if p.grad is not None and not n.startswith(("student.conv1",
              "student.bn1", "student.layer1", "tr_heads.0"))]
    torch.save({"moved": moved, "unused_with_grad": unused, "fc": after["student.fc.weight"]}, f"{folder}/r{rank}.pt")
    dist.barrier()  # both ranks done, and the reducer released before its group (see test_distill_zoo's DDP script)
    del ddp
    dist.destroy_process_group()


def test_ddp_leaves_the_inactive_stages_untouched(tmp_path):
    """DDP with find_unused_parameters (the ed distiller asks for it): globally unused parameters keep no gradient,
    so the fused SGD (momentum, weight decay) never touches the inactive stages, the native head or later TR heads."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt") for r in (0, 1))
    assert r0["moved"] == r1["moved"] == ["student.bn1", "student.conv1", "student.layer1", "tr_heads.0"]
    assert r0["unused_with_grad"] == [] and torch.equal(r0["fc"], r1["fc"])


# --------------------------------------------------------------------------- Ray Train (slow)


def _ray_cfg(tmp_path, **over):
    base = {"model": "resnet8",
            # 8x8: grades, world size and group teachers are under test, not accuracy (a quarter of 16x16's compute)
            "data": {"name": "digits", "image_size": 8, "root": str(tmp_path.parent / "kcd_data")},
            "optim": {"epochs": 2, "batch_size": 64, "lr": 0.05, "scheduler": "cosine", "threads": 1},
            "scaling": {"num_workers": 0, "cpus_per_worker": 0.5, "data_cpus": 0.25},
            "run": {"storage_path": str(tmp_path / "runs"), "verbose": 0}, "kcd": {"enabled": False},
            "distill": {"method": "ed"},
            "curriculum": {"name": "ed", "groups": 2, "grade_epochs": [1, 1], "mix_groups": True,
                           "teacher_model": "resnet8", "teacher_epochs": 1}}
    return load_config(base=base, overrides=[f"{k}={json.dumps(v)}" for k, v in over.items()])


@pytest.mark.ray
# ~25 s of 2-worker Ray Train; the grade change under DDP: test_ddp_leaves_the_inactive_stages_untouched
@pytest.mark.slow
def test_two_ray_train_workers_pass_a_grade_change(ray_session, tmp_path):
    from kcd_ray.ray_layer.trainer import fit

    paths = []
    for g in range(2):
        torch.manual_seed(g)
        paths.append(str(save_model(tmp_path / f"t{g}.pt", build_model("resnet8", 5))))
    # ED's sequential passes over D_1..D_g (mix_groups=false) across 2 workers' shards
    cfg = _ray_cfg(tmp_path, **{"scaling.num_workers": 2, "run.name": "ed2w", "curriculum.teachers": paths,
                                "curriculum.mix_groups": False})
    summary = fit(cfg, kind="distill")
    run_dir = Path(summary["run_dir"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["grade"] for r in rows] == [1, 2] and [r["world_size"] for r in rows] == [2, 2]
    assert rows[0]["samples_seen"] < rows[1]["samples_seen"] <= summary["num_train"] + 1  # + 1: padded to 2 shards
    assert rows[0]["seen_class_top1"] is not None and rows[1]["group_top1_2"] is not None
    assert load_model(run_dir / "final_model.pt").num_classes == 10


@pytest.mark.ray
# ~22 s; the default run trains the missing group teachers (local labels) and then the student in
# tests/test_object_storage.py::test_ed_trains_its_group_teachers_into_the_store_and_the_student_loads_them_from_it
@pytest.mark.slow
def test_distill_trains_the_missing_group_teachers_then_the_student(ray_session, tmp_path):
    from kcd_ray.ray_layer.trainer import fit

    cfg = _ray_cfg(tmp_path, **{"run.name": "ed-student"})
    summary = fit(cfg, kind="distill")
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    teachers = [p for p in runs if p.startswith("edteacher-resnet8-digits-g")]
    assert len(teachers) == 2 and "ed-student" in runs
    evaluated = []
    for name in teachers:
        assert load_model(tmp_path / "runs" / name / "final_model.pt").num_classes == 5  # local labels: n_g outputs
        rows = [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert rows[0]["active_classes"] == 5 and rows[0]["samples_seen"] < summary["num_train"]
        evaluated.append(rows[0]["test_samples"])  # its own group's test samples
    assert sum(evaluated) == 450 and min(evaluated) > 0  # digits' test split, split between the two groups
    # 2 CPUs hold both in-process teacher runs (0.75 CPU each): they trained at once (each started before the
    # other had its final model), as concurrent Ray tasks
    import datetime as dt

    started = [dt.datetime.strptime(json.loads((tmp_path / "runs" / t / "history.jsonl").read_text().splitlines()[0])
                                    ["time"], "%Y-%m-%dT%H:%M:%S%z").timestamp() for t in teachers]
    done = [(tmp_path / "runs" / t / "final_model.pt").stat().st_mtime for t in teachers]
    assert started[0] + 1 < done[1] and started[1] + 1 < done[0]  # history times are whole seconds
    stored = load_config(Path(summary["run_dir"]) / "config.yaml")
    assert len(stored.curriculum.teachers) == 2 and summary["curriculum"]["group_sizes"] == [5, 5]
    again = fit(cfg, kind="distill")  # reuses the teachers, resumes the finished run: nothing new trains
    assert (sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs
            and again["final_top1"] == summary["final_top1"])
