"""Experiment trackers as one engine hook: TensorBoard event files and an MLflow run, written by rank 0.

``run.trackers: [tensorboard, mlflow]`` (each optional; ``pip install 'kcd_ray[tracking]'``). Train V2's
``RunConfig`` takes no Tune logger callbacks, so rank 0 logs itself, through the libraries' own writers:

- **tensorboard**: ``<run folder>/tensorboard/`` (``torch.utils.tensorboard.SummaryWriter``): every numeric column
  of ``metrics.jsonl`` as a scalar at step = epoch, and the resolved config as text. A resumed run opens the
  writer with ``purge_step=0`` and writes the restored history again, so a reader sees each epoch once (what a
  crashed process logged past the checkpoint is dropped, as ``metrics.jsonl`` drops it).
- **mlflow**: one MLflow run per kcd_ray run in ``run.tracking_uri`` ('' = ``sqlite:///<run folder>/mlflow.db``,
  artifacts beside it in ``mlartifacts/``; a sweep's trials share ``<sweep folder>/mlflow.db``). Parameters: the
  resolved config flattened to dotted keys; metrics: the same columns at step = epoch; at the end the summary's
  numbers (``summary.<key>``) and the artifacts ``summary.json``, ``final_model.pt``, ``best_model.pt``,
  ``config.yaml``, ``metrics.jsonl`` and the plots (``plots/curves.png`` and any PNG in the run folder). A resumed
  run continues the same MLflow run (its id is in this hook's checkpoint state; failing that, the run tagged with
  the same run folder) and logs only the epochs it lacks. Experiment: ``run.experiment``, else the sweep's name
  for a sweep's trials (tagged ``kcd_ray.sweep`` and ``kcd_ray.trial_id``; the MLflow run is named after the
  kcd_ray run, ``<sweep>_<trial id>``), else ``kcd_ray``.

It runs after the metrics writer (``kcd_ray.engine.assemble.run_hooks``), so the checkpoint, ``metrics.jsonl`` and,
at the end, ``final_model.pt`` and ``summary.json`` exist when it logs them. Set-up errors (a missing library, a
tracking server that does not answer) fail the run at its start; a failed per-epoch write is reported and training
goes on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

from kcd_ray.config import ConfigError, dump_yaml, to_dict
from kcd_ray.engine.hooks import HOOKS, Hook
from kcd_ray.engine.metrics import say

TRACKERS = ("tensorboard", "mlflow")
INSTALL = "pip install 'kcd_ray[tracking]'"
TB_DIR = "tensorboard"
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
ARTIFACTS = ("summary.json", "final_model.pt", "best_model.pt", "config.yaml", "metrics.jsonl")
SKIP_COLUMNS = ("epoch", "epochs")  # the step itself, and a constant
PARAMS_PER_CALL = 100  # MLflow's log_batch limit
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value


def epoch_metrics(row: dict) -> dict[str, float]:
    """The numeric columns of a metrics row that trackers log (bools, strings, None and non-finite values are not)."""
    return {k: float(v) for k, v in row.items()
            if k not in SKIP_COLUMNS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """The resolved config as MLflow parameters: dotted keys, values as ``str(value)`` (lists too)."""
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:MAX_PARAM_CHARS]
    return out


def sweep_trial(run_name: str, sweep: str) -> tuple[str, str]:
    """(trial id, variant) from a sweep trial's run name ``<sweep>_[kd_]<trial id>`` (``tune.sweep.run_name``)."""
    rest = run_name[len(sweep) + 1:] if run_name.startswith(sweep + "_") else run_name
    return (rest[3:], "kd") if rest.startswith("kd_") else (rest, "")


def _missing(tracker: str, package: str) -> ConfigError:
    return ConfigError(f"run.trackers: {tracker} needs the {package} package, which is not installed; {INSTALL} "
                       f"(or remove {tracker} from run.trackers)")


