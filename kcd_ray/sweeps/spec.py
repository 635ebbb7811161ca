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
metric: best_top1                # a metric the runs report (REPORTED_METRICS: best_top1, top1, val_loss, ...)
mode: max
asha: false                      # true, or {grace_period, reduction_factor, max_t, metric}
pbt: false                       # true, or {interval, metric, quantile, resample_probability, mutate}: Population
                                 # Based Training over the space while the trials train (in-process trials)
include_kd_baseline: true        # one extra plain-KD trial (kcd.enabled=false) for the report
storage_path: ./runs/sweeps      # the sweep folder is <storage_path>/<name>
max_concurrent_trials: 0         # 0: derived from the cluster's resources
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
from kcd_ray.sweeps.space import Dim, field_kind, parse_space, set_dotted

SWEEP_KEYS = ("name", "description", "base", "kind", "overrides", "space", "search", "num_samples", "metric", "mode",
              "asha", "pbt", "include_kd_baseline", "storage_path", "max_concurrent_trials", "trial_cpus", "seed")
PBT_KEYS = ("interval", "metric", "quantile", "resample_probability", "mutate")
SEARCHES = ("grid", "random", "optuna")
ASHA_KEYS = ("grace_period", "reduction_factor", "max_t", "metric")
# Config fields holding paths: made absolute up front, because Tune trials run in their own folder.
PATH_KEYS = ("data.root", "data.source", "distill.teacher", "distill.cache_dir", "run.storage_path")

# What a trial reports to Tune, i.e. what ``metric`` (and ``asha.metric``) may name: the numeric columns of each
# epoch's metrics row, which the engine and every registered part declare (``kcd_ray.engine.assemble.epoch_columns``:
# the engine's own, the compute ledger's, a strategy's or curriculum's, one ``loss_<term>`` per loss term), and
# the run summary's figures reported once at the end of each trial (``kcd_ray.ray_layer.tune.sweep._trial``).
SUMMARY_KEYS = ("final_top1", "final_top5", "best_top1", "best_epoch", "compute_ratio", "sample_passes",
                "full_sample_passes", "wall_seconds", "sample_pass_ratio", "flops_total", "full_flops")
LOSS_PREFIX = "loss_"


def epoch_metrics() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from kcd_ray.engine.assemble import epoch_columns

    return epoch_columns()


def is_epoch_metric(name: str) -> bool:
    """Reported after every epoch (what ASHA can stop on)."""
    names, prefixes = epoch_metrics()
    return name in names or any(name.startswith(p) and len(name) > len(p) for p in prefixes)


def is_reported_metric(name: str) -> bool:
    return name in SUMMARY_KEYS or is_epoch_metric(name)


def _metric_list(names) -> str:
    return ", ".join(sorted(names)) + f", {LOSS_PREFIX}<term> (a loss term: loss_kd, loss_ce, ...)"


def _epoch_metric_list() -> str:
    return _metric_list(epoch_metrics()[0])


def _reported_metric_list() -> str:
    return _metric_list(dict.fromkeys(epoch_metrics()[0] + SUMMARY_KEYS))


@dataclasses.dataclass
class Sweep:
    name: str
    source: str  # the sweep file, or "<inline sweep>"
    kind: str
    base: dict  # resolved config (base recipe + fixed overrides) as a nested dict, absolute paths
    dims: list[Dim]
    search: str = "grid"
    num_samples: int = 1
    metric: str = "best_top1"
    mode: str = "max"
    asha: dict | None = None
    pbt: dict | None = None
    include_kd_baseline: bool = False
    storage_path: str = ""
    max_concurrent_trials: int = 0
    trial_cpus: float = 0.25
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
             "asha": self.asha, "pbt": self.pbt, "include_kd_baseline": self.include_kd_baseline, "seed": self.seed}
        return json.loads(json.dumps(d, default=list))

    def to_yaml(self) -> str:
        d = {"name": self.name, "source": self.source, "description": self.description, **self.identity(),
             "storage_path": self.storage_path, "max_concurrent_trials": self.max_concurrent_trials,
             "trial_cpus": self.trial_cpus}
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


