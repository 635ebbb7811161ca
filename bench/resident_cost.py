"""What Ray's resident worker processes cost a CPU-bound training step on this host.

A plain PyTorch loop (resnet8x4, batch 64, in-memory tensors, ``--threads`` torch threads) trains in this process
while an embedded local Ray (``compat.start_local_ray``, as kcd_ray's own) holds ``--actors`` idle actors: the
resident processes a Ray Train + Ray Data run keeps (controller, synchronisation and dataset actors, Ray Data's
stats actor and autoscaling coordinator, the placement-group cleaner, kcd_ray's MaskStore, idle task workers)
do next to nothing most of the time, but each wakes every 10 ms (Ray's core worker checks for signals at a fixed
period). The epochs alternate between the actors running and the same actors stopped (SIGSTOP: no CPU at all),
so the baseline is measured in the same run, right next to each measured epoch; Ray's daemons (GCS, raylet,
agents) run in both arms.

    .venv/bin/python bench/resident_cost.py                 # 12 idle actors, 7 pairs of epochs
    .venv/bin/python bench/resident_cost.py --actors 0      # Ray's daemons alone

Prints each pair and the median ratio running / stopped.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kcd_ray.models import build_model  # noqa: E402

ROWS, BATCH = 768, 64


class Loop:
    """A plain SGD loop over fixed random tensors: the step is all there is."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(ROWS, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 100, (ROWS,), generator=g)
        self.model = build_model("resnet8x4", 100)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)

    def epoch(self) -> float:
        t0 = time.perf_counter()
        for i in range(0, ROWS, BATCH):
            loss = torch.nn.functional.cross_entropy(self.model(self.x[i:i + BATCH]), self.y[i:i + BATCH])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return ROWS / (time.perf_counter() - t0)


def start_idle_actors(n: int) -> tuple[list, list[int]]:
    """Start ``n`` idle actors on kcd_ray's embedded local Ray: their handles (keep them: an actor whose handle is
    gone ends) and process ids."""
    import ray

    from kcd_ray.ray_layer import compat

    compat.start_local_ray(2)

    @ray.remote(num_cpus=0)
    class Idle:
        def pid(self) -> int:
            return os.getpid()

    actors = [Idle.remote() for _ in range(n)]
    return actors, ray.get([a.pid.remote() for a in actors])


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        os.kill(pid, sig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--actors", type=int, default=12)
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loop = Loop()
    loop.epoch()  # warm-up
    actors, pids = start_idle_actors(args.actors)  # noqa: F841 - the handles keep the actors alive
    time.sleep(3)
    ratios = []
    for p in range(args.pairs):
        running = loop.epoch()
        signal_all(pids, signal.SIGSTOP)
        try:
            stopped = loop.epoch()
        finally:
            signal_all(pids, signal.SIGCONT)
        ratios.append(running / stopped)
        print(f"pair {p}: {args.actors} idle actors running {running:.0f} img/s, stopped {stopped:.0f} img/s, "
              f"ratio {ratios[-1]:.3f}", flush=True)
    print(f"{args.actors} idle Ray actors: median ratio running / stopped {statistics.median(ratios):.3f} over "
          f"{len(ratios)} pairs (Ray's daemons running in both)")


if __name__ == "__main__":
    main()
