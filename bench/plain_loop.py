"""A plain PyTorch training loop over a prepared data set's training split: the baseline kcd_ray's training
path is measured against (``bench/train_throughput.py``).

Same model, batch size and augmentation code (``kcd_ray.data.transforms.train_transform``, what the Ray Data
path runs) as a run, a torch ``DataLoader`` over the decoded split in memory, SGD, no kcd_ray loop. The driver
runs it before and after each run, and the :class:`PlainEpochBeside` hook inside a Train worker right before each
of that run's epochs, so each epoch has a baseline measured next to it on the same host speed. Benchmarks only:
nothing in ``kcd_ray`` imports this module (``bench/train_throughput.py`` ships the hook class to its workers by
value).
It keeps its own model, optimiser and random streams: running it never changes what the run draws.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from kcd_ray.data import iter_split
from kcd_ray.data import transforms as T
from kcd_ray.engine.hooks import Hook
from kcd_ray.models import build_model


def load_train_arrays(data_dir) -> tuple[dict, np.ndarray, np.ndarray]:
    """(meta, int64 labels, decoded uint8 images) of the training split."""
    meta = T.read_meta(data_dir)
    labels, images = [], []
    for batch in iter_split(data_dir, "train"):
        labels.append(batch.column("label").to_numpy())
        images.append(T.decode_images(batch.column("image").to_pylist(), meta))
    return meta, np.concatenate(labels).astype(np.int64), np.concatenate(images)


class PlainLoop:
    """One model and optimiser trained epoch after epoch on the CPU; :meth:`epoch` returns its img/s."""

    def __init__(self, data_dir, model: str, batch_size: int, seed: int = 0, model_kwargs: dict | None = None):
        meta, labels, images = load_train_arrays(data_dir)
        kind = T.resolve_augment("auto", meta)
        data = torch.utils.data.TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))

        def collate(items):
            x = torch.stack([i[0] for i in items])
            y = torch.stack([i[1] for i in items])
            return T.train_transform(x, meta, kind), y  # exactly what the Ray Data map runs

        self.loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                                  num_workers=0, generator=torch.Generator().manual_seed(seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = build_model(model, int(meta["num_classes"]), kwargs=model_kwargs)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        self.seed, self.epochs = seed, 0

    def epoch(self) -> float:
        """Train one epoch; images per second."""
        with torch.random.fork_rng(devices=[]):  # the augmentation's draws come from torch's global stream
            torch.manual_seed(self.seed + 1 + self.epochs)
            self.model.train()
            t0, n = time.perf_counter(), 0
            for x, y in self.loader:
                loss = torch.nn.functional.cross_entropy(self.model(x), y)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                n += len(y)
        self.epochs += 1
        return n / (time.perf_counter() - t0)


class PlainEpochBeside(Hook):
    """Before each epoch, rank 0 trains one epoch of :class:`PlainLoop` (same model, batch and augmentation, its own
    weights and random streams) in this worker process and appends its img/s to ``plain_epochs.jsonl`` in the run
    folder. The engine leaves ``before_epoch`` time out of an epoch's ``train_seconds``."""

    def __init__(self):
        self.loop = None

    def before_epoch(self, engine, epoch: int) -> None:
        if not engine.ctx.is_chief:
            return
        if self.loop is None:
            self.loop = PlainLoop(engine.ctx.data_dir, engine.cfg.model, engine.cfg.optim.batch_size,
                                  seed=engine.cfg.optim.seed)
        line = json.dumps({"epoch": epoch, "images_per_s": self.loop.epoch()})
        with open(engine.ctx.run_dir.path / "plain_epochs.jsonl", "a") as f:
            f.write(line + "\n")
