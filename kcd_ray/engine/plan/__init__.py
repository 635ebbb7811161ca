"""The run plan: every decision a run makes before it trains (``plan_run``), typed and frozen (``RunPlan``),
printable (``describe_plan``) and executed by the Ray layer. No Ray import anywhere in it."""

from kcd_ray.engine.plan.derive import data_plan, derive_plan, local_plan
from kcd_ray.engine.plan.describe import describe_plan
from kcd_ray.engine.plan.prepare import (check_run_name, check_storage, default_run_name, epochs_done,
                                         last_checkpoint, plan_run, resolve_paths)
from kcd_ray.engine.plan.types import (ComputePlan, DataPlan, FolderPlan, InputPlan, ResourcePlan, RunPlan,
                                       SelectionPlan, TeacherPlan)

__all__ = [
    "ComputePlan", "DataPlan", "FolderPlan", "InputPlan", "ResourcePlan", "RunPlan", "SelectionPlan", "TeacherPlan",
    "check_run_name", "check_storage", "data_plan", "default_run_name", "derive_plan", "describe_plan",
    "epochs_done", "last_checkpoint", "local_plan", "plan_run", "resolve_paths",
]
