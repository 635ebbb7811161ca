"""The model zoo: RepDistiller's 22 CIFAR architectures and torchvision ImageNet models, plus any torchvision
classification model (``torchvision/<name>``) and a user's factory (``package.module:callable``).

``build_model(name, num_classes)`` returns a model whose ``forward(x, is_feat=False, preact=False)``
gives logits, or ``(feats, logits)`` with ``is_feat=True`` (``feats[-1]`` is the pooled vector).
Every model carries ``arch``, ``num_classes`` and ``model_kwargs``. CIFAR names (RepDistiller's, so published
teacher checkpoints load unchanged): resnet8/14/20/32/44/56/110, resnet8x4, resnet32x4, ResNet50,
wrn_16_1/16_2/40_1/40_2, vgg8/11/13/16/19, MobileNetV2, ShuffleV1, ShuffleV2. ImageNet names:
imagenet_resnet18/34/50, imagenet_mobilenet_v2 (see ``imagenet.py``). Other sources: ``sources.py``; their
feature taps: ``taps.py``.
"""

from . import imagenet, mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn  # noqa: F401  (registration)
from .checkpoint import CheckpointError, load_checkpoint, load_model, save_model
from .sources import HINT, ModelSourceError, build_meta, is_model_name
from .zoo import MODELS, build_model, feature_shapes, input_channels, list_models

MODELS.open_to(is_model_name, HINT)

__all__ = [
    "MODELS",
    "build_model",
    "build_meta",
    "is_model_name",
    "list_models",
    "feature_shapes",
    "input_channels",
    "load_model",
    "load_checkpoint",
    "save_model",
    "CheckpointError",
    "ModelSourceError",
]
