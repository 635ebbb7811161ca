"""A run plan in words: what ``kcd-ray distill --dry-run`` prints, so a user checks a job before paying for it."""

from __future__ import annotations

from kcd_ray.engine.plan.types import RunPlan


def _mflops(x: float) -> str:
    return f"{x / 1e6:.3g} MFLOPs" if x else "not measured"


def _fractions(xs) -> str:
    """Per-epoch shares, run-length encoded: ``1.0 x40, 0.95 x40``."""
    out, prev, n = [], None, 0
    for x in list(xs) + [None]:
        if x is not None and prev is not None and abs(x - prev) < 1e-12:
            n += 1
            continue
        if prev is not None:
            out.append(f"{prev:.3g} x{n}")
        prev, n = x, 1
    return ", ".join(out)


def _run_line(plan: RunPlan) -> str:
    f, epochs = plan.folder, plan.cfg.optim.epochs
    if f.replace:
        state = "starts afresh (run.resume=never: the existing folder is moved aside)"
    elif f.start == "new":
        state = "new run"
    else:
        state = f"resumes after epoch {f.start_epoch} of {epochs} from {f.checkpoint}"
        if f.changes:
            state += "; accepted changes: " + ", ".join(f"{k} {o!r} -> {n!r}" for k, o, n in f.changes)
    return f"run        {f.name} ({state})"


def _teacher_lines(plan: RunPlan) -> list[str]:
    t = plan.teacher
    if plan.kind != "distill":
        return ["teacher    none (a teacher run: cross-entropy on the labels)"]
    files = ", ".join(f"{k}={p}" for k, p in t.files) or "-"
    lines = [f"teacher    {files}; {'in the loop' if t.in_loop else 'not loaded by the workers'}"]
    for g, path, tcfg in t.to_train:
        lines.append(f"           group {g} teacher to train first: {tcfg.model}, {tcfg.optim.epochs} epochs -> {path}")
    if plan.cache is not None or plan.cache_note:
        lines.append(f"cache      {plan.cache_note}" + (f" in {plan.cache.dir or 'the data set folder'}"
                                                        if plan.cache is not None else ""))
    return lines


def _resources_line(plan: RunPlan) -> str:
    r = plan.resources
    gpu = {"true": "a GPU each", "false": "no GPU", "auto": "a GPU each if the cluster has GPUs"}[r.use_gpu]
    if r.num_workers == 0:
        who = "in the driver process (scaling.num_workers=0)"
    else:
        n = f"{r.min_workers}-{r.num_workers}" if r.elastic else str(r.num_workers)
        who = f"{n} Ray Train worker(s) x {r.cpus_per_worker:g} CPU, {gpu}"
    return f"resources  {who}; {r.data_cpus:g} CPU per Ray Data task"


def describe_plan(plan: RunPlan) -> str:
    cfg, d, s, c = plan.cfg, plan.data, plan.selection, plan.compute
    h, w, ch = d.image_shape
    what = "train a teacher" if plan.kind == "teacher" else f"distil with {cfg.distill.method}"
    params = ", ".join(f"{k.split('.', 1)[-1] if k.startswith('selection.') else k}={v}" for k, v in s.params.items())
    lines = [
        f"kcd-ray {plan.kind} plan (dry run: nothing trained, Ray not started)",
        _run_line(plan),
        f"model      {cfg.model}, {cfg.optim.epochs} epochs, batch {s.feed_batch_size} per worker; {what}",
        f"data       {d.name}: {d.num_train} train / " + (f"{d.num_val} validation / " if d.num_val else "")
        + f"{d.num_test} test images, {d.num_classes} classes, "
        f"{h}x{w}x{ch}, augment {d.augment} on {plan.inputs.augment_on}, shuffle {plan.inputs.shuffle}",
        *_teacher_lines(plan),
        f"strategy   {s.info.get('label', s.name)}" + (f" ({params})" if params else ""),
        f"           planned trained share per epoch: {_fractions(s.trained)}",
        *([f"budget     selection.budget={s.budget:g} of plain KD's compute sets "
           + ", ".join(f"{k}={v}" for k, v in s.resolved.items())] if s.budget is not None else []),
        f"compute    expected compute ratio {c.planned_compute_ratio:.3f} of plain KD's FLOPs (sample-pass ratio "
        f"{c.planned_sample_ratio:.3f}); per sample: student {_mflops(c.student_forward + c.student_backward)} "
        f"forward+backward, teacher {_mflops(c.teacher_forward)} forward",
        _resources_line(plan),
        f"files      run folder {plan.folder.where} (config.yaml, metrics.jsonl, summary.json, checkpoints); "
        f"data {d.uri or d.dir}",
    ]
    if plan.inputs.passes is not None:
        lines.insert(5, f"           sequential passes over {max(plan.inputs.passes)} class groups per epoch")
    return "\n".join(lines)
