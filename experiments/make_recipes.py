"""Generate the recipe files under experiments/ from the tables below (run it after editing them).

    python experiments/make_recipes.py          # (re)write every generated recipe
    python experiments/make_recipes.py --check  # exit 1 if a file on disk differs from what this script writes

Every generated file is a complete, resolved config (every field explicit), so what a run uses is
visible in the file itself; kcd_ray's config loader has no include mechanism. The sweep files in
experiments/sweeps/ are written by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))  # run from a checkout without installing

from kcd_ray.config import load_config, to_dict  # noqa: E402

# ---------------------------------------------------------------- the paper's CIFAR-100 setup (docs/methods/kcd.md §9)

CIFAR_OPTIM = {"epochs": 240, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
               "scheduler": "multistep", "milestones": [150, 180, 210], "lr_decay": 0.1}
SMALL_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")  # lr 0.01 for these (docs/methods/kcd.md §9)
KD = {"method": "kd", "gamma": 0.1, "alpha": 0.9, "beta": 0.0, "temperature": {"schedule": "constant", "T": 4.0}}
KCD = {"enabled": True, "value_fn": "entropy", "mode": "multiple", "estep": "online", "lam": 0.03, "n_ref": 40.0,
       "interval": 40, "warmup": 0, "rho": 0.7, "stages": 6, "shape": "step", "summary": True, "lam_min": 0.7}
# One GPU per run, as in the paper (batch 64 is per worker: more workers means a bigger global batch).
GPU_SCALING = {"num_workers": 1, "cpus_per_worker": 2.0, "use_gpu": "auto", "gpus_per_worker": 1.0, "data_cpus": 0.5}

# (teacher, student): RepDistiller README numbers, CIFAR-100 top-1 (%): teacher, student alone, KD.
PAIRS = {
    ("resnet32x4", "resnet8x4"): (79.42, 72.50, 73.33),
    ("wrn_40_2", "wrn_16_2"): (75.61, 73.26, 74.92),
    ("resnet56", "resnet20"): (72.34, 69.06, 70.66),
    ("resnet110", "resnet32"): (74.31, 71.14, 73.08),
    ("vgg13", "vgg8"): (74.64, 70.36, 72.98),
    ("ResNet50", "MobileNetV2"): (79.34, 64.60, 67.35),
    ("resnet32x4", "ShuffleV1"): (79.42, 70.50, 74.07),
    ("resnet32x4", "ShuffleV2"): (79.42, 71.82, 74.45),
    ("wrn_40_2", "ShuffleV1"): (75.61, 70.50, 74.83),
}
# Validation splits (data.val_fraction): checkpoints and sweeps choose on them, never on the test split.
CIFAR_VAL = ("Validation: data.val_fraction 0.1 (45,000 train / 5,000 validation images, stratified); best_model.pt "
             "and sweeps choose on it.")
CIFAR_DATA = {"name": "cifar100", "source": "./data", "augment": "auto", "download": False, "val_fraction": 0.1}
CIFAR_RUN = {"storage_path": "./runs/cifar100", "checkpoints_to_keep": 2, "max_failures": 3}


def published_teacher(arch: str) -> str:
    """Where RepDistiller's fetch_pretrained_teachers.sh puts the teacher (run from the repository root)."""
    return f"./save/models/{arch}_vanilla/ckpt_epoch_240.pth"


# --------------------------------------------------------------------------- ImageNet (our scaling; see README)

IMAGENET_OPTIM = {"epochs": 100, "batch_size": 32, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
                  "scheduler": "multistep", "milestones": [30, 60, 90], "lr_decay": 0.1, "amp": True,
                  "eval_batch_size": 128}
IMAGENET_SCALING = {"num_workers": 8, "cpus_per_worker": 6.0, "use_gpu": "auto", "gpus_per_worker": 1.0,
                    "data_cpus": 1.0}
IMAGENET_VAL = ("Validation: data.val_fraction 0.01 (~12,800 training images held out; the folder's val/ is the test "
                "split).")
IMAGENET_DATA = {"name": "folder", "source": "./data/imagenet", "image_size": 224, "augment": "auto",
                 "val_fraction": 0.01}

# ImageNet with models from outside the zoo (docs/models.md): a torchvision teacher by name, a torchvision or factory
# student. Documented recipes: they have not been run by kcd_ray's authors (no ImageNet-scale compute here).
TV_WEIGHTS = ("Teacher: torchvision's {w} weights as a plain state dict: python -c \"import torch, torchvision; "
              "torch.save(torchvision.models.{m}(weights='{w}').state_dict(), '{path}')\"")
CONVNEXT_RESNET = {"teacher": "torchvision/convnext_tiny", "student": "torchvision/resnet18",
                   "file": "./save/models/convnext_tiny_imagenet1k_v1.pth", "weights": "IMAGENET1K_V1"}