def check_available(trackers: list[str]) -> None:
    """Import each enabled tracker's library, or raise a one-line ConfigError naming run.trackers and the extra."""
    for name in dict.fromkeys(trackers):
        if name not in TRACKERS:
            raise ConfigError(f"run.trackers: {name!r} is not one of: {', '.join(TRACKERS)}")
        try:
            if name == "tensorboard":
                import tensorboard  # noqa: F401
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            else:
                import mlflow  # noqa: F401
        except ImportError:
            raise _missing(name, name) from None


def tracking_timeout() -> float:
    """Seconds the start-up check waits for an MLflow server (``KCD_RAY_TRACKING_TIMEOUT``, default 5)."""
    return float(os.environ.get("KCD_RAY_TRACKING_TIMEOUT", 5))


def check_tracking(run) -> None:
    """Before a run trains (``plan_run``): each tracker's library, and MLflow's store. A server that does not
    answer within ``tracking_timeout()`` seconds (MLflow's own client retries for minutes) and a sqlite path
    whose folder cannot be made fail in one line naming ``run.tracking_uri``. ``run``: the config's RunConfig."""
    if not run.trackers:
        return
    check_available(run.trackers)
    uri = run.tracking_uri
    if "mlflow" not in run.trackers or not uri:  # '': sqlite in the run folder, made with it
        return
    if uri.startswith(("http://", "https://")):
        _check_server(uri, tracking_timeout())
    elif uri.startswith("sqlite:///"):
        _check_sqlite_folder(uri)


def _check_server(uri: str, timeout: float) -> None:
    """Any HTTP answer will do (MLflow's /health, or an error page of a proxy in front of it): the server is up."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass
    except (OSError, ValueError) as e:  # refused, timed out, no such host, a malformed URI
        reason = getattr(e, "reason", None) or e
        raise ConfigError(f"run.tracking_uri: the MLflow server at {uri} does not answer within {timeout:g} s "
                          f"({' '.join(str(reason).split())[:200]}); start it, fix the URI, or remove mlflow from "
                          "run.trackers (KCD_RAY_TRACKING_TIMEOUT sets the wait)") from None


def _check_sqlite_folder(uri: str) -> None:
    """The database's folder exists or can be made (nothing is made here: ``--dry-run`` writes nothing)."""
    db = Path(uri[len("sqlite:///"):])
    if db.is_dir():
        raise ConfigError(f"run.tracking_uri: {uri}: {db} is a folder; name a database file (sqlite:///path/mlflow.db)")
    folder = db.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"run.tracking_uri: {uri}: cannot make the database's folder {db.parent}: {folder} is a "
                          "file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"run.tracking_uri: {uri}: cannot write the database's folder {db.parent} ({folder} is "
                          "not writable)")


