"""The sweep file: a base recipe, fixed overrides, a search space and how to search it.

```yaml
name: rho                        # sweep folder name (default: the file's stem)
base: ../digits/kcd.yaml         # recipe, relative to this file; or an inline mapping
kind: distill                    # distill | teacher
overrides: {optim.epochs: 12}    # fixed dotted overrides (mapping, or a list of "k=v")
space:                           # dotted config key -> values (see kcd_ray.sweeps.space)
  kcd.rho: [0.5, 0.7, 0.9]
search: grid                     # grid | random | optuna (lists become choices for random/optuna)
num_samples: 1                   # grid: repeats of the whole grid; random/optuna: trials
metric: val_top1                 # what the best trial is chosen by: a metric the runs report, on validation
mode: max                        #   (data.val_fraction in the base recipe); a test metric needs select_on_test
objectives:                      # or two (or more): a multi-objective Optuna search for the front, e.g.
  - {metric: val_top1, mode: max}
  - {metric: compute_ratio, mode: min}
select_on_test: false            # true: allow choosing on a test metric (the report then labels it)
asha: false                      # true, or {grace_period, reduction_factor, max_t, metric, mode}
pbt: false                       # true, or {interval, metric, quantile, resample_probability, mutate}: Population
                                 # Based Training over the space while the trials train (in-process trials)
include_kd_baseline: true        # one extra plain-KD trial (kcd.enabled=false) for the report
storage_path: ./runs/sweeps      # the sweep folder is <storage_path>/<name>
max_concurrent_trials: 0         # 0: derived from the cluster's resources
trials_at_once: 0                # > 0: this many trials share the machine (and its GPUs) at once, each with that
                                 #   fraction of the CPUs and GPUs
trial_cpus: 0.25                 # CPU of each trial's driver (the Train workers have their own)
seed: 0                          # random/optuna sampling seed
```

Command-line overrides whose first part is one of these keys (``num_samples=4``) change the
sweep; any other ``dotted.key=value`` is a fixed config override applied after the file's own.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import yaml

from kcd_ray import storage
from kcd_ray.config import ConfigError, parse_scalar, read_yaml_mapping, apply_overrides, config_from_dict, to_dict
from kcd_ray.sweeps.metrics import SUMMARY_KEYS, check_metric, default_metric  # noqa: F401 - SUMMARY_KEYS: trials
from kcd_ray.sweeps.schedulers import parse_schedulers
from kcd_ray.sweeps.space import Dim, field_kind, parse_space, set_dotted

SWEEP_KEYS = ("name", "description", "base", "kind", "overrides", "space", "search", "num_samples", "metric", "mode",
              "objectives", "select_on_test", "asha", "pbt", "include_kd_baseline", "storage_path",
              "max_concurrent_trials", "trials_at_once", "trial_cpus", "reuse_trial_processes", "seed")
SEARCHES = ("grid", "random", "optuna")
# Config fields holding paths: made absolute up front, because Tune trials run in their own folder.
PATH_KEYS = ("data.root", "data.source", "distill.teacher", "distill.cache_dir", "run.storage_path")

@dataclasses.dataclass
class Sweep:
    name: str
    source: str  # the sweep file, or "<inline sweep>"
    kind: str
    base: dict  # resolved config (base recipe + fixed overrides) as a nested dict, absolute paths
    dims: list[Dim]
    search: str = "grid"
    num_samples: int = 1
    metric: str = "val_top1"
    mode: str = "max"
    objectives: tuple = ()  # ((metric, mode), ...): a multi-objective search (metric/mode are the first)
    select_on_test: bool = False
    asha: dict | None = None
    pbt: dict | None = None
    include_kd_baseline: bool = False
    storage_path: str = ""
    max_concurrent_trials: int = 0
    trials_at_once: int = 0
    trial_cpus: float = 0.25
    reuse_trial_processes: bool = True  # in-process trials: Tune starts the next trial in a finished one's process
    seed: int = 0
    description: str = ""

    @property
    def remote(self) -> str:
        """The sweep folder's URI when ``storage_path`` is an object store, else ""."""
        return storage.join(self.storage_path, self.name) if storage.is_uri(self.storage_path) else ""

    @property
    def folder(self) -> Path:
        """The sweep folder; for a sweep in an object store, its local working copy."""
        return storage.stage_dir(self.remote) if self.remote else Path(self.storage_path) / self.name

    @property
    def runs_dir(self) -> Path:
        """The trials' run folders (for a sweep in an object store, their local working copies)."""
        return self.folder / "runs"

    @property
    def runs_location(self) -> str:
        """Where the trials' run folders go (each trial's ``run.storage_path``): a path, or a URI in the store."""
        return storage.join(self.remote, "runs") if self.remote else str(self.runs_dir)

    def identity(self) -> dict:
        """What makes two invocations the same sweep (compared before restoring a sweep folder)."""
        d = {"kind": self.kind, "base": self.base, "space": [dataclasses.asdict(x) for x in self.dims],
             "search": self.search, "num_samples": self.num_samples, "metric": self.metric, "mode": self.mode,
             "objectives": [list(o) for o in self.objectives], "select_on_test": self.select_on_test,
             "asha": self.asha, "pbt": self.pbt, "include_kd_baseline": self.include_kd_baseline, "seed": self.seed}
        return json.loads(json.dumps(d, default=list))

    def to_yaml(self) -> str:
        d = {"name": self.name, "source": self.source, "description": self.description, **self.identity(),
             "storage_path": self.storage_path, "max_concurrent_trials": self.max_concurrent_trials,
             "trials_at_once": self.trials_at_once, "trial_cpus": self.trial_cpus,
             "reuse_trial_processes": self.reuse_trial_processes}
        return yaml.safe_dump(d, sort_keys=False)


