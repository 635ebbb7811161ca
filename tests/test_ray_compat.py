"""kcd_ray.ray_layer.compat's Ray Data patches, on a real local Ray: applied in every worker process of a kcd_ray
job, and doing what they are for (an execution's first budget read answers its reservation; one map task function
serves every execution of a plan). Their effect on speed is measured by bench/data_ceiling.py (BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from kcd_ray.ray_layer import compat


def test_every_worker_process_of_a_kcd_ray_job_applies_the_data_patches(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0.25)
    def patched() -> tuple:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            DefaultAutoscalingCoordinator,
        )
        from ray.data._internal.execution.operators import task_pool_map_operator

        return (getattr(DefaultAutoscalingCoordinator.get_reserved_resources, "_kcd_patched", False),
                getattr(task_pool_map_operator.cached_remote_fn, "_kcd_patched", False))

    # the session's clusters take only the map-function reuse (conftest: KCD_RAY_DATA_PATCHES=reuse)
    budget = os.environ.get(compat.DATA_PATCHES_ENV, "1") != "reuse"
    assert ray.get([patched.remote() for _ in range(3)]) == [(budget, True)] * 3


def test_an_executions_first_budget_read_answers_its_reservation(ray_session, monkeypatch):
    """What Ray Data's autoscaler does when an execution starts (register with an empty request, then read the
    reservation): unpatched, the first read is always empty (the execution then runs one task at a time for its
    first second); patched, it is the cluster's free share."""
    from ray.data._internal.cluster_autoscaler.base_autoscaling_coordinator import STANDARD_RESOURCE_TYPES
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        DefaultAutoscalingCoordinator as Client,
    )

    monkeypatch.setattr(compat, "FIRST_RESERVATION_WAIT_S", 30.0)  # the coordinator actor may still be starting
    assert compat.prompt_data_budget()  # in this (the driver's) process

    def registered() -> Client:
        client = Client(requester_id=f"data-kcd-test-{uuid.uuid4().hex}")
        client.request_resources(resources=[], expire_after_s=60, request_remaining=STANDARD_RESOURCE_TYPES)
        return client

    unpatched = registered()
    try:
        assert Client.get_reserved_resources.__wrapped__(unpatched) == {}
    finally:
        unpatched.cancel_request()
    client = registered()
    try:
        reserved = client.get_reserved_resources()
        assert sum(r.get("CPU", 0) for r in reserved.values()) > 0, reserved
    finally:
        client.cancel_request()


def test_executions_of_one_plan_share_one_map_task_function(ray_session):
    ray = ray_session
    from ray.data._internal.execution.operators.map_operator import _map_task
    from ray.data._internal.remote_fn import CACHED_FUNCTIONS

    def map_functions() -> int:
        return sum(1 for fn, _ in CACHED_FUNCTIONS if fn is _map_task)

    ds = ray.data.range(8, override_num_blocks=2).map_batches(lambda b: b, batch_size=4, num_cpus=0.25)
    assert sum(len(b["id"]) for b in ds.iter_batches(batch_size=None)) == 8
    before = map_functions()
    for _ in range(3):  # three epochs of one plan: unpatched, each defines (and exports) a function of its own
        assert sum(len(b["id"]) for b in ds.iter_batches(batch_size=None)) == 8
    assert map_functions() == before


@pytest.mark.parametrize("submitted, hook", [
    (None, compat.SETUP_HOOK),
    ({"runtime_env": {"pip": ["x"]}}, compat.SETUP_HOOK),
    ({"runtime_env": {"worker_process_setup_hook": "their.hook"}}, None),
])
def test_the_job_runtime_env_sets_the_hook_unless_a_submitted_job_has_one(monkeypatch, submitted, hook):
    if submitted is None:
        monkeypatch.delenv(compat.JOB_CONFIG_ENV, raising=False)
    else:
        monkeypatch.setenv(compat.JOB_CONFIG_ENV, json.dumps(submitted))
    env = compat.job_runtime_env()
    assert (env or {}).get("worker_process_setup_hook") == hook


def test_the_data_patches_can_be_turned_off_or_narrowed(monkeypatch):
    monkeypatch.setenv(compat.DATA_PATCHES_ENV, "0")
    assert compat.quick_data_executions() is False
    for choice in ("reuse", "1"):
        monkeypatch.setenv(compat.DATA_PATCHES_ENV, choice)
        assert compat.quick_data_executions() is True
