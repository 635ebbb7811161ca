"""Raw data sources; importing this package registers every source in ``DATASETS``."""

from kcd_ray.data.sources.base import DATASETS, Source
from kcd_ray.data.sources import cifar, digits, folder, idx, synthetic  # noqa: F401  (registration)

__all__ = ["DATASETS", "Source"]
