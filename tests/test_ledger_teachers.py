"""The compute ledger's teacher FLOPs per row: multi-teacher KD runs every teacher on a row, ED one (its group's)."""

from types import SimpleNamespace

import pytest
import torch

from kcd_ray.engine.ledger import ComputeLedger, measure_flops
from kcd_ray.models import build_model


@pytest.mark.parametrize("routes_rows", [False, True])
def test_teacher_flops_per_row_for_several_teachers(routes_rows):
    torch.manual_seed(0)
    teachers = [build_model("resnet8", 4), build_model("resnet8", 4), build_model("resnet14", 4)]
    d = SimpleNamespace(student=build_model("resnet8", 4), teachers=teachers, routes_rows=routes_rows)
    engine = SimpleNamespace(distiller=d, ctx=SimpleNamespace(verbose=0))
    per = ComputeLedger().measure(engine, (3, 8, 8))
    each = [measure_flops(t, (3, 8, 8), backward=False, train=False)[0] for t in teachers]
    expected = sum(each) / 3 if routes_rows else sum(each)  # ED: the mean row's teacher; MTKD: all of them
    assert per["teacher_forward"] == pytest.approx(expected)
    assert each[0] < each[2]  # the deeper teacher costs more: a wrong sum would show
