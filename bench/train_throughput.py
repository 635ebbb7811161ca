"""Images/s of kcd_ray's training path (Ray Train + Ray Data, 1 worker) against a plain PyTorch loop.

Both sides train the same model at the same batch size on the same CIFAR-shaped data with the same
augmentation code (`kcd_ray.data.transforms`) and the same torch thread count; the baseline feeds a torch
DataLoader from the decoded arrays (``bench/plain_loop.py``'s ``PlainLoop``). Steady-state throughput: the first
epoch of each side is warm-up.

Two ratios. Per round: the kcd_ray run's median against the plain loop's in this process, run before and after it
on the bare host (Ray shut down; the rounds share their plain halves: plain, kcd_ray, plain, kcd_ray, plain), so
a drift of the host's speed that is linear over the round cancels; Ray's resident processes count against
kcd_ray, as they do for a user. ``--paired``: the Train worker also runs one plain-loop epoch right before each of
its epochs (``plain_loop.PlainEpochBeside``), and each kcd_ray epoch is compared with the plain epoch next to it: the
drift cancels, and what is left is the training path's own cost (engine, input path, Ray Train in the worker),
both sides sharing the resident processes.

    .venv/bin/python bench/train_throughput.py                     # resnet8x4, batch 64, 2048 images
    .venv/bin/python bench/train_throughput.py --model resnet20 --epochs 4
    .venv/bin/python bench/train_throughput.py --shuffle block_local   # the former rows-within-1024-blocks shuffle
    .venv/bin/python bench/train_throughput.py --epochs 6 --rounds 2 --paired   # + a plain epoch beside each epoch
    .venv/bin/python bench/train_throughput.py --epochs 4 --rounds 2 --workers 0  # the loop in this process, no Train

Both sides shuffle: the DataLoader fully (shuffle=True), kcd_ray per ``--shuffle`` (default ``auto`` = ``full``, a
uniform permutation of the whole set per epoch, from the split cached in the object store; see
kcd_ray/ray_layer/pipeline.py).
``--path fit`` (default) measures the real training path (``kcd_ray.ray_layer.trainer.fit``: metrics, checkpoints,
a MaskStore serving the epoch); ``--path pipeline`` a minimal Ray Train loop over ``kcd_ray.ray_layer.pipeline``
(same data path, no kcd_ray loop), for when the training loop is being reworked.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kcd_ray.config import load_config  # noqa: E402
from kcd_ray.data import load_meta, prepare_dataset  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
import plain_loop  # noqa: E402
from plain_loop import PlainEpochBeside, PlainLoop  # noqa: E402


def plain_half(loop: PlainLoop, epochs: int) -> list[float]:
    """One plain half of a round on the bare host (no Ray running): img/s of ``epochs`` epochs, the first dropped
    as warm-up (as on the kcd_ray side)."""
    import ray

    ray.shutdown()  # the previous round's local Ray: a user's plain loop runs without one
    rates = [loop.epoch() for _ in range(epochs)]
    print(f"plain PyTorch (DataLoader, shuffle=True) img/s per epoch: {[round(x) for x in rates]}", flush=True)
    return rates[1:]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def kcd_ray_path(cfg, epochs: int, paired: bool) -> tuple[list[float], list[float]]:
    """kcd_ray's img/s per epoch, and (``paired``) the plain loop's, run in the Train worker right before each."""
    import ray.cloudpickle

    from kcd_ray.ray_layer.trainer import fit

    ray.cloudpickle.register_pickle_by_value(plain_loop)  # the Train worker gets the hook class by value
    summary = fit(cfg, kind="teacher", hooks=[PlainEpochBeside] if paired else None)
    rows = read_jsonl(Path(summary["run_dir"]) / "metrics.jsonl")
    assert len(rows) == epochs
    print("kcd_ray data wait s per epoch:", [round(r["data_wait_seconds"], 2) for r in rows],
          "train s:", [round(r["train_seconds"], 2) for r in rows])
    plain = [r["images_per_s"] for r in read_jsonl(Path(summary["run_dir"]) / "plain_epochs.jsonl")] if paired else []
    return [r["images_per_s"] for r in rows], plain


def pipeline_path(cfg, data_dir: Path, epochs: int) -> list[float]:
    """Ray Train (1 worker) + kcd_ray's train dataset + a bare SGD loop; epochs set through a MaskStore."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from kcd_ray.ray_layer.mask_store import get_mask_store
    from kcd_ray.ray_layer.pipeline import train_dataset, train_ingest_options

    if not ray.is_initialized():
        from kcd_ray.ray_layer import compat

        compat.start_local_ray(cfg.run.num_cpus or None)  # as kcd_ray's own local Ray (trainer.init_ray)
    ray.data.DataContext.get_current().enable_progress_bars = False
    store = f"bench_{os.getpid()}"
    get_mask_store(store, create=True)
    ds = train_dataset(str(data_dir), augment=cfg.data.augment, seed=cfg.optim.seed, mask_store_name=store,
                       data_cpus=cfg.scaling.data_cpus, shuffle=cfg.data.shuffle)

    def loop(config):
        import time as _t

        import ray.train as rt
        import torch as _torch

        from kcd_ray.models import build_model as _build
        from kcd_ray.ray_layer.mask_store import set_epoch
        from kcd_ray.ray_layer.pipeline import iter_train_batches

        _torch.set_num_threads(config["threads"])
        model = _build(config["model"], config["num_classes"])
        opt = _torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        shard = rt.get_dataset_shard("train")
        out = []
        for e in range(config["epochs"]):
            set_epoch(config["store"], e)
            model.train()
            t0, n = _t.perf_counter(), 0
            for b in iter_train_batches(shard, config["batch"], epoch=e, seed=0):
                loss = _torch.nn.functional.cross_entropy(model(b["image"]), b["label"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                n += len(b["label"])
            out.append(n / (_t.perf_counter() - t0))
        return out

    meta = load_meta(data_dir)
    trainer = TorchTrainer(
        loop, train_loop_config={"threads": cfg.optim.threads, "model": cfg.model,
                                 "num_classes": int(meta["num_classes"]),
                                 "epochs": epochs, "batch": cfg.optim.batch_size, "store": store},
        scaling_config=ray.train.ScalingConfig(num_workers=1,
                                               resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=ray.train.RunConfig(name="bench_pipeline", storage_path=str(Path(cfg.run.storage_path).resolve())),
        datasets={"train": ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=train_ingest_options()))
    return list(trainer.fit().return_value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet8x4")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-train", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--shuffle", default="auto", help="data.shuffle of the kcd_ray side (auto = full)")
    ap.add_argument("--augment-on", default="auto", choices=("auto", "worker", "split", "pipeline"),
                    help="data.augment_on of the kcd_ray side (where the crop/flip/normalisation runs)")
    ap.add_argument("--path", choices=("fit", "pipeline"), default="fit",
                    help="fit: kcd_ray's training entry point; pipeline: a minimal Ray Train loop over the pipeline")
    ap.add_argument("--workers", type=int, default=1, choices=(0, 1),
                    help="scaling.num_workers of the kcd_ray side: 1 = one Ray Train worker (default), 0 = the loop "
                         "in this process over the same Ray Data pipeline (no Ray Train actors)")
    ap.add_argument("--skip-plain", action="store_true",
                    help="only the kcd_ray side (reuse a plain rate measured before)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate plain and kcd_ray this many times (the host's speed drifts; each round's ratio "
                         "compares neighbours)")
    ap.add_argument("--paired", action="store_true",
                    help="also run one plain-loop epoch in the Train worker right before each kcd_ray epoch (drill "
                         "hook plain_epoch) and print the median of those adjacent pairs: the host's drift cancels, "
                         "and both sides share the worker's process and Ray's resident processes")
    args = ap.parse_args()
    if args.paired and args.path != "fit":
        ap.error("--paired needs --path fit (the hook runs inside kcd_ray's training loop)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kcd_bench_"))

    def config(r: int):
        # A fresh run name every round: re-using one would resume the finished run and report its old metrics.
        return load_config(base={
            "model": args.model,
            "data": {"name": "synthetic", "root": str(work / "data"), "shuffle": args.shuffle,
                     "augment_on": args.augment_on,
                     "synthetic": {"num_train": args.num_train, "num_test": 256, "num_classes": 100, "image_size": 32}},
            "optim": {"epochs": args.epochs, "batch_size": args.batch_size, "threads": args.threads,
                      "scheduler": "constant"},
            "scaling": {"num_workers": args.workers, "cpus_per_worker": 1.0, "data_cpus": 0.25},
            "run": {"storage_path": str(work / "runs"), "name": f"bench-{os.getpid()}-{r}", "verbose": 0,
                    "num_cpus": os.cpu_count() or 2},
        })

    data_dir = prepare_dataset(config(0).data, verbose=False)
    print(f"model {args.model}, batch {args.batch_size}, {args.num_train} CIFAR-shaped images, "
          f"{args.threads} torch threads")
    ratios, paired = [], []
    torch.set_num_threads(args.threads)
    loop = None if args.skip_plain else PlainLoop(data_dir, args.model, args.batch_size)
    before = None if loop is None else plain_half(loop, args.epochs)
    for r in range(args.rounds):
        cfg = config(r)
        if args.path == "fit":
            ours, beside = kcd_ray_path(cfg, args.epochs, args.paired)
        else:
            ours, beside = pipeline_path(cfg, data_dir, args.epochs), []
        o = statistics.median(ours[1:])
        print(f"kcd_ray (Ray Train + Ray Data, path {args.path}, shuffle {args.shuffle}, augment_on {args.augment_on}) "
              f"img/s per epoch: {[round(x) for x in ours]}")
        if beside:
            pairs = [k / p for k, p in zip(ours[1:], beside[1:])]
            paired += pairs
            print(f"plain loop in the Train worker, right before each epoch: {[round(x) for x in beside]}; "
                  f"paired ratios {[round(x, 3) for x in pairs]}, median {statistics.median(pairs):.3f}", flush=True)
        if loop is None:
            print(f"steady state: kcd_ray {o:.0f} img/s")
            continue
        after = plain_half(loop, args.epochs)
        b = statistics.median(before + after)
        before = after
        ratios.append(o / b)
        print(f"round {r}: steady state: plain {b:.0f} img/s (before and after), kcd_ray {o:.0f} img/s, "
              f"ratio {o / b:.3f} (target >= 0.95)", flush=True)
    if len(ratios) > 1:
        print(f"ratio per round {[round(x, 3) for x in ratios]}, median {statistics.median(ratios):.3f} "
              "(target >= 0.95)")
    if len(paired) > 1:
        m = statistics.mean(paired)
        se = statistics.stdev(paired) / len(paired) ** 0.5
        print(f"paired (in-worker plain epoch next to each kcd_ray epoch), {len(paired)} pairs: median "
              f"{statistics.median(paired):.3f}, mean {m:.3f} +- {se:.3f} (standard error)")


if __name__ == "__main__":
    main()
