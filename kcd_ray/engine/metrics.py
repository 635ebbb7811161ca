"""Accuracy, epoch records, the console progress line and the end-of-run summary."""

from __future__ import annotations

import sys
import time

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k predictions, for each k (k capped at the class count)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(labels.view(-1, 1))
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


def say(msg: str) -> None:
    """Write a console line. Not `print`: inside a Train worker Ray patches print into a logger that also
    tees to stdout, so every line would show twice."""
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


class Progress:
    """Throttled progress output for one epoch: a line every `every_s` seconds and one at the end."""

    def __init__(self, prefix: str, enabled: bool = True, every_s: float = 10.0, stream=None):
        self.prefix, self.enabled, self.every_s = prefix, enabled, every_s
        self.stream = stream or sys.stdout
        self.t0 = self.last = time.perf_counter()
        self.samples = 0
        self.steps = 0

    def step(self, n: int, loss) -> None:
        """``loss`` may be a device tensor: it is read on the host only when a line is printed."""
        self.samples += n
        self.steps += 1
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            rate = self.samples / max(now - self.t0, 1e-9)
            self.stream.write(f"{self.prefix} step {self.steps} samples {self.samples} loss {float(loss):.4f} "
                              f"{rate:.0f} img/s\n")
            self.stream.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def format_epoch(m: dict) -> str:
    parts = [f"epoch {m['epoch'] + 1}/{m['epochs']}", f"loss {m['train_loss']:.4f}", f"top1 {m['top1']:.2f}",
             f"top5 {m['top5']:.2f}"]
    if m.get("strategy") not in (None, "none"):
        parts.append(f"{m['strategy']} kept {100 * m['kept_fraction']:.1f}%")
    if m.get("stage") is not None:  # KCD's condensation stage
        parts.append(f"stage {m['stage']}")
    if m.get("T") is not None and m.get("kind") == "distill":
        parts.append(f"T {m['T']:.2f}")
    if m.get("grade") is not None:  # education distillation (engine/curriculum.py)
        seen = m.get("seen_class_top1")
        parts.append(f"grade {m['grade']}/{m['grades']}" + ("" if seen is None else f" seen-class top1 {seen:.2f}"))
    parts += [f"lr {m['lr']:.4g}", f"{m['images_per_s']:.0f} img/s", f"{m['epoch_seconds']:.1f}s"]
    return " | ".join(parts)


def _selection(history: list[dict], select: str) -> dict:
    """The best epoch by ``select`` (``run.select``) and what it scored, on validation and on test."""
    chosen = history[-1].get("selected_epoch")
    row = next((r for r in history if r["epoch"] == chosen), None)
    if row is None:  # rows written before run.select existed: by test top-1
        row, select = max(history, key=lambda m: m["top1"]), "top1"
    out = {"selected_by": select, "selected_epoch": row["epoch"], "selected_top1": row["top1"],
           "selected_on_test": not select.startswith("val_")}
    if "val_top1" in row:
        out["selected_val_top1"] = row["val_top1"]
    return out


def _validation(history: list[dict]) -> dict:
    if "val_top1" not in history[-1]:
        return {}
    best = max(history, key=lambda m: m["val_top1"])
    last = history[-1]
    return {"final_val_top1": last["val_top1"], "final_val_top5": last["val_top5"], "final_val_loss": last["val_loss"],
            "best_val_top1": best["val_top1"], "best_val_epoch": best["epoch"]}


def summarize(history: list[dict], *, kind: str, num_train: int, epochs: int, run_dir: str, config: dict,
              strategy_info: dict | None = None, select: str = "top1", planned: dict | None = None) -> dict:
    """The run's summary.json: final and best figures on test (and on validation, with a validation split), the
    epoch ``select`` picks (``selected_*``: best_model.pt), the compute ledger's totals, what trained it;
    ``planned``: the run plan's figures (``planned_compute_ratio``, the budget and what it resolved to)."""
    if not history:
        raise ValueError("no epochs recorded: nothing to summarise")
    best = max(history, key=lambda m: m["top1"])
    last = history[-1]
    passes = int(last["sample_passes"])
    full = int(num_train) * int(epochs)
    sample_ratio = passes / full if full else 0.0
    # The compute ledger (kcd_ray.engine.ledger): compute_ratio is FLOPs against plain KD (every sample, every
    # epoch, the same networks; the teacher left out of both with selection.teacher_paid); without the ledger's
    # fields (older runs) it is the sample-pass ratio.
    paid = bool((config.get("selection") or {}).get("teacher_paid"))
    per_kd = sum(float(last.get(k) or 0.0) for k in ("flops_student_forward", "flops_student_backward")
                 + (() if paid else ("flops_teacher_forward",)))
    full_flops = full * per_kd
    ledger = {k: last[k] for k in ("student_forward_only_passes", "teacher_forward_passes", "teacher_output_passes",
                                    "flops_total",
                                    "flops_student_forward", "flops_student_backward", "flops_teacher_forward")
              if k in last}
    return {
        **_validation(history),
        **_selection(history, select),
        "final_top1": last["top1"],
        "final_top5": last["top5"],
        "best_top1": best["top1"],
        "best_epoch": best["epoch"],
        "sample_passes": passes,
        "full_sample_passes": full,
        "compute_ratio": last["flops_total"] / full_flops if "flops_total" in last and full_flops > 0 else sample_ratio,
        "sample_pass_ratio": sample_ratio,
        **(planned or {}),
        **ledger,
        "full_flops": full_flops,
        "strategy": last.get("strategy", (strategy_info or {}).get("name", "none")),
        "strategy_info": strategy_info or {},
        "wall_seconds": last["wall_seconds"],
        "epochs": epochs,
        "kind": kind,
        "kcd_enabled": last.get("strategy") == "kcd",  # read by reports of older runs; strategy says more
        "num_train": int(num_train),
        "run_dir": run_dir,
        "config": config,
    }
