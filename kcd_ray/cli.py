"""`kcd-ray`: prepare data, train teachers, distil with KCD, run the demo, sweep with Ray Tune, report."""

from __future__ import annotations

import argparse
import sys

from kcd_ray.config import ConfigError, describe, dump_yaml, format_described, load_config

OVERRIDES_HELP = "dotted config overrides, e.g. kcd.rho=0.7 optim.epochs=10 scaling.num_workers=2"


def _add_config_args(p: argparse.ArgumentParser, dry_run: bool = False) -> None:
    p.add_argument("--config", "-c", help="YAML config file (see experiments/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    if dry_run:
        p.add_argument("--dry-run", action="store_true",
                       help="print the run's plan (what trains, from which teacher, with which strategy, at what "
                            "expected compute ratio, with which resources, where files go) without starting Ray; "
                            "prepares the data set if needed")


def _cfg(args):
    return load_config(args.config, args.overrides)


def cmd_prepare(args) -> int:
    from kcd_ray.data.prepare import main_prepare

    main_prepare(_cfg(args), force=args.force)
    return 0


def _run(args, kind: str) -> int:
    """Plan the run (no Ray); print the plan with --dry-run, else execute it."""
    from kcd_ray.engine.plan import describe_plan, plan_run

    plan = plan_run(_cfg(args), kind)
    if args.dry_run:
        print(describe_plan(plan), flush=True)
        return 0
    from kcd_ray.ray_layer.trainer import execute

    execute(plan)
    return 0


def cmd_train_teacher(args) -> int:
    return _run(args, "teacher")


def cmd_distill(args) -> int:
    return _run(args, "distill")


def cmd_cache_teacher(args) -> int:
    from kcd_ray.ray_layer.teacher_cache import build_for_config

    build_for_config(_cfg(args))
    return 0


def cmd_demo(args) -> int:
    from kcd_ray.demo import run_demo

    run_demo(args)
    return 0


def cmd_config(args) -> int:
    if args.list:
        print(format_described(describe()))
    else:
        print(dump_yaml(_cfg(args)), end="")
    return 0


def cmd_models(args) -> int:
    import yaml

    from kcd_ray.models import MODELS, feature_shapes
    from kcd_ray.models.sources import source_kind, torchvision_names

    if not args.nodes:
        print("zoo: " + ", ".join(MODELS.names()))
        print("torchvision: torchvision/<name>, <name> one of " + ", ".join(torchvision_names()))
        print("factory: package.module:callable, called as callable(num_classes=..., **model_kwargs)")
        print("taps of one: kcd-ray models --nodes NAME [--kwargs '{image_size: 32}']")
        return 0
    kwargs = yaml.safe_load(args.kwargs) if args.kwargs else {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--kwargs: expected a mapping, got {args.kwargs!r}")
    if source_kind(args.nodes) in (None, "zoo"):
        MODELS.get(args.nodes)  # KeyError listing the zoo
        shapes = feature_shapes(args.nodes, args.num_classes, args.image_size)
        print(f"{args.nodes}: a zoo model with fixed taps; feats at {args.image_size}px: {shapes}")
        return 0
    from kcd_ray.models.taps import node_listing

    print("\n".join(node_listing(args.nodes, args.num_classes, kwargs, args.taps or ())))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kcd-ray", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("prepare-data", help="convert a data set to Parquet (idempotent)",
                       description="Convert digits, synthetic, CIFAR-10/100 pickles or an image folder to kcd_ray's "
                                   "Parquet format.")
    _add_config_args(s)
    s.add_argument("--force", action="store_true", help="rebuild even if a valid prepared copy exists")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("train-teacher", help="train a network with cross-entropy on Ray Train",
                       description="Teacher (or plain student) training: DDP on Ray Train, resumable by run.name.")
    _add_config_args(s, dry_run=True)
    s.set_defaults(func=cmd_train_teacher)

    s = sub.add_parser("distill", help="distil a student from a teacher, with KCD unless kcd.enabled=false",
                       description="Knowledge distillation on Ray Train with the KCD E-step/M-step; resumable by "
                                   "run.name.")
    _add_config_args(s, dry_run=True)
    s.set_defaults(func=cmd_distill)

    s = sub.add_parser("cache-teacher", help="build the teacher-output cache a distill config reads (distill.cache)",
                       description="Ray Data batch inference of the teacher over every view a run shows (exact: each "
                                   "epoch's augmentation; views: K per sample); resumable, shared by runs and sweeps.")
    _add_config_args(s)
    s.set_defaults(func=cmd_cache_teacher)

    s = sub.add_parser("demo", help="offline end-to-end demo on the digits data: teacher, KD and KCD, table and plot",
                       description="Trains (or reuses) a teacher on scikit-learn's digits, distils a student with "
                                   "plain KD and with KCD, prints a comparison table and writes a PNG.")
    s.add_argument("--out", default="./runs/demo", help="output folder (default ./runs/demo)")
    s.add_argument("--epochs", type=int, default=None, help="student epochs (default from the demo config)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP + " (applied to both student runs)")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("models", help="list the model names, or one model's graph nodes and feature taps",
                       description="Without --nodes: the zoo's names and how to name torchvision models and factories. "
                                   "With --nodes NAME: the model's graph nodes (train mode), its default taps marked.")
    s.add_argument("--nodes", metavar="NAME", help="a model name: zoo, torchvision/<name> or package.module:callable")
    s.add_argument("--kwargs", help="constructor arguments as YAML/JSON, e.g. '{image_size: 32}' (model_kwargs)")
    s.add_argument("--taps", nargs="*", help="own taps to check and mark instead of the defaults")
    s.add_argument("--num-classes", type=int, default=1000, help="classes of the built model (default 1000)")
    s.add_argument("--image-size", type=int, default=32, help="zoo models: input size of the shapes shown (32)")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("config", help="print the resolved config, or list every key with --list")
    _add_config_args(s)
    s.add_argument("--list", action="store_true", help="list every config key, its type, default and meaning")
    s.set_defaults(func=cmd_config)

    from kcd_ray import report as _report
    from kcd_ray.ray_layer.tune import sweep as _sweep

    s = sub.add_parser("sweep", help="Ray Tune sweep over config fields from a sweep YAML",
                       description="Run a Ray Tune sweep (grid/random/optuna, optional ASHA); re-run to restore.")
    _sweep.add_sweep_arguments(s)
    s.set_defaults(func=_sweep.main_sweep)
    s = sub.add_parser("report", help="table, CSV, Pareto plot and best config of a sweep or run folder",
                       description="Summarise a sweep folder (Pareto front of top-1 vs compute) or a single run; "
                                   "several sweep folders: one Pareto plot of the strategies, seeds averaged.")
    _report.add_report_arguments(s)
    s.set_defaults(func=_report.main_report)
    return p


def main(argv: list[str] | None = None) -> int:
    """Every failure is one line on stderr (the traceback, when there is one, in the run folder's error.log):
    exit 2 for bad input or files, 1 for anything else (``internal error`` unless it is the machine's:
    ``EnvironmentProblem``), 130 for Ctrl-C."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"kcd-ray: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"kcd-ray: {e.args[0] if e.args else 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line, whatever raised it (the run folder keeps the traceback)
        from kcd_ray.errors import USER_ERRORS, EnvironmentProblem, one_line

        kind = "error" if isinstance(e, (*USER_ERRORS, EnvironmentProblem)) else "internal error"
        print(f"kcd-ray: {kind}: {one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, USER_ERRORS) else 1


if __name__ == "__main__":
    sys.exit(main())