def _err(where: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: {msg}")


def _abs_path(p: str, rel_to: Path) -> str:
    if not p or "://" in p:
        return p
    p = os.path.expanduser(p)
    return str((rel_to / p).resolve()) if not os.path.isabs(p) else p


def absolute_paths(cfg: dict, rel_to: Path) -> dict:
    """Make the path fields of a resolved config dict absolute (in place), relative to ``rel_to``.

    Tune trials and Train workers run in their own folders (and on other nodes), so a relative
    teacher or data path must be fixed where the user wrote it: in the driver's working folder.
    """
    for key in PATH_KEYS:
        section, leaf = key.split(".")
        cfg[section][leaf] = _abs_path(cfg[section][leaf], rel_to)
    return cfg


def _load_base(base: Any, sweep_dir: Path, where: str) -> dict:
    if base is None:
        return {}
    if isinstance(base, dict):
        return copy.deepcopy(base)
    if not isinstance(base, str):
        raise _err(where, f"base: expected a recipe path or a mapping, got {base!r}")
    p = Path(base) if os.path.isabs(base) else sweep_dir / base
    if not p.is_file():
        raise _err(where, f"base: recipe {p} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise _err(where, f"base: {p} does not hold a mapping")
    return data


def _apply_fixed(data: dict, overrides: Any, where: str) -> dict:
    if overrides is None:
        return data
    if isinstance(overrides, dict):
        for k, v in overrides.items():
            try:
                field_kind(str(k))
            except ConfigError as e:
                raise _err(where, f"overrides.{e}") from None
            set_dotted(data, str(k), v)
        return data
    if isinstance(overrides, list):
        for item in overrides:
            key = str(item).split("=", 1)[0].strip()
            try:
                field_kind(key)
            except ConfigError as e:
                raise _err(where, f"overrides: {e}") from None
        return apply_overrides(data, [str(x) for x in overrides])
    raise _err(where, f"overrides: expected a mapping of dotted keys or a list of key=value, got {overrides!r}")


def split_overrides(overrides: list[str] | None) -> tuple[dict, list[str]]:
    """Command-line ``k=v`` items: (sweep-level settings, config overrides)."""
    sweep_level, config_level = {}, []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides take the form key=value")
        key, text = item.split("=", 1)
        if key.strip() in SWEEP_KEYS:
            sweep_level[key.strip()] = parse_scalar(text)
        else:
            config_level.append(item)
    return sweep_level, config_level


def _read_raw(src, overrides, storage_path) -> tuple[dict, str, Path, str, list[str]]:
    """(the sweep mapping with command-line sweep keys applied, where it came from, its folder, its file's stem,
    the command-line config overrides)."""
    if isinstance(src, dict):
        raw, where, sweep_dir, stem = copy.deepcopy(src), "<inline sweep>", Path.cwd(), "sweep"
    else:
        p = Path(src)
        raw = read_yaml_mapping(p, "sweep file")
        where, sweep_dir, stem = str(p), p.resolve().parent, p.stem
    unknown = [k for k in raw if k not in SWEEP_KEYS]
    if unknown:
        raise _err(where, f"{unknown[0]}: unknown sweep key; allowed: {', '.join(SWEEP_KEYS)}")
    cli_sweep, cli_config = split_overrides(overrides)
    raw.update(cli_sweep)
    if storage_path:
        raw["storage_path"] = storage_path
    return raw, where, sweep_dir, stem, cli_config


def _base_config(raw: dict, sweep_dir: Path, where: str, cli_config: list[str]) -> dict:
    """The resolved base config (recipe + the sweep's fixed overrides + command-line ones), paths absolute."""
    data = _apply_fixed(_load_base(raw.get("base"), sweep_dir, where), raw.get("overrides"), where)
    for item in cli_config:
        try:
            field_kind(item.split("=", 1)[0].strip())
        except ConfigError as e:
            raise ConfigError(f"command-line override {e}") from None
    apply_overrides(data, cli_config)
    try:
        base = to_dict(config_from_dict(data))
    except ConfigError as e:
        raise _err(where, f"base recipe + overrides: {e}") from None
    return absolute_paths(base, Path.cwd())


def _space(raw: dict, base: dict, search: str, where: str) -> list[Dim]:
    dims = parse_space(raw.get("space"), base, where)
    # Path values in the space are fixed against the working folder too (trials run in their own folders).
    cwd = Path.cwd()
    dims = [Dim(d.key, d.kind, tuple(_abs_path(v, cwd) if isinstance(v, str) else v for v in d.values))
            if d.key in PATH_KEYS else d for d in dims]
    if search != "grid":  # lists mean "one of these" when sampling
        dims = [Dim(d.key, "choice", d.values) if d.kind == "grid" else d for d in dims]
    return dims


def _choice(raw: dict, key: str, default, allowed: tuple, where: str):
    value = raw.get(key, default)
    if value not in allowed:
        raise _err(where, f"{key}: {value!r} is not one of: {', '.join(map(str, allowed))}")
    return value


def _objectives(raw: dict, base: dict, where: str, select_on_test: bool) -> tuple:
    objs = raw.get("objectives") or []
    if not isinstance(objs, list) or any(not isinstance(o, dict) or set(o) - {"metric", "mode"} for o in objs):
        raise _err(where, f"objectives: expected a list of {{metric, mode}} mappings, got {objs!r}")
    out = []
    for i, o in enumerate(objs):
        mode = o.get("mode", "max")
        if mode not in ("max", "min"):
            raise _err(where, f"objectives[{i}].mode: {mode!r} is not one of: max, min")
        out.append((check_metric(o.get("metric"), f"objectives[{i}].metric", where, base, select_on_test), mode))
    if len(out) == 1:
        raise _err(where, "objectives: give two or more (e.g. val_top1 max, compute_ratio min), or use metric/mode")
    return tuple(out)


def _search_keys(raw: dict, base: dict, kind: str, search: str, where: str) -> dict:
    """num_samples, metric, mode, objectives, select_on_test and include_kd_baseline, checked."""
    num_samples = raw.get("num_samples", 1)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise _err(where, f"num_samples: expected an integer >= 1, got {num_samples!r}")
    select_on_test = raw.get("select_on_test", False)
    if not isinstance(select_on_test, bool):
        raise _err(where, f"select_on_test: expected true or false, got {select_on_test!r}")
    objectives = _objectives(raw, base, where, select_on_test)
    if objectives and ("metric" in raw or "mode" in raw):
        raise _err(where, "objectives and metric/mode: give one or the other")
    if objectives and search != "optuna":
        raise _err(where, f"objectives: a multi-objective search needs search: optuna, got {search!r} (a grid or "
                          "random sweep is drawn against compute by the report whatever its metric)")
    metric, mode = objectives[0] if objectives else (raw.get("metric") or default_metric(base, select_on_test),
                                                     _choice(raw, "mode", "max", ("max", "min"), where))
    check_metric(metric, "metric", where, base, select_on_test)
    baseline = raw.get("include_kd_baseline", False)
    if not isinstance(baseline, bool):
        raise _err(where, f"include_kd_baseline: expected true or false, got {baseline!r}")
    strategy = (base.get("selection") or {}).get("strategy", "auto")
    if baseline and (kind != "distill" or strategy == "none" or (strategy == "auto" and not base["kcd"]["enabled"])):
        raise _err(where, "include_kd_baseline: needs kind distill with a data-selection strategy in the base recipe "
                          "(kcd.enabled true or selection.strategy; the baseline is the same recipe without it)")
    return {"num_samples": num_samples, "mode": mode, "metric": metric, "objectives": objectives,
            "select_on_test": select_on_test, "include_kd_baseline": baseline}


def _resource_keys(raw: dict, where: str) -> dict:
    try:
        out = {"max_concurrent_trials": int(raw.get("max_concurrent_trials", 0)),
               "trials_at_once": int(raw.get("trials_at_once", 0)),
               "trial_cpus": float(raw.get("trial_cpus", 0.25)), "seed": int(raw.get("seed", 0))}
    except (TypeError, ValueError) as e:
        raise _err(where, f"max_concurrent_trials / trials_at_once / trial_cpus / seed: expected numbers "
                          f"({e})") from None
    if out["max_concurrent_trials"] < 0 or out["trials_at_once"] < 0 or out["trial_cpus"] <= 0:
        raise _err(where, "max_concurrent_trials and trials_at_once must be >= 0, trial_cpus > 0")
    if out["max_concurrent_trials"] and out["trials_at_once"]:
        raise _err(where, "max_concurrent_trials and trials_at_once: give one (trials_at_once also sizes each trial)")
    reuse = raw.get("reuse_trial_processes", True)
    if not isinstance(reuse, bool):
        raise _err(where, f"reuse_trial_processes: expected true or false, got {reuse!r}")
    return {**out, "reuse_trial_processes": reuse}


def _storage(raw: dict, base: dict, pbt, where: str) -> str:
    store = raw.get("storage_path") or storage.join(base["run"]["storage_path"], "sweeps")
    if storage.is_uri(store) and pbt:
        raise _err(where, f"storage_path: {store!r}: a pbt sweep exploits checkpoints in its trials' folders; "
                          "use a file-system path (an NFS/EFS mount on a cluster)")
    return _abs_path(str(store), Path.cwd())


def load_sweep(src: str | os.PathLike | dict, overrides: list[str] | None = None,
               storage_path: str | None = None) -> Sweep:
    """Read, resolve and validate a sweep (file path or mapping); every error names the file and the key."""
    raw, where, sweep_dir, stem, cli_config = _read_raw(src, overrides, storage_path)
    name = storage.check_name(str(raw.get("name") or stem), f"{where}: name")  # trial folders derive from it
    base = _base_config(raw, sweep_dir, where, cli_config)
    kind = _choice(raw, "kind", "distill", ("distill", "teacher"), where)
    search = _choice(raw, "search", "grid", SEARCHES, where)
    dims = _space(raw, base, search, where)
    keys = _search_keys(raw, base, kind, search, where)
    asha, pbt = parse_schedulers(raw, base, dims, keys["include_kd_baseline"], where, keys["metric"],
                                 keys["select_on_test"], keys["mode"])
    return Sweep(name=name, source=where, kind=kind, base=base, dims=dims, search=search, asha=asha, pbt=pbt,
                 storage_path=_storage(raw, base, pbt, where), description=str(raw.get("description", "")),
                 **keys, **_resource_keys(raw, where))


def check_before_ray(sw: Sweep) -> None:
    """What a sweep needs on disk, checked before Ray and Tune start (so it fails in a second, not in every trial).

    ``kind: distill`` needs ``distill.teacher``: the base recipe's file, and every teacher the space lists.
    """
    if sw.kind != "distill":
        return
    spaced = [("space.distill.teacher", v) for d in sw.dims if d.key == "distill.teacher" for v in d.values]
    # The base recipe's teacher is used unless the space replaces it (the KD baseline runs the base values).
    teachers = ([] if spaced and not sw.include_kd_baseline else [("distill.teacher", sw.base["distill"]["teacher"])])
    teachers += spaced
    for key, path in teachers:
        if not path:
            raise _err(sw.source, f"{key}: not set; kind distill needs a teacher checkpoint "
                                  "(train one with `kcd-ray train-teacher`)")
        if not storage.exists(path):  # fit() refuses the same, but only once Tune has started the trial
            raise _err(sw.source, f"{key}: teacher file {path} does not exist")
