"""Feature taps: the zoo's ``forward(x, is_feat=False, preact=False)`` for torchvision and factory models.

``attach_taps`` gives a plain classification model the interface the distillers use: ``model(x)`` is its own
forward (untouched, the fast path); ``model(x, is_feat=True)`` returns ``(feats, logits)`` with ``feats`` the tapped
maps then the pooled pre-logit vector (``feats[-1]``, the input of the final ``nn.Linear``). The model keeps its
class and its ``state_dict`` keys (a torchvision state dict loads into it, and its checkpoints load into
torchvision's model): only an instance-level ``forward`` is added.

The taps are read with torchvision's FX feature extraction
(``torchvision.models.feature_extraction.create_feature_extractor``, traced once per model structure on a
meta-device copy, train and eval graphs) and run as that graph's generated code against the model's own modules,
so DDP, AMP, channels-last and the meta device all see the ordinary modules. Maps are returned as ``(B, C, H, W)``:
Swin's ``(B, H, W, C)`` stages are permuted, and token sequences ``(B, N, D)`` (ViT) become ``(B, D, s, s)`` over
the largest square grid of their last tokens (the class token dropped).

Default taps (``family_of``), chosen once at a reference size (224 px, or the model's ``image_size``):

- every CNN: the stem and the stage outputs: of the model's top-level modules (and of a top-level ``Sequential``
  such as ``features`` whose blocks change resolution), the last one at each spatial resolution; a trailing 1x1
  ``Conv2dNormActivation`` head (MobileNet, EfficientNet) is not a stage;
- ViT: ``conv_proj`` (the patch embedding) and the encoder blocks at 1/4, 1/2, 3/4 and the end;
- pre-activation taps (``preact=True``, AB): ResNet and RegNet stages end at the residual sum before the ReLU;
  MobileNet, EfficientNet, ConvNeXt, ViT and Swin stages end without an activation, so their taps serve as they
  are; other families have none by default (name them in ``distill.student_taps`` / ``distill.teacher_taps``).

Own taps (``taps``): node names or module names (``kcd-ray models --nodes NAME`` lists them); a module name taps
the module's last node. They give ``feats[:-1]``; when the last one is a vector it is ``feats[-1]``, otherwise the
classifier's input is appended. With own taps, ``preact=True`` uses them as given.
"""

from __future__ import annotations

import math
import operator
import types
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional, Sequence

import torch
from torch import fx, nn

from kcd_ray.registry import Registry

from .sources import ModelSourceError, build_meta, build_source_model, kwargs_key

REFERENCE_SIZE = 224
TAPS_KEYS = "distill.student_taps / distill.teacher_taps"


class TapError(ModelSourceError):
    """Taps that a model cannot give; one line naming the model and the node."""


@dataclass(frozen=True)
class Family:
    """How a family of models is tapped: which classes, whether maps are channels-last, the stage rule and the
    pre-activation node of a stage (None: the family has none)."""

    classes: tuple[str, ...]  # "module:Class", imported when matched
    nhwc: bool = False
    stages: Optional[Callable[[nn.Module], list[str]]] = None  # None: the resolution rule
    preact: Optional[Callable[[nn.Module, str], Optional[str]]] = None


def _same(model: nn.Module, unit: str) -> str:
    return unit


def _last_residual_sum(model: nn.Module, unit: str) -> Optional[str]:
    """ResNet ``layerK`` / RegNet ``trunk_output.blockK``: the last block's ``x + f(x)`` before its ReLU."""
    stage = model.get_submodule(unit)
    if not isinstance(stage, nn.Sequential) or len(stage) == 0:
        return None
    return f"{unit}.{list(stage._modules)[-1]}.add"


def _vit_stages(model: nn.Module) -> list[str]:
    blocks = list(model.get_submodule("encoder.layers")._modules)
    picks = sorted({max(0, round(len(blocks) * k / 4) - 1) for k in (1, 2, 3, 4)})
    return ["conv_proj"] + [f"encoder.layers.{blocks[i]}" for i in picks]


