"""In-process run checkpoints (no Ray): the student and the run state always come from the same epoch."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from kcd_ray.condense.state import KCDState
from kcd_ray.config import DistillConfig
from kcd_ray.distill import build_distiller
from kcd_ray.models import build_model
from kcd_ray.engine.checkpoint import latest_local_checkpoint, load_run_checkpoint, save_local_checkpoint


def _parts(epoch: int):
    torch.manual_seed(epoch)
    student, teacher = build_model("resnet8", 5), build_model("resnet8", 5)
    d = build_distiller(DistillConfig(method="kd"), student, teacher, 5, image_size=8)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    kcd = KCDState(10, interval=1, rho=0.5, stages=2)
    kcd.observe(np.arange(10), np.full(10, float(epoch), np.float32))
    return dict(distiller=d, optimizer=opt, scheduler=torch.optim.lr_scheduler.StepLR(opt, 1), scaler=None,
                hooks={"kcd": kcd.state_dict()}, run_state={"epoch": epoch}, config={})


def _epoch_of(folder):
    state = load_run_checkpoint(folder)
    return state["run"]["epoch"], state["student"]


def test_local_checkpoint_is_replaced_whole_and_survives_a_crash_mid_swap(tmp_path):
    folder = tmp_path / "local_checkpoint"
    assert latest_local_checkpoint(folder) is None
    save_local_checkpoint(folder, **_parts(0))
    save_local_checkpoint(folder, **_parts(1))
    epoch, weights = _epoch_of(latest_local_checkpoint(folder))
    assert epoch == 1
    expect = _parts(1)["distiller"].student.state_dict()
    assert all(torch.equal(weights[k], expect[k]) for k in expect)  # model.pt from the same epoch as state.pt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local_checkpoint"]  # no leftovers

    # A crash after the old folder was moved aside but before the new one was renamed in: the old one is used,
    # and the half-written new one is never read.
    os.replace(folder, tmp_path / "local_checkpoint.prev")
    (tmp_path / "local_checkpoint.partial").mkdir()
    (tmp_path / "local_checkpoint.partial" / "model.pt").write_bytes(b"half")
    assert latest_local_checkpoint(folder) == tmp_path / "local_checkpoint.prev"
    assert _epoch_of(latest_local_checkpoint(folder))[0] == 1
    save_local_checkpoint(folder, **_parts(2))  # the next save cleans both up
    assert _epoch_of(latest_local_checkpoint(folder))[0] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local_checkpoint"]


def test_a_folder_without_state_is_not_a_checkpoint(tmp_path):
    (tmp_path / "local_checkpoint").mkdir()
    (tmp_path / "local_checkpoint" / "model.pt").write_bytes(b"x")
    assert latest_local_checkpoint(tmp_path / "local_checkpoint") is None
    with pytest.raises(Exception, match="state.pt"):
        load_run_checkpoint(tmp_path / "local_checkpoint")



class _RunsCode:
    """A pickle that would run code when loaded with weights_only=False."""

    def __reduce__(self):
        return (os.makedirs, (os.environ["KCD_TEST_MARKER"],))


def test_run_state_loads_weights_only_and_refuses_code(tmp_path, monkeypatch):
    from kcd_ray.models import CheckpointError

    folder = tmp_path / "local_checkpoint"
    save_local_checkpoint(folder, **_parts(3))
    state = load_run_checkpoint(folder)  # numpy arrays of the KCD state are allow-listed
    assert isinstance(state["hooks"]["kcd"]["kept"], np.ndarray) and state["run"]["epoch"] == 3
    marker = tmp_path / "pwned"
    monkeypatch.setenv("KCD_TEST_MARKER", str(marker))
    bad = torch.load(folder / "state.pt", weights_only=False)
    bad["run"]["payload"] = _RunsCode()
    torch.save(bad, folder / "state.pt")
    with pytest.raises(CheckpointError, match=r"state.pt: refused: loading it would import os.makedirs \(only tensors"):
        load_run_checkpoint(folder)
    assert not marker.exists()  # nothing ran
