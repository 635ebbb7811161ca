"""The data ceiling: images/s of the training input path with no model at all.

kcd_ray's Ray Data pipeline, consumed by one Ray Train worker exactly as a training run consumes it (a
MaskStore serving the epoch, ``iter_train_batches``), against a torch ``DataLoader`` running the same
augmentation (``kcd_ray.data.transforms.train_transform`` with the same per-sample draws) in the measuring
process and with one worker process, all in one run on the same data:

    .venv/bin/python bench/data_ceiling.py                                  # CIFAR-shaped 8,192 rows + 224 px JPEGs
    .venv/bin/python bench/data_ceiling.py --data cifar --data-cpus 0.25 0.5 1.0   # scaling with scaling.data_cpus

Arms: ``loader0`` / ``loader1`` (DataLoader, 0 / 1 worker processes), ``pipeline`` (augmentation in Ray Data's
tasks, float32 rows: ``data.augment_on=pipeline``), ``worker`` (uint8 rows + draws, crop/flip/normalise on the
Train worker: ``data.augment_on=worker``), ``split`` (cifar's crop/flip in Ray Data's tasks on uint8 rows, the
worker normalises: ``data.augment_on=split``, the CPU default; with ``--modes``). Each arm runs ``--epochs`` epochs;
the figure is the median img/s of the epochs after the first (warm-up), and the ratio is against ``loader0`` of the
same data. ``paired``: the Train worker also runs one ``loader0`` epoch right before each of its pipeline epochs, in
its own process, and the median of those per-epoch ratios is printed too (this host's speed drifts by tens of
percent within a minute, so the adjacent pair is the steadier comparison). ``KCD_RAY_DATA_PATCHES=0`` in the
environment measures without kcd_ray's Ray Data patches (``kcd_ray.ray_layer.compat.quick_data_executions``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kcd_ray.data import transforms as T  # noqa: E402
from kcd_ray.data.parquet_io import iter_split  # noqa: E402

SEED = 0


def make_cifar(root: Path, rows: int) -> Path:
    from kcd_ray.config import load_config
    from kcd_ray.data import prepare_dataset

    cfg = load_config(None, [f"data.root={root}", "data.name=synthetic", f"data.synthetic.num_train={rows}",
                             "data.synthetic.num_test=64", "data.image_size=32"])
    return Path(prepare_dataset(cfg.data))


def make_encoded(root: Path, rows: int) -> Path:
    """An image folder of JPEGs of a few sizes around 256 px (ImageNet-like), prepared as encoded data at 224."""
    from torchvision.io import encode_jpeg

    from kcd_ray.config import load_config
    from kcd_ray.data import prepare_dataset

    rng = np.random.default_rng(0)
    src = root / "jpegs"
    sizes = [(256, 320), (300, 256), (256, 256), (375, 500)]
    for split, n in (("train", rows), ("val", 16)):
        for i in range(n):
            d = src / split / f"c{i % 4}"
            d.mkdir(parents=True, exist_ok=True)
            h, w = sizes[i % len(sizes)]
            base = rng.integers(0, 256, (3, h // 8, w // 8), dtype=np.uint8)
            img = torch.from_numpy(base).repeat_interleave(8, 1).repeat_interleave(8, 2)
            (d / f"{i}.jpg").write_bytes(encode_jpeg(img, quality=90).numpy().tobytes())
    cfg = load_config(None, [f"data.root={root}", "data.name=folder", f"data.source={src}", "data.image_size=224"])
    return Path(prepare_dataset(cfg.data))


def load_rows(data_dir: Path):
    """(meta, ids, labels, images): raw data decoded to uint8 NHWC, encoded data as its file bytes."""
    meta = T.read_meta(data_dir)
    ids, labels, images = [], [], []
    for batch in iter_split(data_dir, "train"):
        d = batch.to_pydict() if hasattr(batch, "to_pydict") else batch
        ids += list(d["sample_id"])
        labels += list(d["label"])
        images += list(d["image"])
    if meta.get("encoding") != "encoded":
        images = T.decode_images(images, meta)
    return meta, np.asarray(ids, np.int64), np.asarray(labels, np.int64), images


def loader_epochs(data_dir: Path, batch: int, workers: int, threads: int):
    """A function epoch -> img/s of one epoch of the in-process (``workers=0``) or one-worker DataLoader."""
    torch.set_num_threads(threads)
    meta, ids, labels, images = load_rows(data_dir)
    kind = T.resolve_augment("auto", meta)
    k = T.n_uniforms(kind)
    encoded = meta.get("encoding") == "encoded"

    class Collate:
        epoch = 0

        def __call__(self, idx):
            idx = np.asarray(idx)
            x = [images[i] for i in idx] if encoded else images[idx]
            u = T.sample_uniforms(ids[idx], k, (SEED, self.epoch))
            return T.train_transform(x, meta, kind, uniforms=u), torch.from_numpy(labels[idx])

    collate = Collate()
    sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(range(len(ids))), batch, False)

    def epoch(e: int) -> float:
        collate.epoch = e
        loader = torch.utils.data.DataLoader(range(len(ids)), batch_sampler=sampler, collate_fn=collate,
                                             num_workers=workers, persistent_workers=False)
        t0, n = time.perf_counter(), 0
        for _x, y in loader:
            n += len(y)
        return n / (time.perf_counter() - t0)

    return epoch


def loader_arm(data_dir: Path, batch: int, epochs: int, workers: int, threads: int) -> list[float]:
    epoch = loader_epochs(data_dir, batch, workers, threads)
    return [epoch(e) for e in range(epochs)]


def _consume(config: dict) -> list[float]:
    """The Train worker: iterate the shard as a run does (MaskStore epoch, iter_train_batches, finishing stage)."""
    import ray.train

    from kcd_ray.data.device_augment import BatchFinisher
    from kcd_ray.ray_layer.mask_store import set_epoch
    from kcd_ray.ray_layer.pipeline import iter_train_batches

    torch.set_num_threads(config["threads"])
    meta = T.read_meta(config["data_dir"])
    stage = config["augment_on"]
    finish = None if stage == "pipeline" else BatchFinisher(meta, T.resolve_augment("auto", meta), stage=stage)
    shard = ray.train.get_dataset_shard("train")
    # Paired: an in-process DataLoader epoch right before each pipeline epoch, in this same process, so each ratio
    # compares the two under the same load (this host's speed drifts by tens of percent within a minute).
    loader = loader_epochs(Path(config["data_dir"]), config["batch"], 0, config["threads"])
    out, paired = [], []
    for e in range(config["epochs"]):
        paired.append(loader(e))
        set_epoch(config["store"], e)
        t0, n = time.perf_counter(), 0
        for b in iter_train_batches(shard, config["batch"], epoch=e, seed=SEED, finish=finish):
            assert b["image"].dtype == torch.float32
            n += len(b["label"])
        out.append(n / (time.perf_counter() - t0))
    return {"img_s": out, "loader0_img_s": paired}


def ray_arm(data_dir: Path, batch: int, epochs: int, augment_on: str, data_cpus: float, threads: int,
            storage: Path) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from kcd_ray.ray_layer.mask_store import get_mask_store
    from kcd_ray.ray_layer.pipeline import train_dataset, train_ingest_options

    store = f"ceiling_{augment_on}_{data_cpus}_{time.monotonic_ns()}"
    get_mask_store(store, create=True)
    ds = train_dataset(str(data_dir), seed=SEED, mask_store_name=store, data_cpus=data_cpus, augment_on=augment_on)
    trainer = TorchTrainer(
        _consume, train_loop_config={"threads": threads, "epochs": epochs, "batch": batch, "store": store,
                                     "augment_on": augment_on, "data_dir": str(data_dir)},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        # as kcd_ray's trainer with one worker: no split (no SplitCoordinator hop), the exact order
        datasets={"train": ds}, dataset_config=ray.train.DataConfig(datasets_to_split=[],
                                                                    execution_options=train_ingest_options()),
        run_config=ray.train.RunConfig(name=f"ceiling_{store}", storage_path=str(storage)))
    return dict(trainer.fit().return_value)


def steady(xs: list[float]) -> float:
    return statistics.median(xs[1:] if len(xs) > 1 else xs)


def run(args) -> dict:
    import ray

    from kcd_ray.ray_layer import compat

    compat.start_local_ray(2)  # as kcd_ray's own local Ray (trainer.init_ray)
    ray.data.DataContext.get_current().enable_progress_bars = False
    tmp = Path(tempfile.mkdtemp(prefix="kcd_ceiling_"))
    res = {"bench": "data_ceiling", "batch": args.batch, "epochs": args.epochs}
    for name in args.data:
        data_dir = make_cifar(tmp / name, args.rows) if name == "cifar" else make_encoded(tmp / name, args.jpegs)
        arms = {"loader0": loader_arm(data_dir, args.batch, args.epochs, 0, args.threads),
                "loader1": loader_arm(data_dir, args.batch, args.epochs, 1, args.threads)}
        for cpus in args.data_cpus:
            for mode in args.modes:
                key = mode if len(args.data_cpus) == 1 else f"{mode}@{cpus}"
                arms[key] = ray_arm(data_dir, args.batch, args.epochs, mode, cpus, args.threads, tmp / "runs")
        base = steady(arms["loader0"])
        res[name] = {}
        for k, v in arms.items():
            rates = v["img_s"] if isinstance(v, dict) else v
            row = {"img_s": round(steady(rates), 1), "first_epoch": round(rates[0], 1),
                   "ratio_vs_loader0": round(steady(rates) / base, 3)}
            if isinstance(v, dict):  # the ratio to the loader epoch run just before, in the Train worker
                row["paired_ratio"] = round(steady([a / b for a, b in zip(rates, v["loader0_img_s"])]), 3)
            res[name][k] = row
            paired = f"  paired x{row['paired_ratio']:.3f}" if "paired_ratio" in row else ""
            print(f"{name:8s} {k:16s} {row['img_s']:10.1f} img/s  first epoch {row['first_epoch']:9.1f}  "
                  f"x{row['ratio_vs_loader0']:.3f} of loader0{paired}", flush=True)
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", default=["cifar", "encoded"], choices=["cifar", "encoded"])
    p.add_argument("--rows", type=int, default=8192, help="CIFAR-shaped rows")
    p.add_argument("--jpegs", type=int, default=512, help="224 px encoded rows")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the consuming process")
    p.add_argument("--modes", nargs="+", default=["pipeline", "worker", "split"],
                   choices=["pipeline", "worker", "split"])
    p.add_argument("--data-cpus", nargs="+", type=float, default=[0.25])
    print(json.dumps(run(p.parse_args(argv))))


if __name__ == "__main__":
    main()
