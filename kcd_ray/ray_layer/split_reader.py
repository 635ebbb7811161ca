"""Reading a prepared split with Ray Data, and the task shape every kcd_ray plan uses.

Worker processes. Map and read tasks take ``data_cpus`` (fractional) CPUs each so Train workers are never
starved, but at most as many run at once as the cluster has CPUs: beyond that Ray starts extra worker processes
(each importing torch) and kills them when idle, which cost 41 s instead of 1.3 s per 20k-row epoch on 2 cores.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

# Our map operators cap concurrency at the cluster's CPU count (see above); a split of one small file gives
# them a single block, and Ray Data then warns that the cap is higher than the block count.
warnings.filterwarnings("ignore", message=r"The maximum number of concurrent tasks for .* only received",
                        category=UserWarning)
# Ray Data's own ExecutionOptions constructor passes its deprecated exclude_resources (2.60); nothing to change here.
warnings.filterwarnings("ignore", message=r".*ExecutionOptions\.exclude_resources.* is deprecated")

COLUMNS = ["sample_id", "label", "image"]
READ_BLOCK_BYTES = 16 * 2**20  # smaller read blocks: more map tasks in flight, finer shuffle


def find_split(data_dir, split: str) -> Path:
    d = Path(data_dir).expanduser() / split
    if not sorted(d.glob("part-*.parquet")):
        raise FileNotFoundError(f"{d}: no part-*.parquet files; expected a prepared data set with a {split!r} split")
    return d


def parquet_bytes(split_dir: Path) -> int:
    return sum(os.path.getsize(f) for f in split_dir.glob("part-*.parquet"))


def task_cap() -> Optional[int]:
    """Concurrent tasks per operator: the cluster's CPU count (None before ray.init)."""
    import ray

    if not ray.is_initialized():
        return None
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def read_split(split_dir: Path, data_cpus: float, shuffle_seed=False):
    """The split's Parquet files (from the object store where the data set lives there) as a Ray Dataset of
    ``COLUMNS``; ``shuffle_seed``: False keeps file order, an int (or None) reshuffles it every execution."""
    import ray
    from ray.data import FileShuffleConfig

    from kcd_ray.ray_layer.compat import parquet_reader_v1
    from kcd_ray.storage import parquet_source

    shuffle = None
    if shuffle_seed is not False:
        shuffle = (FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True) if shuffle_seed is not None
                   else "files")
    n_files = len(list(split_dir.glob("part-*.parquet")))
    fs, where = parquet_source(split_dir)  # a working copy of a data set in an object store: read from the store
    with parquet_reader_v1(ray.data.DataContext.get_current()):
        ds = ray.data.read_parquet(where, filesystem=fs, columns=COLUMNS, shuffle=shuffle, num_cpus=data_cpus,
                                   concurrency=min(task_cap() or n_files, n_files))
    ds.context.target_max_block_size = min(ds.context.target_max_block_size or READ_BLOCK_BYTES, READ_BLOCK_BYTES)
    return ds


def task_pool(inputs: Optional[int] = None):
    """The compute strategy of every kcd_ray map: a task pool of at most one task per cluster CPU (and per input)."""
    from ray.data import TaskPoolStrategy

    cap = task_cap()
    return TaskPoolStrategy(size=min(cap, inputs) if cap and inputs else cap)


def check_cpus(data_cpus: float) -> float:
    """``scaling.data_cpus``, checked: the fractional CPUs each read and map task takes."""
    if not data_cpus > 0:
        raise ValueError(f"data_cpus: expected > 0 (fractional CPUs per Ray Data task), got {data_cpus!r}")
    return float(data_cpus)
