"""E-step value tables: Parquet with ``sample_id`` int64, ``value`` float32, ``epoch`` int32, ``source``.

Written by the condenser (online: before a condensation epoch; offline: every scoring pass) under
``values/values_e<epoch>_<source>.parquet`` in the run folder.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kcd_ray.engine.rundir import RunDir

VALUE_SCHEMA = pa.schema([("sample_id", pa.int64()), ("value", pa.float32()), ("epoch", pa.int32()),
                          ("source", pa.string())])


def value_table_path(run_dir: RunDir, epoch: int, source: str):
    return run_dir.sub("values", f"values_e{epoch:04d}_{source}.parquet")


def write_value_table(run_dir: RunDir, epoch: int, ids: np.ndarray, vals: np.ndarray, source: str) -> str:
    order = np.argsort(ids, kind="stable")
    table = pa.table({
        "sample_id": pa.array(ids[order], pa.int64()), "value": pa.array(vals[order], pa.float32()),
        "epoch": pa.array(np.full(len(ids), epoch, np.int32)), "source": pa.array([source] * len(ids), pa.string()),
    }, schema=VALUE_SCHEMA)
    path = value_table_path(run_dir, epoch, source)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return str(path)


def read_value_table(path) -> tuple[np.ndarray, np.ndarray]:
    try:
        t = pq.read_table(path)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable value table ({e})") from None
    missing = {"sample_id", "value"} - set(t.column_names)
    if missing:
        raise ValueError(f"{path}: value table lacks columns {sorted(missing)}; expected {VALUE_SCHEMA.names}")
    return t.column("sample_id").to_numpy().astype(np.int64), t.column("value").to_numpy().astype(np.float32)
