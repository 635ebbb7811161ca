"""Entry point for running kcd_ray on a running Ray cluster, through `ray submit`:

    ray submit cluster.yaml experiments/submit.py -- distill --config experiments/cifar100/resnet32x4-resnet8x4/kcd.yaml
    ray submit cluster.yaml experiments/submit.py -- teacher --config experiments/cifar100/teachers/resnet32x4.yaml
    ray submit cluster.yaml experiments/submit.py -- sweep   --config experiments/sweeps/rho.yaml num_samples=2
    ray submit cluster.yaml experiments/submit.py -- report  /mnt/efs/kcd_ray/runs/sweeps/rho

`ray submit` uploads only this file to the head node and runs it there; kcd_ray itself reaches every
node through cluster.yaml (file_mounts of the repository + `pip install -e`). The script attaches to
the cluster (RAY_ADDRESS, else "auto"; it never starts a Ray of its own) and works from a shared
work folder (--workdir, default $KCD_RAY_WORKDIR or /mnt/efs/kcd_ray: the EFS mount of cluster.yaml),
so the recipes' relative paths (./data, ./save/models/..., ./runs/...) name shared storage that every
node sees. Relative --config paths are looked up in the work folder, then in the repository.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = os.environ.get("KCD_RAY_WORKDIR", "/mnt/efs/kcd_ray")

try:
    import kcd_ray  # noqa: F401
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))


def _find_config(path: str) -> str:
    """A relative config path: the work folder first, then the checkout (~/kcd_ray on cluster nodes)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return str(p.resolve())
    import kcd_ray

    for root in (Path(kcd_ray.__file__).resolve().parent.parent, REPO, Path.home() / "kcd_ray"):
        if (root / p).exists():
            return str(root / p)
    raise FileNotFoundError(f"--config {path}: not found in {Path.cwd()} nor in the kcd_ray checkout")


def _attach(address: str | None) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Attach only: "auto" fails when no cluster runs instead of silently starting a local Ray.
    from kcd_ray.ray_layer import compat

    ray.init(address=address, log_to_driver=True, runtime_env=compat.job_runtime_env())
    res = ray.cluster_resources()
    print(f"[submit] attached to {address}: {len([n for n in ray.nodes() if n['Alive']])} nodes, "
          f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("distill", "teacher", "sweep", "report"))
    ap.add_argument("--config", "-c", help="recipe (distill/teacher) or sweep file (sweep)")
    ap.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else 'auto')")
    ap.add_argument("--workdir", default=DEFAULT_WORKDIR,
                    help="shared folder to work in; relative paths in recipes resolve here (default %(default)s)")
    ap.add_argument("--storage-path", default=None,
                    help="run folders (default: the recipe's run.storage_path, relative to --workdir); sweeps: "
                         "the folder holding sweep folders")
    ap.add_argument("args", nargs="*", metavar="key=value",
                    help="dotted config overrides (sweeps: also sweep keys); report: the sweep or run folder")
    args = ap.parse_intermixed_args(argv)
    if args.command == "report":
        if len(args.args) != 1:
            ap.error("report takes one folder: the sweep or run folder")
        from kcd_ray.report import report

        print(report(args.args[0])["text"], flush=True)
        return 0
    bad = [x for x in args.args if "=" not in x]
    if bad:
        ap.error(f"overrides take the form key=value, got: {' '.join(bad)}")
    args.overrides = args.args
    if not args.config:
        ap.error(f"{args.command} needs --config")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)
    config = _find_config(args.config)
    _attach(args.address)

    if args.command == "sweep":
        from kcd_ray.report import report
        from kcd_ray.ray_layer.tune.sweep import run_sweep

        folder = run_sweep(config, overrides=args.overrides, storage_path=args.storage_path)
        print(report(folder)["text"], flush=True)
        return 0

    from kcd_ray.config import config_from_dict, load_config, to_dict
    from kcd_ray.ray_layer.trainer import fit
    from kcd_ray.sweeps.spec import absolute_paths

    overrides = list(args.overrides) + ([f"run.storage_path={args.storage_path}"] if args.storage_path else [])
    # Absolute paths: Train workers run in their own folders, on other nodes.
    cfg = config_from_dict(absolute_paths(to_dict(load_config(config, overrides)), Path.cwd()))
    summary = fit(cfg, kind="teacher" if args.command == "teacher" else "distill")
    print(f"[submit] {args.command} done: final top-1 {summary['final_top1']:.2f}, best {summary['best_top1']:.2f}, "
          f"compute ratio {summary['compute_ratio']:.3f}; run folder {summary.get('run_dir', '')}", flush=True)
    return 0


if __name__ == "__main__":
    from kcd_ray.config import ConfigError

    try:
        raise SystemExit(main())
    except (ConfigError, FileNotFoundError) as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