# DeiT-Ti's shape (Touvron et al., "Training data-efficient image transformers", 2021: 12 blocks, 3 heads, width 192)
# from torchvision's VisionTransformer class, called as a factory.
DEIT_TINY = {"image_size": 224, "patch_size": 16, "num_layers": 12, "num_heads": 3, "hidden_dim": 192, "mlp_dim": 768}
VIT_DEIT = {"teacher": "torchvision/vit_b_16", "student": "torchvision.models.vision_transformer:VisionTransformer",
            "file": "./save/models/vit_b_16_imagenet1k_v1.pth", "weights": "IMAGENET1K_V1"}
# DeiT's soft distillation: (1 - lambda) CE + lambda tau^2 KL, lambda 0.1, tau 3; 300 epochs, cosine, 5 warm-up.
# kcd_ray trains with SGD only, and has none of DeiT's RandAugment/Mixup/CutMix/repeated augmentation.
DEIT_OPTIM = {"epochs": 300, "batch_size": 64, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True,
              "scheduler": "cosine", "warmup_epochs": 5, "amp": True, "eval_batch_size": 128}
DEIT_KD = {"method": "kd", "gamma": 0.9, "alpha": 0.1, "beta": 0.0, "temperature": {"schedule": "constant", "T": 3.0}}

# --------------------------------------------------------------------------- digits: laptop scale, the sweeps' base

DIGITS_VAL = "Validation: data.val_fraction 0.2 (269 of the 1,347 training images; 1,078 train, 450 test)."
DIGITS_DATA = {"name": "digits", "image_size": 16, "val_fraction": 0.2}
DIGITS_OPTIM = {"batch_size": 64, "lr": 0.05, "scheduler": "cosine", "eval_batch_size": 512}
DIGITS_SCALING = {"num_workers": 1, "cpus_per_worker": 1.0, "use_gpu": "auto", "data_cpus": 0.25}
DIGITS_RUN = {"storage_path": "./runs/digits"}


def _resolved(data: dict) -> dict:
    d = to_dict(load_config(base=data))
    if d["data"]["name"] != "synthetic":
        del d["data"]["synthetic"]  # unused unless data.name is synthetic; defaults apply
    return d


def _render(header: list[str], data: dict) -> str:
    lines = ["# GENERATED by experiments/make_recipes.py: edit the tables there and re-run it."]
    lines += [f"# {h}" if h else "#" for h in header]
    return "\n".join(lines) + "\n" + yaml.safe_dump(_resolved(data), sort_keys=False)


