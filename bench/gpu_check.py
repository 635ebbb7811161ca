"""GPU check: the engine's step on CUDA, with and without AMP, under ``torch.cuda.set_sync_debug_mode("error")``.

Run on a machine with a GPU (under 5 minutes); without one it prints why and exits 0:

    .venv/bin/python bench/gpu_check.py [--steps 200] [--batch-size 256]

It checks that a training step (forward through the distiller, backward, the fused optimiser's on-device
non-finite skip, the per-step loss/skip accumulation and KCD's online value recording) makes no host
synchronisation: any ``.item()``/``float(tensor)``/``bool(tensor)`` inside the step raises under the debug
mode. It then reports the engine's img/s against a plain PyTorch KD loop with the data resident on the GPU
(same student, teacher, batch), fp32 and AMP. Last, the teacher-output cache: it builds a small exact
cache with the Ray Data actor pass on the GPU, checks a sample of it against the teacher, and reports the KD
step's img/s with the cached logits against the teacher in the loop (the ratio ``bench/teacher_cache.py
throughput`` measures on CPU). Then KD and KD+KCD through ``fit()`` on one Ray Train GPU worker (NCCL process
group, AMP, the Ray Data pipeline) with KCD's offline E-step on a GPU actor, against the plain loop; KD also with
channels-last, with the augmentation (or only its crop/flip) in Ray Data instead of on the GPU (``data.augment_on``
pipeline / split), and on every GPU
when there are several. Before that, the input stage on the GPU against the CPU path.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _engine(work: Path, amp: bool, batch_size: int):
    from kcd_ray.config import load_config
    from kcd_ray.data import prepare_dataset
    from kcd_ray.engine import assemble_engine
    from kcd_ray.models import build_model, save_model

    save_model(work / "teacher.pt", build_model("resnet32x4", 100))
    cfg = load_config(base={
        "model": "resnet8x4", "data": {"name": "synthetic", "root": str(work / "data"),
                                       "synthetic": {"num_train": 512, "num_test": 64, "num_classes": 100}},
        "optim": {"epochs": 2, "batch_size": batch_size, "amp": amp}, "run": {"verbose": 0},
        "distill": {"teacher": str(work / "teacher.pt")}, "kcd": {"interval": 1, "stages": 1, "rho": 0.5}})
    data_dir = prepare_dataset(cfg.data, verbose=False)
    return assemble_engine(cfg, torch.device("cuda"), data_dir=str(data_dir), run_dir=work / "run")


def engine_rate(work: Path, amp: bool, steps: int, batch_size: int) -> float:
    engine = _engine(work, amp, batch_size)
    g = torch.Generator().manual_seed(0)
    host = {"image": torch.randn(batch_size, 3, 32, 32, generator=g),
            "label": torch.randint(0, 100, (batch_size,), generator=g), "sample_id": torch.arange(batch_size)}
    kcd = engine.hook("kcd")
    kcd.before_epoch(engine, 0)
    engine.distiller.train()

    def one():
        batch = engine.to_device(host)
        out, _loss, _finite = engine.step(batch, 4.0, 0)
        kcd.after_step(engine, batch, out)

    for _ in range(10):
        one()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host read inside the step raises from here on
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - t0)


def plain_rate(amp: bool, steps: int, batch_size: int) -> float:
    from kcd_ray.models import build_model

    dev = torch.device("cuda")
    s, t = build_model("resnet8x4", 100).to(dev), build_model("resnet32x4", 100).to(dev).eval()
    opt = torch.optim.SGD(s.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(batch_size, 3, 32, 32, device=dev), torch.randint(0, 100, (batch_size,), device=dev)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else torch.autocast("cuda", enabled=False)

    def one():
        with ctx:
            with torch.no_grad():
                zt = t(x)
            zs = s(x)
            kl = torch.nn.functional.kl_div((zs / 4).log_softmax(1), (zt / 4).softmax(1), reduction="batchmean") * 16
            loss = 0.1 * torch.nn.functional.cross_entropy(zs, y) + 0.9 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(10):
        one()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - t0)


def cache_check(work: Path, steps: int, batch_size: int) -> None:
    import dataclasses

    import ray

    from kcd_ray.cache.store import TeacherLookup
    from kcd_ray.config import load_config
    from kcd_ray.data import prepare_dataset
    from kcd_ray.models import load_model
    from kcd_ray.models import build_model, save_model
    from kcd_ray.engine import assemble_engine
    from kcd_ray.engine.plan import local_plan
    from kcd_ray.ray_layer import compat
    from kcd_ray.ray_layer.teacher_cache import ensure_teacher_cache

    if not (work / "teacher.pt").exists():
        save_model(work / "teacher.pt", build_model("resnet32x4", 100))
    cfg = load_config(base={
        "model": "resnet8x4", "data": {"name": "synthetic", "root": str(work / "data"),
                                       "synthetic": {"num_train": 512, "num_test": 64, "num_classes": 100}},
        "optim": {"epochs": 2, "batch_size": batch_size}, "run": {"verbose": 0}, "kcd": {"enabled": False},
        "distill": {"teacher": str(work / "teacher.pt"), "cache": "exact"}, "scaling": {"use_gpu": "true"}})
    data_dir = prepare_dataset(cfg.data, verbose=False)
    compat.start_local_ray()  # as kcd_ray's own local Ray (trainer.init_ray)
    t0 = time.perf_counter()
    spec = ensure_teacher_cache(local_plan(cfg, "distill", data_dir), verbose=False)
    built = time.perf_counter() - t0
    ray.shutdown()
    z = TeacherLookup(spec, 100).columns(list(range(8)), 0, plain=False)["t_logits"]
    print(f"teacher cache: built 2 units x 512 rows on the GPU in {built:.1f}s; {spec.dir}; sample logits finite: "
          f"{bool(torch.isfinite(torch.from_numpy(z).float()).all())}")
    live = _engine(work, False, batch_size)
    teacher = load_model(work / "teacher.pt").cuda().eval()
    cached_cfg = dataclasses.replace(live.cfg, kcd=dataclasses.replace(live.cfg.kcd, enabled=False))
    cached = assemble_engine(cached_cfg, torch.device("cuda"), data_dir=live.ctx.data_dir, run_dir=work / "cached",
                             teacher_cache=spec)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, 32, 32, generator=g)
    host = {"image": x, "label": torch.randint(0, 100, (batch_size,), generator=g),
            "sample_id": torch.arange(batch_size)}
    with torch.no_grad():
        host_cached = {**host, "t_logits": teacher(x.cuda()).half().cpu()}
    rates = {}
    for name, eng, b in (("teacher in the loop", live, host), ("cached logits", cached, host_cached)):
        eng.distiller.train()
        for _ in range(5):
            eng.step(eng.to_device(b), 4.0, 0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step(eng.to_device(b), 4.0, 0)
        torch.cuda.synchronize()
        rates[name] = steps * batch_size / (time.perf_counter() - t0)
    print(f"KD step with the teacher-output cache: {rates['cached logits']:.0f} img/s vs teacher in the loop "
          f"{rates['teacher in the loop']:.0f} img/s, "
          f"ratio {rates['cached logits'] / rates['teacher in the loop']:.3f}")


def input_check(batch_size: int, steps: int) -> None:
    """Issue 16: the worker's finishing stage on the GPU (uint8 batch -> crop/flip or random-resized crop ->
    normalised float) equals the CPU numpy path for the same draws, and its img/s on the device."""
    import numpy as np

    from kcd_ray.data import transforms as T
    from kcd_ray.data.device_augment import device_stage

    meta = {"image_shape": [32, 32, 3], "encoding": "raw", "mean": [0.5, 0.48, 0.44], "std": [0.27, 0.26, 0.28]}
    x = np.random.default_rng(0).integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)
    for kind in ("cifar", "imagenet"):
        u = T.sample_uniforms(np.arange(batch_size), T.n_uniforms(kind), (0, 1))
        cpu = T.train_transform(x, meta, kind, uniforms=u)
        xg, ug = torch.from_numpy(x).cuda(), torch.from_numpy(u).cuda()
        gpu = device_stage(xg, ug, meta, kind)
        diff = float((gpu.cpu() - cpu).abs().max())
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            device_stage(xg, ug, meta, kind, channels_last=True)
        torch.cuda.synchronize()
        rate = steps * batch_size / (time.perf_counter() - t0)
        print(f"input stage on the GPU, {kind}: max |GPU - CPU| = {diff:.2e} ({'ok' if diff < 1e-4 else 'MISMATCH'}), "
              f"{rate:.0f} img/s")


def ray_train_check(work: Path, batch_size: int, samples: int, epochs: int, steps: int) -> None:
    """KD and KD+KCD (offline E-step on a GPU actor) through ``fit()``: one Ray Train worker on the GPU (Train's
    torch backend: NCCL), AMP, the Ray Data pipeline; img/s of the last epoch against the plain loop's."""
    import ray

    from kcd_ray.config import load_config
    from kcd_ray.models import build_model, save_model
    from kcd_ray.ray_layer import compat
    from kcd_ray.ray_layer.trainer import fit

    if not (work / "teacher.pt").exists():
        save_model(work / "teacher.pt", build_model("resnet32x4", 100))
    base = {"model": "resnet8x4", "data": {"name": "synthetic", "root": str(work / "data_fit"),
                                           "synthetic": {"num_train": samples, "num_test": 256, "num_classes": 100}},
            "optim": {"epochs": epochs, "batch_size": batch_size, "amp": True},
            "scaling": {"num_workers": 1, "use_gpu": "true", "cpus_per_worker": 2, "data_cpus": 1},
            "distill": {"teacher": str(work / "teacher.pt")}, "run": {"verbose": 0, "storage_path": str(work / "runs")}}
    if not ray.is_initialized():
        compat.start_local_ray()
    plain = plain_rate(True, steps, batch_size)
    gpus = torch.cuda.device_count()
    kd, kcd_offline = {"enabled": False}, {"enabled": True, "estep": "offline", "value_fn": "kd", "interval": 1,
                                           "stages": 2}
    variants = [("KD", kd, {}), ("KD, channels-last", kd, {"optim.channels_last": True}),
                ("KD, augmentation in Ray Data (float rows)", kd, {"data.augment_on": "pipeline"}),
                ("KD, crop/flip in Ray Data, normalised on the GPU", kd, {"data.augment_on": "split"}),
                ("KD+KCD (offline E-step on a GPU actor)", kcd_offline, {})]
    if gpus > 1:
        variants.append((f"KD, {gpus} GPU workers (NCCL)", kd, {"scaling.num_workers": gpus}))
    for i, (name, kcd, extra) in enumerate(variants):
        cfg = load_config(base={**base, "kcd": kcd, "run": {**base["run"], "name": f"v{i}"}},
                          overrides=[f"{k}={v}" for k, v in extra.items()])
        s = fit(cfg)
        rows = [json.loads(x) for x in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        rate = rows[-1]["images_per_s"]
        print(f"Ray Train, AMP, {name}: {rate:.0f} img/s (last epoch; top1 {s['final_top1']:.2f}), "
              f"plain PyTorch KD loop (AMP, data on the GPU) {plain:.0f} img/s, ratio {rate / plain:.3f}")
    ray.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--fit-samples", type=int, default=8192, help="training rows of the Ray Train runs")
    p.add_argument("--fit-epochs", type=int, default=3)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; skipped (run it on a machine with a GPU)")
        return 0
    print(f"gpu_check on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    work = Path(tempfile.mkdtemp(prefix="kcd_gpu_check_"))
    for amp in (False, True):
        ours = engine_rate(work, amp, args.steps, args.batch_size)
        base = plain_rate(amp, args.steps, args.batch_size)
        print(f"KD+KCD step, amp={amp}: engine {ours:.0f} img/s (no host sync in {args.steps} steps), "
              f"plain PyTorch KD loop {base:.0f} img/s, ratio {ours / base:.3f}")
    input_check(args.batch_size, args.steps)
    cache_check(work, args.steps, args.batch_size)
    ray_train_check(work, args.batch_size, args.fit_samples, args.fit_epochs, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
