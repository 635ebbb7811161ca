"""A 2-rank DDP run of a kd distiller with CTKD's learned temperature (tests/test_logit_rivals.py spawns it).

Its own small module: spawned ranks import only this, torch and kcd_ray.distill.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kcd_ray.config import DistillConfig, TemperatureConfig
from kcd_ray.distill import build_distiller, build_temperature


def _net(seed: int, out: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, out))  # no batch norm: DDP's mean equals the big batch's


def ctkd_distiller():
    d = build_distiller(DistillConfig(method="kd", logit_standardize=True), _net(0), _net(1), 5)
    d.bind_temperature(build_temperature(TemperatureConfig(schedule="ctkd", ctkd_ramp_epochs=2), 3))
    return d


def batches(rank: int) -> list:
    gen = torch.Generator().manual_seed(rank)
    return [(torch.randn(8, 3, 4, 4, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(3)]


def train_theta(d, steps, wrap=lambda m: m) -> float:
    """SGD steps (the engine's optimiser settings) over ``steps``; returns the learned theta."""
    model = wrap(d)
    opt = torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=0.5, momentum=0.9, weight_decay=5e-4)
    for epoch, (x, y) in enumerate(steps):
        loss = sum(model({"image": x, "label": y}, T=4.0, epoch=epoch).losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return d.learned_temperature.theta.item()


def ddp_worker(rank: int, world: int, folder: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    theta = train_theta(ctkd_distiller(), batches(rank),
                        lambda m: DistributedDataParallel(m, find_unused_parameters=m.find_unused_parameters))
    torch.save({"theta": theta}, f"{folder}/r{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