@HOOKS.register("trackers")
class Trackers(Hook):
    """TensorBoard and/or MLflow logging from rank 0 (``chief``); other ranks do nothing."""

    name = "trackers"

    def __init__(self, trackers: list[str], chief: bool = True):
        self.trackers = list(dict.fromkeys(trackers))
        self.chief = chief
        if chief:
            check_available(self.trackers)
        self.writer = None  # tensorboard SummaryWriter
        self.client = None  # mlflow MlflowClient
        self.run_id: Optional[str] = None
        self.uri: Optional[str] = None
        self._restored: dict = {}
        self._warned: set = set()

    # ------------------------------------------------------------------ state (MLflow run id)
    def state_dict(self) -> Optional[dict]:
        return {"mlflow_run_id": self.run_id, "tracking_uri": self.uri} if self.run_id else None

    def load_state_dict(self, state: dict) -> None:
        self._restored = dict(state or {})

    # ------------------------------------------------------------------ hook points
    def before_run(self, engine, start_epoch: int) -> None:
        if not (self.chief and engine.ctx.is_chief):
            return
        resumed = start_epoch > 0
        if "tensorboard" in self.trackers:
            self._open_tensorboard(engine, resumed)
        if "mlflow" in self.trackers:
            self._open_mlflow(engine, resumed)

    def after_checkpoint(self, engine, epoch: int, row: dict) -> None:
        if self.writer is not None:
            self._safely("tensorboard", self._tb_row, row)
        if self.client is not None:
            self._safely("mlflow", self._mlflow_rows, [row])

    def end_run(self, engine, summary) -> None:
        if summary is None or not (self.chief and engine.ctx.is_chief):
            return
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.client is not None:
            self._mlflow_end(engine, summary)

    # ------------------------------------------------------------------ tensorboard
    def _open_tensorboard(self, engine, resumed: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step=0 hides every event of earlier processes from readers; the restored history is written again.
        self.writer = SummaryWriter(log_dir=str(engine.ctx.run_dir.path / TB_DIR), purge_step=0 if resumed else None)
        self.writer.add_text("config", "```\n" + dump_yaml(engine.cfg) + "```", global_step=0)
        for row in engine.history:
            self._tb_row(row, flush=False)
        self.writer.flush()

    def _tb_row(self, row: dict, flush: bool = True) -> None:
        step = int(row["epoch"])
        for key, value in epoch_metrics(row).items():
            self.writer.add_scalar(key, value, global_step=step)
        if flush:
            self.writer.flush()

    # ------------------------------------------------------------------ mlflow
    def _store(self, engine) -> tuple[str, Optional[str], Optional[Path]]:
        """(tracking URI, artifact location for a new experiment, lock file) of this run."""
        cfg = engine.cfg.run
        uri = cfg.tracking_uri
        if not uri:
            # A sweep's trial folder is <sweep folder>/runs/<trial> (tune/sweep.py): the trials share one store.
            folder = engine.ctx.run_dir.path.parent.parent if cfg.sweep else engine.ctx.run_dir.path
            uri = f"sqlite:///{(folder / DB_NAME).resolve()}"
        if uri.startswith("sqlite:///"):
            db = Path(uri[len("sqlite:///"):])
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"run.tracking_uri: {uri}: cannot make the database's folder {db.parent} "
                                  f"({e.strerror or e})") from None
            return uri, (db.parent / ARTIFACTS_DIR).resolve().as_uri(), db.with_name(db.name + ".lock")
        return uri, None, None

    def _open_mlflow(self, engine, resumed: bool) -> None:
        cfg = engine.cfg.run
        self.uri, artifact_location, lock = self._store(engine)
        experiment = cfg.experiment or cfg.sweep or "kcd_ray"
        run_dir = str(engine.ctx.run_dir.path)
        name = cfg.name or engine.ctx.run_dir.path.name
        try:
            # Trials of a sweep create the database, the experiment and their runs at the same time: one at a time.
            with _file_lock(lock), _quiet_mlflow():
                from mlflow.tracking import MlflowClient

                self.client = client = MlflowClient(tracking_uri=self.uri)
                exp = client.get_experiment_by_name(experiment)
                exp_id = (exp.experiment_id if exp
                          else client.create_experiment(experiment, artifact_location=artifact_location))
                run = self._continue_run(exp_id, run_dir, resumed)
                if run is None:
                    tags = {"kcd_ray.run_dir": run_dir, "kcd_ray.kind": engine.ctx.kind}
                    if cfg.sweep:
                        trial, variant = sweep_trial(name, cfg.sweep)
                        tags.update({"kcd_ray.sweep": cfg.sweep, "kcd_ray.trial_id": trial,
                                     **({"kcd_ray.variant": variant} if variant else {})})
                    run = client.create_run(exp_id, run_name=name, tags=tags)
                self.run_id = run.info.run_id
                self._log_params(run, flat_params(to_dict(engine.cfg)))
                logged = {m.step for m in client.get_metric_history(self.run_id, "top1")}
                self._mlflow_rows([r for r in engine.history if int(r["epoch"]) not in logged])
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - one line naming the store, at the start of the run
            raise ConfigError(f"run.tracking_uri: MLflow at {self.uri} failed: "
                              f"{' '.join(str(e).split())[:400]}") from None
        if engine.ctx.verbose:
            say(f"[kcd_ray] mlflow: run {self.run_id} in experiment {experiment!r} at {self.uri}")

    def _continue_run(self, exp_id: str, run_dir: str, resumed: bool):
        """The MLflow run to continue: the checkpoint's, else (a resumed run) the one tagged with this run folder."""
        client, run = self.client, None
        run_id = self._restored.get("mlflow_run_id")
        if run_id and self._restored.get("tracking_uri") in (None, self.uri):
            with contextlib.suppress(Exception):
                run = client.get_run(run_id)
            if run is not None and run.info.lifecycle_stage != "active":
                run = None
        if run is None and resumed:
            found = client.search_runs([exp_id], filter_string=f"tags.`kcd_ray.run_dir` = '{run_dir}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
            run = found[0] if found else None
        if run is not None and run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return run

    def _log_params(self, run, params: dict[str, str]) -> None:
        """Parameters never change in MLflow: a resumed run with a changed value (run.*, optim.epochs) gets a tag."""
        from mlflow.entities import Param, RunTag

        old = run.data.params
        new = [Param(k, v) for k, v in params.items() if k not in old]
        changed = [RunTag(f"kcd_ray.resumed_with.{k}", v) for k, v in params.items() if k in old and old[k] != v]
        for i in range(0, max(len(new), len(changed)), PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=new[i:i + PARAMS_PER_CALL], tags=changed[i:i + PARAMS_PER_CALL])

    def _mlflow_rows(self, rows: list[dict]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, int(r["epoch"])) for r in rows for k, v in epoch_metrics(r).items()]
        for i in range(0, len(batch), 1000):  # MLflow's log_batch limit
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def _mlflow_end(self, engine, summary: dict) -> None:
        from mlflow.entities import Metric

        folder = engine.ctx.run_dir.path
        client, now = self.client, int(time.time() * 1000)
        try:
            numbers = {f"summary.{k}": float(v) for k, v in summary.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in numbers.items()])
            for rel in ARTIFACTS:
                if (folder / rel).is_file():
                    client.log_artifact(self.run_id, str(folder / rel))
            for png in _pngs(folder):
                client.log_artifact(self.run_id, str(png), artifact_path="plots")
            with tempfile.TemporaryDirectory() as tmp:
                curves = _curves_png(engine.history, Path(tmp) / "curves.png", folder.name)
                if curves is not None:
                    client.log_artifact(self.run_id, str(curves), artifact_path="plots")
            client.set_terminated(self.run_id, status="FINISHED")
        except Exception as e:  # noqa: BLE001 - the run itself is done: say what was not logged, do not fail it
            say(f"[kcd_ray] warning: mlflow: the end of run {self.run_id} was not fully logged: "
                f"{' '.join(str(e).split())[:300]}")

    # ------------------------------------------------------------------ helpers
    def _safely(self, tracker: str, fn, *args) -> None:
        """A per-epoch write that fails (a busy database, a server that went away) is reported, not fatal."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001
            if tracker not in self._warned:
                self._warned.add(tracker)
                say(f"[kcd_ray] warning: {tracker}: could not log an epoch ({' '.join(str(e).split())[:300]}); "
                    "training goes on, a resume logs the missing epochs")


def _pngs(folder: Path) -> list[Path]:
    """The plots a run folder holds (``kcd-ray report`` writes ``curves.png`` there), not the trackers' own files."""
    skip = {TB_DIR, ARTIFACTS_DIR}
    return sorted(p for p in folder.rglob("*.png") if not skip & set(p.relative_to(folder).parts))


def _curves_png(history: list[dict], path: Path, title: str) -> Optional[Path]:
    """The report's per-epoch curves (matplotlib only: the plotting module imports no Ray)."""
    if not history:
        return None
    from kcd_ray.plots import curves_plot

    return curves_plot(history, path, title)


@contextlib.contextmanager
def _file_lock(path: Optional[Path]):
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_mlflow():
    """MLflow's database set-up logs INFO lines (and SQLAlchemy a deprecation warning) on every new store."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"mlflow\..*|sqlalchemy\..*|alembic\..*")
        yield
