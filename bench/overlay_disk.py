"""Disk used by a run's VAKS blend overlays, all versions kept (as before pruning existed) against pruned (now).

Runs the condenser's M-step sequence of a CIFAR-sized run without training: the real ``KCDState`` (rho,
stages, summary blends) with seeded random scores, the real overlay writer (``BlendOverlays.write``) on a
prepared synthetic set, and after each condensation's checkpoint the pruning the condenser does
(``BlendOverlays.prune``: the versions the kept checkpoints reference). Scores do not change what is written per version
(every condensation blends its whole tail), so the sizes are those of a real run with the same schedule.

    .venv/bin/python bench/overlay_disk.py                       # synthetic 50k at 32x32, rho 0.7, 6 stages
    .venv/bin/python bench/overlay_disk.py --num-train 5000      # quicker
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kcd_ray.condense import KCDState  # noqa: E402
from kcd_ray.config import load_config  # noqa: E402
from kcd_ray.data import prepare_dataset  # noqa: E402
from kcd_ray.data.blend import BlendOverlays  # noqa: E402


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def run(data_dir: str, folder: Path, n: int, args, prune: bool) -> list[int]:
    state = KCDState(n, interval=1, rho=args.rho, stages=args.stages, summary=True, seed=0)
    overlays = BlendOverlays(folder, data_dir)
    rng = np.random.default_rng(0)
    sizes = []
    for epoch in range(1, args.stages + 1):
        state.observe(np.arange(n), rng.random(n).astype(np.float32))
        state.end_epoch()
        result = state.maybe_condense(epoch)
        overlays.write(result.version, result.tail_ids, result.lost_ids, result.weights)
        if prune:  # what the condenser does once the epoch's checkpoint references the new version: keep the
            # versions the kept checkpoints reference (run.checkpoints_to_keep; one condensation per epoch here)
            overlays.prune(keep_versions=list(range(max(1, state.version - args.checkpoints_to_keep + 1),
                                                    state.version + 1)))
        sizes.append(overlays.disk_bytes())
    if prune:  # the end of the run: only what the final checkpoint references
        overlays.prune(keep_versions=[state.version])
        sizes.append(overlays.disk_bytes())
    return sizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-train", type=int, default=50_000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--rho", type=float, default=0.7)
    p.add_argument("--stages", type=int, default=6)
    p.add_argument("--checkpoints-to-keep", type=int, default=2, help="run.checkpoints_to_keep (default 2)")
    p.add_argument("--workdir", default="")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kcd_overlay_disk_"))
    cfg = load_config(base={"data": {"name": "synthetic", "root": str(work / "data"), "synthetic": {
        "num_train": args.num_train, "num_test": 100, "num_classes": 10, "image_size": args.image_size}}})
    t0 = time.perf_counter()
    data_dir = str(prepare_dataset(cfg.data, verbose=False))
    data_bytes = sum(f.stat().st_size for f in (Path(data_dir) / "train").glob("*.parquet"))
    print(f"prepared {args.num_train} x {args.image_size}x{args.image_size} in {time.perf_counter() - t0:.0f}s "
          f"(train Parquet {mib(data_bytes)}); rho {args.rho}, {args.stages} stages")
    rows = {}
    for name, prune in (("keep all versions (before)", False),
                        (f"pruned to the last {args.checkpoints_to_keep} checkpoints' versions (now)", True)):
        folder = work / ("pruned" if prune else "all")
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        rows[name] = run(data_dir, folder, args.num_train, args, prune)
        print(f"{name}: blends folder after each condensation (then at the end of the run) "
              f"{[mib(s) for s in rows[name]]} ({time.perf_counter() - t0:.0f}s)")
    before, after = (rows[k][-1] for k in rows)
    print(f"end of run: {mib(before)} -> {mib(after)} (ratio {after / before:.3f})")


if __name__ == "__main__":
    main()
