"""The package's layering, read from the source with ``ast`` (every import, at module level or inside a function):
Ray is imported only in ``kcd_ray/ray_layer/``, and no module imports from a layer above its own.

Layers, lowest first: the pure core (config, storage, registry, errors, condense, distill, models, data, cache,
plots) -> the engine (``kcd_ray/engine``: the training engine, its hooks and the run plan) -> Ray-free tools on
top of it (``report``, ``sweeps``) -> ``ray_layer`` -> the command line (``cli``, ``demo``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kcd_ray"
LAYERS = {"core": 0, "engine": 1, "tools": 2, "ray_layer": 3, "cli": 4}
TOP = {"engine": "engine", "report": "tools", "sweeps": "tools", "ray_layer": "ray_layer", "cli": "cli",
       "demo": "cli"}


def layer_of(module: str) -> str:
    """The layer of a dotted module name inside kcd_ray ("kcd_ray.engine.plan" -> "engine")."""
    parts = module.split(".")
    return TOP.get(parts[1], "core") if len(parts) > 1 else "core"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names if base == "kcd_ray"]
    return out


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = module_name(path)
        mine = layer_of(mod)
        for line, target in imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if (target == "ray" or target.startswith("ray.")) and mine not in ("ray_layer",):
                found.append(f"{where}: imports {target} outside kcd_ray/ray_layer")
            if target.startswith("kcd_ray.") and LAYERS[layer_of(target)] > LAYERS[mine]:
                found.append(f"{where}: {mine} module imports {target} ({layer_of(target)}, a higher layer)")
    return found


def test_ray_only_in_the_ray_layer_and_no_import_goes_up_a_layer():
    assert violations() == []


@pytest.mark.parametrize("source,expected", [
    ("import ray\n", "imports ray outside"),
    ("def f():\n    from ray import tune\n", "imports ray outside"),
    ("from kcd_ray.ray_layer import trainer\n", "a higher layer"),
    ("def f():\n    from kcd_ray.engine.plan import plan_run\n", "a higher layer"),
])
def test_the_checker_finds_a_violation_in_a_core_module(tmp_path, monkeypatch, source, expected):
    """The check can fail: a core module (here kcd_ray/condense/zz_probe.py) with a bad import is reported."""
    probe = PACKAGE / "condense" / "zz_layer_probe.py"
    probe.write_text(source)
    try:
        found = [v for v in violations() if "zz_layer_probe" in v]
    finally:
        probe.unlink()
    assert len(found) == 1 and expected in found[0], found