FAMILIES: Registry[Family] = Registry("model family")
FAMILIES.add("resnet", Family(("torchvision.models.resnet:ResNet",), preact=_last_residual_sum))
FAMILIES.add("regnet", Family(("torchvision.models.regnet:RegNet",), preact=_last_residual_sum))
FAMILIES.add("mobilenet_v2", Family(("torchvision.models.mobilenetv2:MobileNetV2",), preact=_same))
FAMILIES.add("mobilenet_v3", Family(("torchvision.models.mobilenetv3:MobileNetV3",), preact=_same))
FAMILIES.add("efficientnet", Family(("torchvision.models.efficientnet:EfficientNet",), preact=_same))
FAMILIES.add("convnext", Family(("torchvision.models.convnext:ConvNeXt",), preact=_same))
FAMILIES.add("vit", Family(("torchvision.models.vision_transformer:VisionTransformer",), stages=_vit_stages,
                           preact=_same))
FAMILIES.add("swin", Family(("torchvision.models.swin_transformer:SwinTransformer",), nhwc=True, preact=_same))
GENERIC = Family(())  # densenet, shufflenet, mnasnet, vgg, a user's CNN: the resolution rule, no pre-activations


def _class(path: str) -> type:
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def family_of(model: nn.Module) -> tuple[str, Family]:
    for name in FAMILIES.names():
        fam = FAMILIES.get(name)
        if isinstance(model, tuple(_class(c) for c in fam.classes)):
            return name, fam
    return "generic", GENERIC


# --------------------------------------------------------------------------- default stages by resolution


def _spatial(t, nhwc: bool) -> Optional[tuple[int, int]]:
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        return None
    return tuple(t.shape[1:3]) if _layout(t, nhwc) == "nhwc" else tuple(t.shape[2:])


def _probe_input(model: nn.Module) -> list[torch.Tensor]:
    sizes = [getattr(model, "image_size", None), REFERENCE_SIZE, 32]
    return [torch.zeros(2, 3, s, s, device="meta") for s in dict.fromkeys(x for x in sizes if isinstance(x, int))]


def _unit_outputs(template: nn.Module, nhwc: bool) -> list[tuple[str, Optional[tuple[int, int]], nn.Module]]:
    """(name, spatial size, module) of the modules at depth 1 and 2, in the order they ran on a meta forward."""
    seen: dict[str, tuple] = {}
    handles = []
    for name, m in template.named_modules():
        if name and name.count(".") <= 1:
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: seen.__setitem__(name, (len(seen), _spatial(out, nhwc), mod))))
    try:
        template.eval()
        for x in _probe_input(template):
            try:
                seen.clear()
                with torch.no_grad():
                    template(x)
                break
            except Exception:  # noqa: BLE001 - a model for a fixed input size: the next probe size
                continue
    finally:
        for h in handles:
            h.remove()
    return [(n, s, m) for n, (_, s, m) in sorted(seen.items(), key=lambda kv: kv[1][0])]


def _resolution_stages(template: nn.Module, nhwc: bool) -> list[str]:
    outs = _unit_outputs(template, nhwc)
    children = {}
    for name, size, mod in outs:
        if "." in name:
            children.setdefault(name.split(".")[0], []).append((name, size, mod))
    units = []
    for name, size, mod in outs:
        if "." in name:
            continue
        kids = children.get(name, [])
        if isinstance(mod, (nn.Sequential, nn.ModuleList)) and len({s for _, s, _ in kids}) > 1:
            units += kids  # e.g. ``features``: its blocks are the stages
        else:
            units.append((name, size, mod))
    groups: list[list[tuple]] = []
    for unit in units:
        size = unit[1]
        if size is None or size[0] * size[1] <= 1:
            continue
        if groups and groups[-1][-1][1] == size:
            groups[-1].append(unit)
        else:
            groups.append([unit])
    if groups and len(groups[-1]) > 1 and _is_head_conv(groups[-1][-1][2]):
        groups[-1].pop()
    return [g[-1][0] for g in groups]


