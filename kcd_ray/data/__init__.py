"""Data: sources -> Parquet (prepare), the prepared format, batch transforms and blend overlays (no Ray).

Importing this package is cheap (no Ray, no torch): ``DATASETS`` lists the registered sources
(digits, synthetic, cifar10, cifar100, folder, idx, fashion_mnist; see docs/data.md). Import the other
modules directly (``transforms``, ``row_maps``, ``blend``, ``groups`` ...); the Ray Data pipeline and the mask
store that use them are ``kcd_ray.ray_layer.pipeline`` and ``kcd_ray.ray_layer.mask_store``.
"""

from kcd_ray.data.parquet_io import (
    FORMAT_VERSION,
    DatasetDamagedError,
    DatasetError,
    compute_checksum,
    count_rows,
    iter_split,
    load_meta,
    locate_sample,
    split_files,
)
from kcd_ray.data.verify import check_prepared, verify_prepared
from kcd_ray.data.prepare import dataset_dir, main_prepare, prepare_dataset
from kcd_ray.data.sources import DATASETS, Source

__all__ = [
    "DATASETS",
    "FORMAT_VERSION",
    "DatasetDamagedError",
    "DatasetError",
    "Source",
    "check_prepared",
    "compute_checksum",
    "count_rows",
    "dataset_dir",
    "iter_split",
    "load_meta",
    "locate_sample",
    "main_prepare",
    "prepare_dataset",
    "split_files",
    "verify_prepared",
]
