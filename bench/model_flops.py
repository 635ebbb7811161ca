"""FLOPs per sample of models from outside the zoo, as the compute ledger counts them (``kcd_ray.engine.ledger``).

    .venv/bin/python bench/model_flops.py            # the table of docs/models.md (224 px and 32 px)
    .venv/bin/python bench/model_flops.py --sizes 224 --models torchvision/convnext_tiny

The ledger's ``measure_flops`` on a meta-device copy (torch's FlopCounterMode; a multiply-add is 2 FLOPs; no
weights, no arithmetic): a student's forward + backward in train mode, a teacher's forward in eval mode.
Connectors, losses, optimiser and data work are not counted, as in a run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kcd_ray.engine.ledger import measure_flops  # noqa: E402
from kcd_ray.models import build_meta  # noqa: E402

DEIT_TINY = "torchvision.models.vision_transformer:VisionTransformer"
DEIT_TINY_KW = {"patch_size": 16, "num_layers": 12, "num_heads": 3, "hidden_dim": 192, "mlp_dim": 768}
# name -> constructor arguments per input size (a ViT is built for one size: CIFAR-sized ones take 4 px patches)
MODELS = {
    "imagenet_resnet18": {},
    "torchvision/resnet18": {},
    "torchvision/resnet50": {},
    "torchvision/mobilenet_v2": {},
    "torchvision/mobilenet_v3_small": {},
    "torchvision/mobilenet_v3_large": {},
    "torchvision/efficientnet_b0": {},
    "torchvision/regnet_x_400mf": {},
    "torchvision/regnet_y_1_6gf": {},
    "torchvision/convnext_tiny": {},
    "torchvision/densenet121": {},
    "torchvision/shufflenet_v2_x1_0": {},
    "torchvision/swin_t": {},
    "torchvision/vit_b_16": {224: {}, 32: {"image_size": 32}},
    DEIT_TINY: {224: {**DEIT_TINY_KW, "image_size": 224}, 32: {**DEIT_TINY_KW, "image_size": 32, "patch_size": 4}},
}


def kwargs_for(name: str, size: int) -> dict:
    spec = MODELS.get(name, {})
    return dict(spec.get(size, {})) if any(isinstance(k, int) for k in spec) else dict(spec)


def flops(name: str, size: int, num_classes: int) -> tuple[float, float, float]:
    """(student forward, student backward, teacher forward) FLOPs per sample."""
    model = build_meta(name, num_classes, kwargs_for(name, size))
    sf, sb = measure_flops(model, (3, size, size), backward=True, train=True)
    tf, _ = measure_flops(model, (3, size, size), backward=False, train=False)
    return sf, sb, tf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--sizes", nargs="*", type=int, default=[224, 32])
    ap.add_argument("--num-classes", type=int, default=0, help="0: 1000 at 224 px, 100 at 32 px")
    args = ap.parse_args(argv)
    print("| model | px | classes | student fwd | student bwd | student fwd+bwd | teacher fwd |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        classes = args.num_classes or (1000 if size >= 128 else 100)
        for name in args.models:
            sf, sb, tf = flops(name, size, classes)
            g = lambda v: f"{v / 1e9:.3f} G" if v >= 1e8 else f"{v / 1e6:.1f} M"  # noqa: E731
            shown = name if name != DEIT_TINY else f"DeiT-Ti shape ({name})"
            print(f"| {shown} | {size} | {classes} | {g(sf)} | {g(sb)} | {g(sf + sb)} | {g(tf)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