def recipes() -> dict[str, str]:
    """Relative path -> file text for every generated recipe."""
    out: dict[str, str] = {}
    teachers = sorted({t for t, _ in PAIRS})
    for t in teachers:
        t_acc = next(v[0] for (tt, _), v in PAIRS.items() if tt == t)
        out[f"cifar100/teachers/{t}.yaml"] = _render(
            [f"Teacher {t} on CIFAR-100, cross-entropy, 240 epochs (RepDistiller's vanilla recipe).",
             f"RepDistiller's published {t} teacher: {t_acc:.2f} top-1.",
             f"Run: kcd-ray train-teacher --config experiments/cifar100/teachers/{t}.yaml",
             f"Output: ./runs/cifar100/cifar100-teacher-{t}/final_model.pt "
             "(use it with distill.teacher=... distill.teacher_model='')",
             CIFAR_VAL],
            {"model": t, "data": CIFAR_DATA, "optim": CIFAR_OPTIM, "scaling": GPU_SCALING,
             "run": {**CIFAR_RUN, "name": f"cifar100-teacher-{t}"}, "kcd": {"enabled": False}})
    for (t, s), (t_acc, s_acc, kd_acc) in PAIRS.items():
        optim = {**CIFAR_OPTIM, "lr": 0.01 if s in SMALL_LR_STUDENTS else 0.05}
        for variant in ("kd", "kcd"):
            what = "plain KD" if variant == "kd" else "KD + KCD (knowledge condensation)"
            header = [f"{what}: {t} -> {s} on CIFAR-100, the paper's recipe (docs/methods/kcd.md §9).",
                      f"RepDistiller README (CIFAR-100 top-1): teacher {t_acc:.2f}, student alone {s_acc:.2f}, "
                      f"KD {kd_acc:.2f}.",
                      f"Teacher: RepDistiller's published checkpoint ({published_teacher(t)}; "
                      "see experiments/README.md).",
                      f"Run: kcd-ray distill --config experiments/cifar100/{t}-{s}/{variant}.yaml", CIFAR_VAL]
            out[f"cifar100/{t}-{s}/{variant}.yaml"] = _render(header, {
                "model": s, "data": CIFAR_DATA, "optim": optim, "scaling": GPU_SCALING,
                "run": {**CIFAR_RUN, "name": f"cifar100-{t}-{s}-{variant}"},
                "distill": {**KD, "teacher": published_teacher(t), "teacher_model": t},
                "kcd": {**KCD, "enabled": variant == "kcd"}})
    for variant in ("kd", "kcd"):
        out[f"imagenet/resnet34-resnet18/{variant}.yaml"] = _render(
            [f"{'plain KD' if variant == 'kd' else 'KD + KCD'}: ResNet-34 -> ResNet-18 on ImageNet "
             "(an image folder with train/ and val/).",
             "torchvision's 100-epoch schedule on 8 GPUs (8 workers x batch 32 = 256, lr 0.1, steps at 30/60/90, "
             "AMP).",
             "KCD: the CIFAR recipe scaled to 100 epochs (6 blocks of 17 epochs, rho 0.7); our choice, not a "
             "published setting.",
             "Teacher: torchvision's ResNet-34 weights saved as {'model': state_dict} (see experiments/README.md).",
             f"Run: kcd-ray distill --config experiments/imagenet/resnet34-resnet18/{variant}.yaml", IMAGENET_VAL],
            {"model": "imagenet_resnet18", "data": IMAGENET_DATA, "optim": IMAGENET_OPTIM, "scaling": IMAGENET_SCALING,
             "run": {"storage_path": "./runs/imagenet", "name": f"imagenet-resnet34-resnet18-{variant}",
                     "max_failures": 3},
             "distill": {**KD, "teacher": "./save/models/imagenet_resnet34.pth", "teacher_model": "imagenet_resnet34"},
             "kcd": {**KCD, "interval": 17, "enabled": variant == "kcd"}})
    out.update(_byom_recipes())
    out["digits/teacher.yaml"] = _render(
        ["Laptop-scale teacher on scikit-learn's digits (offline, 16x16): the teacher for the digits recipes and "
         "sweeps.",
         "Run: kcd-ray train-teacher --config experiments/digits/teacher.yaml", DIGITS_VAL],
        {"model": "resnet20", "data": DIGITS_DATA, "optim": {**DIGITS_OPTIM, "epochs": 15}, "scaling": DIGITS_SCALING,
         "run": {**DIGITS_RUN, "name": "digits-teacher"}, "kcd": {"enabled": False}})
    for variant in ("kd", "kcd"):
        out[f"digits/{variant}.yaml"] = _render(
            [f"Laptop-scale {'plain KD' if variant == 'kd' else 'KD + KCD'} on digits: resnet20 -> resnet8, 18 epochs,",
             "the paper's schedule shrunk (6 blocks of 3 epochs, rho 0.7). The base of experiments/sweeps/.",
             "Needs the digits teacher: kcd-ray train-teacher --config experiments/digits/teacher.yaml",
             f"Run: kcd-ray distill --config experiments/digits/{variant}.yaml", DIGITS_VAL],
            {"model": "resnet8", "data": DIGITS_DATA, "optim": {**DIGITS_OPTIM, "epochs": 18},
             "scaling": DIGITS_SCALING,
             "run": {**DIGITS_RUN, "name": f"digits-{variant}"},
             "distill": {**KD, "teacher": "./runs/digits/digits-teacher/final_model.pt", "teacher_model": ""},
             "kcd": {**KCD, "interval": 3, "enabled": variant == "kcd"}})
    out["ed/digits.yaml"] = _render(
        ["Education distillation (docs/methods/ed.md) on digits: resnet8 grown over 3 grades (classes 0-2, 3-5, "
         "6-9), 18 epochs,",
         "the optimiser of digits/kd.yaml. One resnet20 teacher per class group (15 epochs on its classes, local "
         "labels)",
         "is trained first when missing (runs/digits/edteacher-*/final_model.pt) and reused after.",
         "Even grades with the flagged per_grade learning rate: the spec's CIFAR reading (lr_mode global, grade_epochs",
         "149/30/61 of 240) trains far worse on 18 epochs (bench/ed_compare.py, BENCHMARKS.md). Mixed batches: the Ray",
         "Data pipeline's order (curriculum.mix_groups=false runs ED's sequential passes over D_1..D_g instead).",
         "Run: kcd-ray distill --config experiments/ed/digits.yaml", DIGITS_VAL],
        {"model": "resnet8", "data": DIGITS_DATA, "optim": {**DIGITS_OPTIM, "epochs": 18}, "scaling": DIGITS_SCALING,
         "run": {**DIGITS_RUN, "name": "digits-ed"},
         "distill": {"method": "ed", "temperature": {"schedule": "constant", "T": 4.0}},
         "kcd": {"enabled": False},
         "curriculum": {"name": "ed", "groups": 3, "grade_epochs": [6, 6, 6], "lr_mode": "per_grade", "alpha": 0.3,
                        "mix_groups": True, "teacher_source": "per_group", "teacher_model": "resnet20",
                        "teacher_epochs": 15}})
    return out