def load_sweep(src: str | os.PathLike | dict, overrides: list[str] | None = None, storage_path: str | None = None) -> Sweep:
    """Read, resolve and validate a sweep (file path or mapping); every error names the file and the key."""
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
    cwd = Path.cwd()
    absolute_paths(base, cwd)

    kind = raw.get("kind", "distill")
    if kind not in ("distill", "teacher"):
        raise _err(where, f"kind: {kind!r} is not one of: distill, teacher")
    search = raw.get("search", "grid")
    if search not in SEARCHES:
        raise _err(where, f"search: {search!r} is not one of: {', '.join(SEARCHES)}")
    dims = parse_space(raw.get("space"), base, where)
    # Path values in the space are fixed against the working folder too (trials run in their own folders).
    dims = [Dim(d.key, d.kind, tuple(_abs_path(v, cwd) if isinstance(v, str) else v for v in d.values))
            if d.key in PATH_KEYS else d for d in dims]
    if search != "grid":  # lists mean "one of these" when sampling
        dims = [Dim(d.key, "choice", d.values) if d.kind == "grid" else d for d in dims]
    num_samples = raw.get("num_samples", 1)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise _err(where, f"num_samples: expected an integer >= 1, got {num_samples!r}")
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        raise _err(where, f"mode: {mode!r} is not one of: max, min")
    metric = str(raw.get("metric", "best_top1"))
    if not is_reported_metric(metric):
        raise _err(where, f"metric: {metric!r} is not a metric the runs report; one of: {_reported_metric_list()}")
    baseline = raw.get("include_kd_baseline", False)
    if not isinstance(baseline, bool):
        raise _err(where, f"include_kd_baseline: expected true or false, got {baseline!r}")
    strategy = (base.get("selection") or {}).get("strategy", "auto")
    if baseline and (kind != "distill" or strategy == "none" or (strategy == "auto" and not base["kcd"]["enabled"])):
        raise _err(where, "include_kd_baseline: needs kind distill with a data-selection strategy in the base recipe "
                          "(kcd.enabled true or selection.strategy; the baseline is the same recipe without it)")
    asha, pbt = _parse_schedulers(raw, base, dims, baseline, where)
    try:
        max_conc = int(raw.get("max_concurrent_trials", 0))
        trial_cpus = float(raw.get("trial_cpus", 0.25))
        seed = int(raw.get("seed", 0))
    except (TypeError, ValueError) as e:
        raise _err(where, f"max_concurrent_trials / trial_cpus / seed: expected numbers ({e})") from None
    if max_conc < 0 or trial_cpus <= 0:
        raise _err(where, "max_concurrent_trials must be >= 0 and trial_cpus > 0")
    store = raw.get("storage_path") or storage.join(base["run"]["storage_path"], "sweeps")
    if storage.is_uri(store) and pbt:
        raise _err(where, f"storage_path: {store!r}: a pbt sweep exploits checkpoints in its trials' folders; "
                          "use a file-system path (an NFS/EFS mount on a cluster)")
    name = storage.check_name(str(raw.get("name") or stem), f"{where}: name")  # trial folders derive from it
    return Sweep(name=name, source=where, kind=kind, base=base, dims=dims, search=search, num_samples=num_samples,
                 metric=metric, mode=mode, asha=asha, pbt=pbt, include_kd_baseline=baseline,
                 storage_path=_abs_path(str(store), cwd), max_concurrent_trials=max_conc, trial_cpus=trial_cpus,
                 seed=seed, description=str(raw.get("description", "")))