def _is_head_conv(m: nn.Module) -> bool:
    from torchvision.ops.misc import Conv2dNormActivation

    return isinstance(m, Conv2dNormActivation) and tuple(m[0].kernel_size) == (1, 1)


# --------------------------------------------------------------------------- the traced plan


def _tracer_kwargs() -> dict:
    """torchvision's defaults for its feature-extraction tracer: torchvision.ops stay leaves and are autowrapped."""
    import inspect

    import torchvision

    ops = [o for _, o in inspect.getmembers(torchvision.ops) if inspect.isclass(o) and issubclass(o, nn.Module)]
    return {"autowrap_modules": (math, torchvision.ops), "leaf_modules": ops}


def trace_nodes(template: nn.Module, train: bool) -> tuple[fx.Graph, dict]:
    """The FX graph of the model's forward and its node -> node name map (torchvision's NodePathTracer)."""
    from torchvision.models.feature_extraction import NodePathTracer

    was = template.training
    tracer = NodePathTracer(**_tracer_kwargs())
    try:
        graph = tracer.trace(template.train(train))
    except Exception as e:  # noqa: BLE001
        raise TapError(f"{getattr(template, 'arch', type(template).__name__)}: FX cannot trace its forward for "
                       f"feature taps ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    finally:
        template.train(was)
    return graph, tracer.node_to_qualname


def _logits_and_pooled(template: nn.Module, arch: str) -> tuple[str, Optional[str]]:
    """Node names of the logits (the forward's output) and of the classifier's input, Dropout skipped."""
    graph, names = trace_nodes(template, train=False)
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    if not isinstance(out, fx.Node) or out not in names:
        raise TapError(f"{arch}: its forward does not return one logits tensor; feature taps need one")
    node, pooled = out, None
    if node.op == "call_module" and isinstance(template.get_submodule(node.target), nn.Linear):
        node = node.args[0]
        while (isinstance(node, fx.Node) and node.op == "call_module"
               and isinstance(template.get_submodule(node.target), (nn.Dropout, nn.Identity))):
            node = node.args[0]
        pooled = names.get(node) if isinstance(node, fx.Node) else None
    return names[out], pooled


@dataclass
class TapPlan:
    maps: tuple[str, ...]  # node queries of feats[:-1]
    pooled: str
    logits: str
    layouts: tuple[str, ...]  # per map: "nchw", "nhwc" or "tokens"
    train_fn: Callable = field(repr=False)
    eval_fn: Callable = field(repr=False)


def _compile(template: nn.Module, nodes: list[str], arch: str) -> tuple[Callable, Callable]:
    """The extractor's generated forward for train and eval mode, as functions of (model, x)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    try:
        gm = create_feature_extractor(template, return_nodes=nodes, tracer_kwargs=_tracer_kwargs(),
                                      suppress_diff_warning=True)
    except ValueError as e:  # an unknown node: torchvision says which
        raise TapError(f"{arch}: {str(e).split('. Hint')[0]}; `kcd-ray models --nodes {arch}` lists the "
                       "nodes") from None
    consts = [n.target for g in (gm.train_graph, gm.eval_graph) for n in g.nodes
              if n.op == "get_attr" and n.target.startswith("_tensor_constant")]
    if consts:  # made by the tracer on the meta copy: their values are not there to share with the model
        raise TapError(f"{arch}: its forward computes {len(consts)} tensor constant(s) that FX feature extraction "
                       f"cannot share across copies; feature methods are not available for it (logit methods are)")
    fns = {}
    for mode, graph in ((True, gm.train_graph), (False, gm.eval_graph)):
        _clone_before_inplace(gm, graph)
        gm.graph = graph  # regenerates the class's forward from this graph
        fns[mode] = type(gm).forward
    return fns[True], fns[False]


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _mutates(gm: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op in ("call_function", "call_method"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        return (bool(node.kwargs.get("inplace")) or node.target in _INPLACE_OPERATORS
                or (name.endswith("_") and not name.endswith("__")))
    return False


def _clone_before_inplace(gm: nn.Module, graph: fx.Graph) -> None:
    """A tap that a later in-place op overwrites (ResNet's residual sum under ``ReLU(inplace=True)``) is returned
    as a clone taken before that op."""
    out = next(n for n in graph.nodes if n.op == "output")
    returned = dict(out.args[0])
    for key, node in returned.items():
        if any(_mutates(gm, u) for u in node.users if u is not out):
            with graph.inserting_after(node):
                returned[key] = graph.call_method("clone", (node,))
    out.args = (returned,)
    graph.lint()


def _layout(t: torch.Tensor, nhwc: bool) -> Optional[str]:
    if t.dim() == 4:
        square_nhwc = t.shape[1] == t.shape[2] and t.shape[2] != t.shape[3]
        return "nhwc" if nhwc and square_nhwc else "nchw"
    return "tokens" if t.dim() == 3 else None


@lru_cache(maxsize=64)
def tap_plan(arch: str, num_classes: int, kwargs: str, taps: tuple[str, ...], preact: bool) -> TapPlan:
    """The taps of one model structure (traced once, on a meta copy, then shared by every instance)."""
    import json

    template = build_meta(arch, num_classes, build=lambda: build_source_model(arch, num_classes, json.loads(kwargs)))
    family_name, fam = family_of(template)
    logits, pooled = _logits_and_pooled(template, arch)
    if taps:
        maps = list(taps)
    else:
        maps = fam.stages(template) if fam.stages else _resolution_stages(template, fam.nhwc)
        if preact:
            if fam.preact is None:
                raise TapError(f"{arch}: pre-activation taps (preact=True, method ab) are not known for the "
                               f"{family_name} family; name pre-activation nodes in {TAPS_KEYS}")
            stages = [fam.preact(template, u) for u in maps[1:]]
            if any(s is None for s in stages):
                raise TapError(f"{arch}: no pre-activation node for its stages {maps[1:]}; name them in {TAPS_KEYS}")
            maps = maps[:1] + stages
    queries = list(dict.fromkeys(maps + [logits] + ([pooled] if pooled else [])))
    train_fn, eval_fn = _compile(template, queries, arch)
    out = _meta_outputs(template, eval_fn, arch)
    if taps and out[maps[-1]].dim() == 2:  # own taps ending with a vector: that is feats[-1]
        pooled, maps = maps[-1], maps[:-1]
    if pooled is None:
        raise TapError(f"{arch}: no final nn.Linear to take the pooled pre-logit vector from; name it as the last "
                       f"of {TAPS_KEYS}")
    layouts = []
    for name in maps:
        kind = _layout(out[name], fam.nhwc)
        if kind is None:
            raise TapError(f"{arch}: tap {name!r} gives shape {tuple(out[name].shape)}; feature maps are (B, C, H, W) "
                           f"or token sequences (B, N, D), and only the last tap may be a (B, D) vector")
        layouts.append(kind)
    return TapPlan(tuple(maps), pooled, logits, tuple(layouts), train_fn, eval_fn)


def _meta_outputs(template: nn.Module, fn: Callable, arch: str) -> dict:
    errors = []
    for x in _probe_input(template):
        try:
            with torch.no_grad():
                return fn(template.eval(), x)
        except Exception as e:  # noqa: BLE001 - another probe size
            errors.append(f"{tuple(x.shape[2:])}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    raise TapError(f"{arch}: a meta-device forward of its taps failed at every probe size ({'; '.join(errors)})")


# --------------------------------------------------------------------------- the model side


def tokens_to_map(t: torch.Tensor) -> torch.Tensor:
    """(B, N, D) tokens -> (B, D, s, s): the last s*s tokens (patches, row-major); leading ones (class) dropped."""
    b, n, d = t.shape
    s = math.isqrt(n)
    return t[:, n - s * s:].transpose(1, 2).reshape(b, d, s, s)


_TO_MAP = {"nchw": lambda t: t, "nhwc": lambda t: t.permute(0, 3, 1, 2), "tokens": tokens_to_map}


def _tapped_forward(self: nn.Module, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
    if not is_feat:
        return type(self).forward(self, x)
    plans = self.__dict__.setdefault("_kcd_plans", {})
    plan = plans.get(preact)
    if plan is None:
        plan = plans[preact] = tap_plan(*self._kcd_tap_key, preact)
    out = (plan.train_fn if self.training else plan.eval_fn)(self, x)
    feats = [_TO_MAP[kind](out[name]) for name, kind in zip(plan.maps, plan.layouts)]
    feats.append(torch.flatten(out[plan.pooled], 1))
    return feats, out[plan.logits]


def has_feature_interface(model: nn.Module) -> bool:
    """A model whose own forward already takes ``is_feat`` (the zoo's contract): used as it is."""
    import inspect

    try:
        return "is_feat" in inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return False


def attach_taps(model: nn.Module, arch: str, num_classes: int, kwargs=None, taps: Sequence[str] = ()) -> nn.Module:
    """Give ``model`` (built from ``arch``) the feature interface; own ``taps`` are checked now."""
    taps = tuple(taps or ())
    if has_feature_interface(model):
        if taps:
            raise TapError(f"{arch}: its forward gives its own features (is_feat); taps do not apply to it")
        return model
    key = (arch, int(num_classes), kwargs_key(kwargs), taps)
    model._kcd_tap_key = key
    model.forward = types.MethodType(_tapped_forward, model)
    if taps:
        tap_plan(*key, False)
    return model


# --------------------------------------------------------------------------- `kcd-ray models --nodes NAME`


def _resolve_query(query: str, nodes: Sequence[str]) -> Optional[str]:
    """The node a tap query stands for: itself, or a module's last node (torchvision's matching rule)."""
    depth = query.count(".")
    hits = [n for n in nodes if ".".join(n.split(".")[: depth + 1]) == query]
    return hits[-1] if hits else None


def node_listing(arch: str, num_classes: int = 1000, kwargs=None, taps: Sequence[str] = ()) -> list[str]:
    """The model's graph nodes in train mode, the default (or given) taps marked; one line each."""
    import json

    key = (arch, int(num_classes), kwargs_key(kwargs), tuple(taps or ()))
    template = build_meta(arch, num_classes, build=lambda: build_source_model(arch, num_classes, json.loads(key[2])))
    _, names = trace_nodes(template, train=True)
    nodes = list(names.values())
    plan = tap_plan(*key, False)
    marks: dict[str, list[str]] = {}
    for i, q in enumerate(plan.maps):
        marks.setdefault(_resolve_query(q, nodes) or q, []).append(
            f"feats[{i}]" + (f" ({q})" if q not in nodes else ""))
    marks.setdefault(_resolve_query(plan.pooled, nodes) or plan.pooled, []).append("feats[-1] pooled pre-logit vector")
    marks.setdefault(_resolve_query(plan.logits, nodes) or plan.logits, []).append("logits")
    try:
        for i, q in enumerate(tap_plan(*key, True).maps[1:], start=1):
            if q != plan.maps[i]:
                marks.setdefault(_resolve_query(q, nodes) or q, []).append(f"feats[{i}] with preact=True (AB)")
        preact = "pre-activation taps (AB): yes"
    except TapError:
        preact = "pre-activation taps (AB): none by default"
    width = max(len(n) for n in nodes) + 2
    family = family_of(template)[0]
    head = [f"{arch}: family {family}, {'given' if taps else 'default'} taps marked; {preact}; graph nodes in train "
            f"mode (a module name taps the module's last node)"]
    return head + [(f"  {n:<{width}}" + (f"<- {', '.join(marks[n])}" if n in marks else "")).rstrip() for n in nodes]
