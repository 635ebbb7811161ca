"""Shared by the engine-level tests: a prepared tiny synthetic set held in memory, batch feeds, an engine.

The engine is driven with plain Python batch lists here (no Ray), as ``kcd_ray.ray_layer.worker`` drives it with
Ray Data shards.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from kcd_ray.config import load_config
from kcd_ray.data import iter_split, prepare_dataset
from kcd_ray.data.parquet_io import splits_of
from kcd_ray.data import transforms as T
from kcd_ray.engine import Engine, assemble_engine
from kcd_ray.models import build_model, save_model


def load_split(data_dir, name: str):
    """(ids, labels, normalised float images) of one split, all in memory."""
    meta = T.read_meta(data_dir)
    rows = list(iter_split(data_dir, name))
    ids = np.concatenate([b.column("sample_id").to_numpy() for b in rows])
    labels = np.concatenate([b.column("label").to_numpy() for b in rows])
    images = [x for b in rows for x in b.column("image").to_pylist()]
    return torch.as_tensor(ids), torch.as_tensor(labels), T.eval_transform(T.decode_images(images, meta), meta)


def prepare_tiny(root: Path, base: dict) -> dict:
    """Prepare ``base``'s data set under ``root`` and load its splits (a validation split too, when it has one):
    ``{"base", "data_dir", "split"}``."""
    data_dir = prepare_dataset(load_config(base=copy.deepcopy(base)).data, verbose=False)
    return {"base": base, "data_dir": str(data_dir),
            "split": {name: load_split(data_dir, name) for name in splits_of(T.read_meta(data_dir))}}


def tiny_set(root: Path, *, num_train: int = 96, num_test: int = 40, num_classes: int = 4, teacher: bool = True,
             **sections) -> dict:
    """The one tiny setup of the engine-level tests: a prepared synthetic set (8x8) under ``root`` held in memory,
    a (random, untrained: these tests are about plumbing) resnet8 teacher file when ``teacher``, and a base config
    (resnet8, in-process, quiet; ``sections`` are merged into it)."""
    base = {"model": "resnet8",
            "data": {"name": "synthetic", "root": str(root / "data"),
                     "synthetic": {"num_train": num_train, "num_test": num_test, "num_classes": num_classes,
                                   "image_size": 8}},
            "optim": {"epochs": 3, "batch_size": 16, "lr": 0.05, "scheduler": "cosine", "threads": 1},
            "scaling": {"num_workers": 0}, "run": {"verbose": 0}}
    out = {}
    if teacher:
        torch.manual_seed(1)
        out["teacher"] = str(save_model(root / "teacher.pt", build_model("resnet8", num_classes)))
        base["distill"] = {"teacher": out["teacher"]}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return {**prepare_tiny(root, base), **out}


def batches(split, batch_size: int, epoch: int, keep=None):
    """A seeded shuffle per epoch, restricted to the ``keep`` ids (the published mask) when given."""
    ids, labels, x = split
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(1000 + epoch))
    if keep is not None:
        order = order[np.isin(ids[order].numpy(), keep)]
    for i in range(0, len(order), batch_size):
        j = order[i:i + batch_size]
        yield {"image": x[j], "label": labels[j], "sample_id": ids[j]}


def config(tiny: dict, **over):
    return load_config(base=copy.deepcopy(tiny["base"]), overrides=[f"{k}={json.dumps(v)}" for k, v in over.items()])


def make_engine(tiny: dict, folder: Path, cfg=None, hooks_extra=(), services=None, kind: str = "distill") -> Engine:
    """An engine with the production hooks (+ ``hooks_extra``: hook instances) writing its run folder to
    ``folder``: ``kcd_ray.engine.assemble_engine`` from the config, as every driver-less run builds one."""
    return assemble_engine(cfg or config(tiny), torch.device("cpu"), services, kind=kind, data_dir=tiny["data_dir"],
                           run_dir=folder, hooks=list(hooks_extra))


def feeds(tiny: dict, engine: Engine, test_batch_size: int = 64):
    """(train, test[, val]) feeds: train batches follow the published mask (as the Ray Data pipeline does);
    the evaluation splits' batches are fixed. The validation feed only when the set has a validation split."""
    services, bs = engine.services, engine.cfg.optim.batch_size

    def train(epoch):
        kept = services.masks[-1][1] if services.masks else None
        return batches(tiny["split"]["train"], bs, epoch, keep=kept)

    out = [train, lambda: batches(tiny["split"]["test"], test_batch_size, 0)]
    if "val" in tiny["split"]:
        out.append(lambda: batches(tiny["split"]["val"], test_batch_size, 0))
    return tuple(out)
