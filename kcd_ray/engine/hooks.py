"""The hook interface: the parts that plug into the engine at fixed points.

A hook is one registered class. The engine calls, in order of the hook list:

- ``before_run(engine, start_epoch)``   after a resume restored every state, before the first epoch
- ``before_epoch(engine, epoch)``       before the epoch's data is read
- ``data_selection(engine)``            (rank 0, after ``before_epoch``) which samples the epoch serves: a
                                         :class:`Selection`; the engine intersects every hook's and publishes it
- ``universe(engine)``                 bool[N] or None: the samples a data-selection strategy may select from this
                                         epoch (a curriculum's active classes; KCD condenses within them)
- ``before_step(engine, batch)``        may return a replacement batch (on the device), e.g. UNIXKD's selection+mixup
- ``adjust_loss(engine, batch, output, loss)`` may return a new loss tensor (e.g. InfoBatch's rescaling)
- ``after_step(engine, batch, output)`` after each optimiser step (no host synchronisation here on a GPU)
- ``after_epoch(engine, epoch, row)``   after training and evaluation; may add fields to the metrics row
- ``after_checkpoint(engine, epoch, row)`` after the epoch's checkpoint was reported
- ``end_run(engine, summary)``          rank 0's summary is complete (others get ``None``)
- ``pop_compute_counts()``              this rank's extra forward passes since the last call, for the compute ledger:
                                         ``{"student_forward_only": n, "teacher_forward": n}`` (ranking passes,
                                         an offline E-step)

and saves ``state_dict()`` under the hook's ``name`` in every run checkpoint (``load_state_dict`` on resume). The
columns a hook adds to the metrics row are declared in ``columns`` (sweeps validate their metrics against them).
Hooks never subclass or patch the engine; they read what they need from it (``engine.ctx``, ``engine.distiller``,
``engine.services``, ``engine.history``).

Adding one: subclass :class:`Hook`, decorate with ``@HOOKS.register("name")``, and put it in the list: the
production list is ``kcd_ray.engine.assemble.run_hooks``; tests and drills pass ``("name", {kwargs})`` (or the
class itself) as extra hooks. A data-selection strategy is a hook too, registered as a strategy
(:mod:`kcd_ray.engine.selection`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from kcd_ray.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from kcd_ray.engine.engine import Engine


@dataclass
class Selection:
    """What one hook wants the data pipeline to serve: ``kept`` (bool[N] by sample id, None = all) and the blend
    ``overlay`` manifest (KCD's summary images, or None)."""

    kept: Optional[np.ndarray] = None
    overlay: Optional[dict] = None


class Hook:
    name: str = ""  # key of this hook's state in a checkpoint ("" = stateless)
    # The numeric metrics-row columns it adds in after_epoch (sweeps may name them as metrics), and prefixes of
    # columns it adds per item (e.g. ED's group_top1_<h>).
    columns: tuple[str, ...] = ()
    column_prefixes: tuple[str, ...] = ()

    def before_run(self, engine: "Engine", start_epoch: int) -> None:
        pass

    def before_epoch(self, engine: "Engine", epoch: int) -> None:
        pass

    def data_selection(self, engine: "Engine") -> Optional[Selection]:
        return None

    def universe(self, engine: "Engine") -> Optional[np.ndarray]:
        return None

    def before_step(self, engine: "Engine", batch: dict) -> Optional[dict]:
        return None

    def adjust_loss(self, engine: "Engine", batch: dict, output: Any, loss: Any) -> Any:
        return None

    def after_step(self, engine: "Engine", batch: dict, output: Any) -> None:
        pass

    def after_epoch(self, engine: "Engine", epoch: int, row: dict) -> None:
        pass

    def after_checkpoint(self, engine: "Engine", epoch: int, row: dict) -> None:
        pass

    def end_run(self, engine: "Engine", summary: Optional[dict]) -> None:
        pass

    def pop_compute_counts(self) -> dict[str, int]:
        """Passes this hook ran since the compute ledger last asked (and forgets them): ``student_forward_only``
        (ranking, an offline E-step), ``teacher_forward`` (teacher forwards run) and ``teacher_output`` (teacher
        outputs used, cached or not; ``teacher_forward`` when absent)."""
        return {}

    def state_dict(self) -> Optional[dict]:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass


HOOKS: Registry[type] = Registry("hook")
