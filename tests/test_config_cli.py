"""Typed configs (YAML + dotted overrides, one-line errors naming the key) and the `kcd-ray` CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kcd_ray.cli import build_parser, main
from kcd_ray.config import ConfigError, describe, dump_yaml, load_config, to_dict


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: resnet20\noptim:\n  epochs: 7\nkcd:\n  rho: 0.5\n")
    cfg = load_config(f, ["kcd.rho=0.8", "optim.milestones=[3,5]", "distill.temperature.schedule=cosine"])
    assert cfg.model == "resnet20" and cfg.optim.epochs == 7 and cfg.kcd.rho == 0.8
    assert cfg.optim.milestones == [3, 5] and cfg.distill.temperature.schedule == "cosine"
    assert load_config(base=yaml_roundtrip(cfg)) == cfg


def yaml_roundtrip(cfg):
    import yaml

    return yaml.safe_load(dump_yaml(cfg))


@pytest.mark.parametrize("override, fragment", [
    ("kcd.rhoo=0.5", "kcd.rhoo: unknown key"),
    ("optim.epochs=ten", "optim.epochs: expected an integer"),
    ("kcd.rho=1.5", "kcd.rho: 1.5 is out of range; expected <= 1"),
    ("model=resnet9000", "model: 'resnet9000' is not one of:"),
    ("data.name=mnist", "data.name: 'mnist' is not one of:"),
    ("distill.method=kdd", "distill.method: 'kdd' is not one of:"),
    ("kcd.value_fn=loss", "kcd.value_fn: 'loss' is not one of:"),
    ("kcd.enabled=maybe", "kcd.enabled: expected true or false"),
    ("optim", "overrides take the form dotted.key=value"),
])
def test_bad_values_fail_with_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_file_is_named(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: optim.epochz: unknown key"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_config_error_is_one_line_exit_2(capsys):
    assert main(["config", "kcd.rho=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kcd-ray: config error: kcd.rho") and "\n" not in err


def test_every_subcommand_has_help():
    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices
    assert {"prepare-data", "train-teacher", "distill", "demo", "sweep", "report", "config"} <= set(subs)
    for name in subs:
        r = subprocess.run([sys.executable, "-m", "kcd_ray.cli", name, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: kcd-ray " + name in r.stdout, (name, r.stderr)


def test_config_list_covers_every_key(capsys):
    assert main(["config", "--list"]) == 0
    out = capsys.readouterr().out
    for key, *_ in describe():
        assert key in out


def test_prepare_data_cli_is_idempotent(tmp_path, capsys):
    args = ["prepare-data", "data.name=synthetic", f"data.root={tmp_path}", "data.synthetic.num_train=40",
            "data.synthetic.num_test=10", "data.synthetic.image_size=8"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "train: 40 rows" in first and "test: 10 rows" in first
    (d,) = [p for p in tmp_path.iterdir() if p.name.startswith("synthetic")]
    mtime = (d / "meta.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (d / "meta.json").stat().st_mtime_ns == mtime


def test_elastic_scaling_keeps_the_global_batch():
    """scaling.min_workers: Ray Train's (min, max) ScalingConfig, and each worker's batch is the global batch
    ``optim.batch_size x num_workers`` shared by the workers there are; a fixed run is left alone."""
    from kcd_ray.engine.plan.derive import plan_resources
    from kcd_ray.ray_layer.trainer import scaling_config
    from kcd_ray.ray_layer.worker import elastic_batch

    def _scaling_config(sc):
        return scaling_config(plan_resources(load_config(base={"scaling": to_dict(sc)})), sc.resize_interval_s)

    cfg = load_config(None, ["scaling.num_workers=4", "scaling.min_workers=1", "optim.batch_size=64",
                             "scaling.resize_interval_s=7"])
    sc = _scaling_config(cfg.scaling)
    assert sc.elasticity_enabled and (sc.min_workers, sc.max_workers) == (1, 4)
    assert sc.elastic_resize_monitor_interval_s == 7.0
    assert [elastic_batch(cfg, w).optim.batch_size for w in (4, 3, 2, 1)] == [64, 85, 128, 256]
    fixed = load_config(None, ["scaling.num_workers=4", "optim.batch_size=64"])
    assert not _scaling_config(fixed.scaling).elasticity_enabled
    assert elastic_batch(fixed, 2).optim.batch_size == 64
    with pytest.raises(ConfigError, match="scaling.min_workers"):
        _scaling_config(load_config(None, ["scaling.num_workers=2", "scaling.min_workers=3"]).scaling)