def _parse_asha(asha: Any, base: dict, where: str) -> dict | None:
    if asha in (False, None):
        return None
    if asha is True:
        asha = {}
    if not isinstance(asha, dict):
        raise _err(where, f"asha: expected true/false or a mapping of {', '.join(ASHA_KEYS)}, got {asha!r}")
    for k in asha:
        if k not in ASHA_KEYS:
            raise _err(where, f"asha.{k}: unknown key; allowed: {', '.join(ASHA_KEYS)}")
    epochs = base["optim"]["epochs"]
    out = {"metric": "top1", "grace_period": 1, "reduction_factor": 2, "max_t": epochs, **asha}
    if not (isinstance(out["grace_period"], int) and 0 < out["grace_period"] <= out["max_t"]):
        raise _err(where, f"asha.grace_period: expected an integer in 1..max_t ({out['max_t']}), got {out['grace_period']!r}")
    if not (isinstance(out["reduction_factor"], (int, float)) and out["reduction_factor"] > 1):
        raise _err(where, f"asha.reduction_factor: expected a number > 1, got {out['reduction_factor']!r}")
    if not isinstance(out["metric"], str) or not is_epoch_metric(out["metric"]):
        raise _err(where, f"asha.metric: {out['metric']!r} is not a metric the runs report every epoch; "
                          f"one of: {_epoch_metric_list()}")
    return out


def _parse_schedulers(raw: dict, base: dict, dims: list, baseline: bool, where: str) -> tuple:
    """(asha, pbt): at most one of them; PBT without the fixed KD baseline trial."""
    asha = _parse_asha(raw.get("asha", False), base, where)
    pbt = _parse_pbt(raw.get("pbt", False), base, dims, where)
    if pbt and asha:
        raise _err(where, "pbt and asha: pick one scheduler")
    if pbt and baseline:
        raise _err(where, "pbt and include_kd_baseline: the baseline would join the population and be exploited; "
                          "run plain KD as its own sweep or run")
    return asha, pbt


def _parse_pbt(pbt: Any, base: dict, dims: list, where: str) -> dict | None:
    """Population Based Training: every ``interval`` epochs the bottom ``quantile`` of trials copy a top trial's
    checkpoint (weights, optimiser and the whole KCD state) and perturb the ``mutate`` keys of the space."""
    if pbt in (False, None):
        return None
    pbt = {} if pbt is True else pbt
    if not isinstance(pbt, dict):
        raise _err(where, f"pbt: expected true/false or a mapping of {', '.join(PBT_KEYS)}, got {pbt!r}")
    for k in pbt:
        if k not in PBT_KEYS:
            raise _err(where, f"pbt.{k}: unknown key; allowed: {', '.join(PBT_KEYS)}")
    keys = [d.key for d in dims]
    out = {"interval": 2, "metric": "top1", "quantile": 0.25, "resample_probability": 0.25, "mutate": keys, **pbt}
    if not (isinstance(out["interval"], int) and 0 < out["interval"] < base["optim"]["epochs"]):
        raise _err(where, f"pbt.interval: expected an integer in 1..optim.epochs-1 ({base['optim']['epochs'] - 1}), "
                          f"got {out['interval']!r}")
    if not (isinstance(out["quantile"], (int, float)) and 0 < out["quantile"] <= 0.5):
        raise _err(where, f"pbt.quantile: expected a fraction in (0, 0.5], got {out['quantile']!r}")
    if not isinstance(out["metric"], str) or not is_epoch_metric(out["metric"]):
        raise _err(where, f"pbt.metric: {out['metric']!r} is not a metric the runs report every epoch; "
                          f"one of: {_epoch_metric_list()}")
    bad = [k for k in out["mutate"] if k not in keys]
    if bad or not out["mutate"]:
        raise _err(where, f"pbt.mutate: {bad or out['mutate']!r}: expected keys of space ({', '.join(keys) or 'empty'})")
    if base["scaling"]["num_workers"] != 0:
        raise _err(where, "pbt: needs in-process trials (scaling.num_workers=0): trials hand each other their "
                          "checkpoints through Tune")
    kcd_on = base["kcd"]["enabled"] or (base.get("selection") or {}).get("strategy") == "kcd"
    if kcd_on and base["kcd"]["summary"]:
        raise _err(where, "pbt: set kcd.summary=false: KCD's summary blends live in each trial's run folder and do "
                          "not travel with an exploited checkpoint")
    return out


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
        if not Path(path).exists():  # fit() refuses the same, but only once Tune has started the trial
            raise _err(sw.source, f"{key}: teacher file {path} does not exist")