def _byom_recipes() -> dict[str, str]:
    """ConvNeXt-T -> ResNet-18 and a DeiT-style ViT: models named by torchvision name and by factory."""
    out = {}
    c, v = CONVNEXT_RESNET, VIT_DEIT
    for variant in ("kd", "kcd"):
        what = "plain KD" if variant == "kd" else "KD + KCD"
        rel = f"imagenet/convnext_tiny-resnet18/{variant}.yaml"
        out[rel] = _render(
            [f"{what}: ConvNeXt-T -> ResNet-18 on ImageNet, both torchvision models named torchvision/<name> "
             "(docs/models.md).",
             "NOT RUN HERE: a documented recipe; no result of it is claimed. torchvision reports 82.52 (ConvNeXt-T,",
             "IMAGENET1K_V1) and 69.76 (ResNet-18) top-1. The ResNet-34 -> ResNet-18 recipe's schedule: 8 GPUs x "
             "batch 32,",
             "lr 0.1, steps at 30/60/90, AMP, channels-last; KCD in 6 blocks of 17 epochs, rho 0.7 (our choice).",
             TV_WEIGHTS.format(w=c["weights"], m="convnext_tiny", path=c["file"]),
             f"Run: kcd-ray distill --config experiments/{rel}"],
            {"model": c["student"], "data": IMAGENET_DATA, "optim": {**IMAGENET_OPTIM, "channels_last": True},
             "scaling": IMAGENET_SCALING,
             "run": {"storage_path": "./runs/imagenet", "name": f"imagenet-convnext_tiny-resnet18-{variant}",
                     "max_failures": 3},
             "distill": {**KD, "teacher": c["file"], "teacher_model": c["teacher"]},
             "kcd": {**KCD, "interval": 17, "enabled": variant == "kcd"}})
        rel = f"imagenet/vit_b_16-deit_tiny/{variant}.yaml"
        out[rel] = _render(
            [f"{what}, DeiT-style: ViT-B/16 (torchvision/vit_b_16) -> a DeiT-Ti-shaped ViT built by a factory: "
             "torchvision's",
             "VisionTransformer class, called as VisionTransformer(num_classes=..., **model_kwargs) "
             "(docs/models.md).",
             "NOT RUN HERE: a documented recipe; no result of it is claimed. DeiT's soft distillation (lambda 0.1, "
             "tau 3:",
             "gamma 0.9, alpha 0.1, T 3), 300 epochs, cosine with 5 warm-up epochs, 8 GPUs x batch 64; but SGD "
             "(kcd_ray's",
             "optimiser) instead of DeiT's AdamW, and none of its RandAugment/Mixup/CutMix: expect far below DeiT-Ti's",
             "72.2 top-1, and compare KD with KD + KCD here. KCD: 6 blocks of 50 epochs, rho 0.7 (our choice).",
             TV_WEIGHTS.format(w=v["weights"], m="vit_b_16", path=v["file"]),
             f"Run: kcd-ray distill --config experiments/{rel}"],
            {"model": v["student"], "model_kwargs": DEIT_TINY, "data": IMAGENET_DATA, "optim": DEIT_OPTIM,
             "scaling": IMAGENET_SCALING,
             "run": {"storage_path": "./runs/imagenet", "name": f"imagenet-vit_b_16-deit_tiny-{variant}",
                     "max_failures": 3},
             "distill": {**DEIT_KD, "teacher": v["file"], "teacher_model": v["teacher"]},
             "kcd": {**KCD, "interval": 50, "enabled": variant == "kcd"}})
    return out


def _header(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#")]


def is_stale(path: Path, text: str) -> bool:
    """True when the file on disk does not hold the generated recipe.

    Compared as resolved configs plus header comments, so a field added to kcd_ray's config later
    (absent from an older file, present with its default in a new one) does not make files stale.
    """
    if not path.is_file():
        return True
    on_disk = path.read_text()
    if on_disk == text:
        return False
    try:
        same = _resolved(yaml.safe_load(on_disk) or {}) == _resolved(yaml.safe_load(text))
    except Exception:  # a file that no longer loads is stale
        return True
    return not same or _header(on_disk) != _header(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare with the files on disk")
    args = ap.parse_args(argv)
    stale = []
    for rel, text in recipes().items():
        p = ROOT / rel
        # --check compares meaning; writing refreshes any file whose text differs (e.g. new config fields).
        if not is_stale(p, text) if args.check else (p.is_file() and p.read_text() == text):
            continue
        stale.append(rel)
        if not args.check:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
    verb = "differ from the generator" if args.check else "written"
    print(f"{len(stale)} recipe(s) {verb}" + (": " + ", ".join(stale) if stale else ""))
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    raise SystemExit(main())
