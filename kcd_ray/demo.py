"""`kcd-ray demo`: a real, offline distillation on scikit-learn's handwritten digits.

Trains (or reuses) a teacher, distils the same student with plain KD and with KCD, prints a comparison
table and writes ``demo.png`` (test top-1 against epochs and against cumulative compute, and the kept fraction per
epoch, for both runs). A validation split (a fifth of the training images) is carved out and reported beside test.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kcd_ray.config import load_config

DEMO_BASE = {
    "data": {"name": "digits", "image_size": 16, "val_fraction": 0.2},
    "optim": {"batch_size": 64, "lr": 0.05, "scheduler": "cosine", "eval_batch_size": 512},
    "scaling": {"num_workers": 1, "cpus_per_worker": 1.0},
    "run": {"verbose": 1},
}
TEACHER = {"model": "resnet20", "optim": {"epochs": 15}}
# The recipe scaled to a short run: 6 stages, one condensation every `interval` epochs, rho 0.7.
STUDENT = {"model": "resnet8", "optim": {"epochs": 18},
           "distill": {"method": "kd"}, "kcd": {"interval": 3, "stages": 6, "rho": 0.7}}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def _configs(out: Path, epochs: int | None, overrides: list[str]):
    storage = {"run": {"storage_path": str(out)}}
    teacher = load_config(base=_merge(_merge(DEMO_BASE, TEACHER), _merge(storage, {"run": {"name": "teacher"}})))
    student = _merge(_merge(DEMO_BASE, STUDENT), storage)
    student["distill"]["teacher"] = str(out / "teacher" / "final_model.pt")
    if epochs:
        student["optim"]["epochs"] = epochs
        student["kcd"]["interval"] = max(1, epochs // 6)
    kd = load_config(base=_merge(student, {"kcd": {"enabled": False}, "run": {"name": "kd"}}), overrides=overrides)
    kcd = load_config(base=_merge(student, {"kcd": {"enabled": True}, "run": {"name": "kcd"}}), overrides=overrides)
    return teacher, kd, kcd


def run_demo(args) -> dict:
    from kcd_ray.ray_layer.trainer import fit

    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    teacher_cfg, kd_cfg, kcd_cfg = _configs(out, args.epochs, list(args.overrides or []))
    size = teacher_cfg.data.image_size
    print(f"[demo] 1/3 teacher {teacher_cfg.model} on digits {size}x{size} "
          "(reused if already trained)", flush=True)
    t_sum = fit(teacher_cfg, kind="teacher")
    print(f"[demo] 2/3 student {kd_cfg.model}, plain KD", flush=True)
    kd_sum = fit(kd_cfg, kind="distill")
    print(f"[demo] 3/3 student {kcd_cfg.model}, KD + KCD (rho {kcd_cfg.kcd.rho}, every {kcd_cfg.kcd.interval} "
          "epochs)", flush=True)
    kcd_sum = fit(kcd_cfg, kind="distill")

    rows = [("teacher " + teacher_cfg.model, t_sum), ("KD " + kd_cfg.model, kd_sum),
            ("KD+KCD " + kcd_cfg.model, kcd_sum)]
    print("\n{:<22} {:>8} {:>8} {:>8} {:>14} {:>9} {:>9}".format("run", "val top1", "top1", "best", "sample-passes",
                                                                "compute", "wall s"))
    for label, s in rows:
        print("{:<22} {:>8.2f} {:>8.2f} {:>8.2f} {:>14d} {:>9.3f} {:>9.1f}".format(
            label, s.get("final_val_top1", float("nan")), s["final_top1"], s["best_top1"], s["sample_passes"],
            s["compute_ratio"], s["wall_seconds"]))
    print("(top1: the last epoch's test top-1; best: the best epoch's, for reference only: choose on val top1)")
    from kcd_ray.engine.rundir import RunDir

    from kcd_ray.plots import compare_plot

    png = compare_plot({"KD": RunDir(out / "kd").read_metrics(), "KD+KCD": RunDir(out / "kcd").read_metrics()},
                       out / "demo.png", f"digits: {teacher_cfg.model} -> {kd_cfg.model}")
    result = {"teacher": t_sum, "kd": kd_sum, "kcd": kcd_sum, "plot": str(png),
              "total_seconds": time.perf_counter() - t_all}
    (out / "demo.json").write_text(json.dumps({k: v for k, v in result.items()}, indent=2, default=str))
    print(f"\n[demo] plot: {png}\n[demo] total {result['total_seconds']:.0f}s", flush=True)
    return result
