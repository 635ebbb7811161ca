"""Reading and writing model checkpoints.

Formats read by ``load_model``:
  * kcd_ray files written by ``save_model``:
    ``{"format": "kcd_ray", "arch", "num_classes", "model": state_dict, **extra}`` (and ``"model_kwargs"``, the
    constructor arguments of a torchvision or factory model, when it has any);
  * RepDistiller / CRD files: a torch file with the state dict under ``"model"`` (other keys such
    as ``epoch`` or ``accuracy`` are ignored); the architecture ``name`` must be given and
    ``num_classes`` is read off the classifier weight when not given;
  * a plain state dict ``{name: tensor}`` (what ``torch.save(model.state_dict())`` writes, e.g. torchvision's
    weights files), read as the RepDistiller form;
  * a directory holding ``model.pt`` in either format.
State dicts saved from a DDP-wrapped or compiled model (keys prefixed ``module.`` or
``_orig_mod.``) are accepted.
Files are read with ``torch.load(weights_only=True)``: no code from the file is executed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from kcd_ray import storage

from .sources import HINT, ModelSourceError, build_meta, is_model_name, kwargs_key
from .taps import TapError
from .zoo import MODELS, build_model

FORMAT = "kcd_ray"
MODEL_FILE = "model.pt"
_LIST_LIMIT = 8  # keys shown per category in a mismatch message


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the requested model; names the file."""


def _short(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    more = len(items) - _LIST_LIMIT
    return f"{shown}, ... and {more} more" if more > 0 else shown


def _resolve(path: str | os.PathLike) -> Path:
    if storage.is_uri(path):  # a checkpoint in an object store (s3://...): its local working copy
        try:
            return storage.fetch(str(path))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such checkpoint file in the store") from None
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / MODEL_FILE).is_file():
            raise CheckpointError(f"{p}: directory has no {MODEL_FILE}; expected a checkpoint folder holding "
                                  f"{MODEL_FILE}")
        return p / MODEL_FILE
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint file or directory")
    return p


