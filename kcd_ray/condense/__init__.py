"""The pure KCD core (no Ray): E-step values + OGVE, the condensation schedule, selection + VAKS, the run state.

E-step: :mod:`.values` (instant values; every function takes a :class:`.values.ValueContext` built by
:func:`.values.make_context`) -> :class:`.ogve.ValueAccumulator` (global history, calibrated scores).
M-step: :meth:`.state.KCDState.maybe_condense` -> :mod:`.vaks` (top-K selection, ties broken by a permutation
seeded from (kcd.seed, stage); summary plan; uint8 blend).
"""

from kcd_ray.condense.ogve import ValueAccumulator
from kcd_ray.condense.schedule import CondensationSchedule
from kcd_ray.condense.state import CondensationResult, KCDState, mask_version, read_mask
from kcd_ray.condense.values import VALUE_FNS, ValueContext, make_context, needs_labels, needs_teacher
from kcd_ray.condense.vaks import blend_uint8, rank, select, summary_plan, tie_break_rng

__all__ = [
    "VALUE_FNS", "ValueContext", "make_context", "needs_teacher", "needs_labels", "ValueAccumulator",
    "CondensationSchedule", "rank", "select", "tie_break_rng", "summary_plan", "blend_uint8",
    "KCDState", "CondensationResult", "read_mask", "mask_version",
]
