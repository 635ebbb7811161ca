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


def test_flops_are_counted_once_per_architecture_and_input_size():
    """The count is remembered per architecture and input size (the plan and the ledger ask for the same
    networks; a reused trial process asks again): a second ask is the same figure; another width, input size, or
    a user model whose layers differ under the same class gets its own count."""
    from kcd_ray.engine import ledger

    class Net(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, width, 3)
            self.fc = torch.nn.Linear(width, 10)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    ledger._MEASURED.clear()
    a = measure_flops(build_model("resnet8", 10), (3, 16, 16), backward=True, train=True)
    assert len(ledger._MEASURED) == 1
    assert measure_flops(build_model("resnet8", 10), (3, 16, 16), backward=True, train=True) == a
    assert len(ledger._MEASURED) == 1  # answered from memory
    assert measure_flops(build_model("resnet8", 10), (3, 32, 32), backward=True, train=True)[0] == \
        pytest.approx(4 * a[0], rel=0.01)
    narrow = measure_flops(Net(4), (3, 8, 8), backward=False, train=False)[0]
    wide = measure_flops(Net(8), (3, 8, 8), backward=False, train=False)[0]
    assert wide > narrow > 0 and len(ledger._MEASURED) == 4