def _numpy_safe_globals() -> list:
    """numpy scalars some training scripts store as 'accuracy': rebuilding them runs no user code."""
    core = getattr(np, "_core", None) or np.core
    out = [core.multiarray.scalar, np.dtype]
    out += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return out


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """The raw checkpoint dict (tensors on ``map_location``); checks it holds a ``model`` state dict."""
    file = _resolve(path)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  corrupt bytes surface as almost any error type
        text = str(e).strip()
        reason = f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__
        raise CheckpointError(
            f"{file}: not a readable torch checkpoint ({reason}); expected a file written by "
            f"torch.save holding a dict with a 'model' state dict (plain tensors and Python values)"
        ) from e
    if (isinstance(obj, Mapping) and "model" not in obj and obj
            and all(isinstance(v, torch.Tensor) for v in obj.values())):
        obj = {"model": obj}  # a plain state dict (torch.save(model.state_dict()), torchvision's weights files)
    if not isinstance(obj, Mapping) or "model" not in obj:
        what = f"a dict with keys {_short(sorted(map(str, obj)))}" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{file}: holds {what}; expected a dict with the state dict under key 'model' (or a "
                              "plain state dict {name: tensor})")
    state = obj["model"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: 'model' is not a state dict (a mapping of names to tensors)")
    return dict(obj)


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = dict(state)
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = next((m for a in ("module", "_orig_mod") if isinstance(m := getattr(model, a, None), nn.Module)), None)
        if inner is None:
            return model
        model = inner


def _classifier_key(name: str, kwargs: Mapping[str, Any]) -> str:
    """State-dict key of the model's last Linear weight (built on the meta device: no memory)."""
    model = build_meta(name, 2, kwargs)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return f"{linears[-1]}.weight"


def _check_fits(file: Path, name: str, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    # Files from torch < 0.4.1 have no BN batch counters at all; they carry no information
    # for a loaded model, so fill them in (only then: a partial set means a different model).
    if not any(k.endswith("num_batches_tracked") for k in state):
        for k in expected:
            if k.endswith("num_batches_tracked"):
                state[k] = torch.zeros((), dtype=torch.long)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        first = next((f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" if k in state
                      else f"{k}: not in file"
                      for k, v in expected.items() if k not in state or tuple(state[k].shape) != tuple(v.shape)),
                     f"{unexpected[0] if unexpected else ''}: not in model")
        parts = [f"{file}: state dict does not fit model {name!r} (num_classes={model.num_classes}); first mismatch "
                 f"{first}"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if shapes:
            parts.append(f"shape differences ({len(shapes)}): {_short(shapes)}")
        raise CheckpointError("; ".join(parts))


def load_model(
    path: str | os.PathLike,
    name: str | None = None,
    num_classes: int | None = None,
    map_location: Any = "cpu",
    *,
    kwargs: Mapping[str, Any] | None = None,
    taps: Sequence[str] = (),
) -> nn.Module:
    """Build the model a checkpoint describes and load its weights; returned in eval mode.

    ``name``/``kwargs``: the architecture and its constructor arguments (recorded in kcd_ray files; required for
    RepDistiller files and plain state dicts); ``taps``: feature taps of a torchvision or factory model.
    """
    file = _resolve(path)
    ckpt = load_checkpoint(file, map_location="cpu")
    state = _strip_wrappers(ckpt["model"])
    kwargs = dict(kwargs or {})
    if ckpt.get("format") == FORMAT:
        arch, saved_classes, saved_kwargs = ckpt.get("arch"), ckpt.get("num_classes"), ckpt.get("model_kwargs") or {}
        if name is not None and name != arch:
            raise CheckpointError(f"{file}: holds a {arch!r} model but name={name!r} was requested")
        if num_classes is not None and num_classes != saved_classes:
            raise CheckpointError(f"{file}: holds num_classes={saved_classes} but num_classes={num_classes} "
                                  "was requested")
        if kwargs and kwargs_key(kwargs) != kwargs_key(saved_kwargs):
            raise CheckpointError(f"{file}: holds a model built with {kwargs_key(saved_kwargs)} but "
                                  f"{kwargs_key(kwargs)} was requested")
        name, num_classes, kwargs = arch, saved_classes, dict(saved_kwargs)
    elif name is None:
        raise CheckpointError(
            f"{file}: a RepDistiller-style checkpoint ({{'model': state_dict}}) or plain state dict does not record "
            f"its architecture; pass name= (one of: {', '.join(MODELS.names())}; or {HINT})"
        )
    if not is_model_name(name):
        raise CheckpointError(f"{file}: unknown model {name!r}; known: {', '.join(MODELS.names())}; or {HINT}")
    try:
        if num_classes is None:
            key = _classifier_key(name, kwargs)
            if key not in state:
                raise CheckpointError(f"{file}: cannot infer num_classes for {name!r}: missing classifier key {key!r}")
            num_classes = int(state[key].shape[0])
        model = build_model(name, int(num_classes), kwargs=kwargs, taps=taps)
    except TapError:
        raise  # names the taps, not the file: the caller says which config key
    except ModelSourceError as e:
        raise CheckpointError(f"{file}: {e}") from None
    _check_fits(file, name, model, state)
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def save_model(path: str | os.PathLike, model: nn.Module, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``{"format": "kcd_ray", "arch", "num_classes", "model": state_dict, **extra}`` atomically.

    ``extra`` should hold plain Python values or tensors so the file stays readable with
    ``weights_only=True``. A DDP-wrapped or compiled model is unwrapped. Returns the written path.
    """
    inner = _unwrap(model)  # DistributedDataParallel / DataParallel / torch.compile
    for attr in ("arch", "num_classes"):
        if not hasattr(inner, attr):
            raise ValueError(f"save_model: model has no {attr!r} attribute; build it with build_model()")
    extra = dict(extra or {})
    clash = sorted(set(extra) & {"format", "arch", "num_classes", "model"})
    clash += ["model_kwargs"] if "model_kwargs" in extra else []
    if clash:
        raise ValueError(f"save_model: extra keys {clash} are reserved")
    state = {k: v.detach().cpu() for k, v in inner.state_dict().items()}
    payload = {"format": FORMAT, "arch": inner.arch, "num_classes": int(inner.num_classes), "model": state, **extra}
    if getattr(inner, "model_kwargs", None):  # a torchvision or factory model's constructor arguments (plain values)
        payload["model_kwargs"] = dict(inner.model_kwargs)
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so a crash never leaves a half-written checkpoint.
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
