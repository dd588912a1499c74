"""The Python-backend model every built-in model on Triton uses: `initialize` loads it, `execute` runs it.

Every Python-backend model's ``1/model.py`` (a copy of ``triton_repo/python-model.py``) imports this class.
What to load comes from the config's ``parameters`` (written by `streamguard triton build`), never from the
code. The ``role`` parameter says what the model is:
- ``detector`` (or unset): a whole detector, PIXELS -> LOGITS, from its name and weights directory;
- ``trunk``: the shared CLIP trunk, PIXELS -> ``hidden_tensor(b)`` for each branch point b of ``blocks`` (a JSON
  list of block indices and ``"class-tokens"``);
- ``head``: a detector's head on the trunk, HIDDEN (what ``branch_block`` receives) -> LOGITS.
Every role reads the backbone from ``backbone_cache_dir`` / ``backbone_checkpoint``. Importing this module
needs Triton's stub (``triton_python_backend_utils``), so it is only imported inside Triton.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend stub

from streamguard.backbone import load_backbone
from streamguard.backends.torch_trunk import ClipTrunk
from streamguard.builtin.cliphead.model import build_branch, build_served
from streamguard.config import BackboneSettings
from streamguard.detectors.spec import CLASS_TOKENS
from streamguard.detectors.trunk import in_order
from streamguard.triton.served import served_detector
from streamguard.triton.shared_trunk import hidden_tensor

Run = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def _parameter(config: dict[str, Any], key: str) -> str | None:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value or None


def _required(config: dict[str, Any], *keys: str) -> list[str]:
    values = [_parameter(config, key) for key in keys]
    if any(value is None for value in values):
        raise pb_utils.TritonModelException(
            f"{config.get('name')}: parameters {', '.join(keys)} must be set; build the repository with "
            "`streamguard triton build`"
        )
    return values  # type: ignore[return-value]


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        role = _parameter(config, "role") or "detector"
        (cache_dir,) = _required(config, "backbone_cache_dir")
        checkpoint = _parameter(config, "backbone_checkpoint")
        if args.get("model_instance_kind") == "GPU":
            self.device = f"cuda:{args['model_instance_device_id']}"
        else:
            self.device = "cpu"
        settings = BackboneSettings(cache_dir=Path(cache_dir), checkpoint=Path(checkpoint) if checkpoint else None)
        encoder = load_backbone(settings, self.device)
        self.input = str(config["input"][0]["name"])
        self.run: Run
        if role == "trunk":
            trunk = ClipTrunk(encoder, self.device)
            blocks = in_order(set(json.loads(_required(config, "blocks")[0])))
            self.run = lambda x: {hidden_tensor(b): h for b, h in trunk.forward(x, blocks).items()}
            what = f"trunk to blocks {blocks}"
        elif role == "head":
            detector, weights_dir, block = _required(config, "detector", "weights_dir", "branch_block")
            point = block if block == CLASS_TOKENS else int(block)
            head = build_branch(served_detector(detector), encoder, Path(weights_dir), point).to(self.device)
            self.run = lambda hidden: {"LOGITS": head(hidden).reshape(-1, 1)}
            what = f"{detector} head from block {block}"
        else:
            detector, weights_dir = _required(config, "detector", "weights_dir")
            model = build_served(served_detector(detector), encoder, Path(weights_dir)).to(self.device).eval()
            self.run = lambda pixels: {"LOGITS": model(pixels).reshape(-1, 1)}
            what = detector
        pb_utils.Logger.log_info(
            f"{what} loaded: version={_parameter(config, 'streamguard_version')} device={self.device}"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        # One forward over every request the dynamic batcher handed over.
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        sizes = [a.shape[0] for a in arrays]
        batch = torch.from_numpy(np.concatenate(arrays)).to(self.device)
        with torch.inference_mode():
            outputs = {name: t.float().cpu().numpy() for name, t in self.run(batch).items()}
        bounds = np.cumsum(sizes)[:-1]
        parts = {name: np.split(value, bounds) for name, value in outputs.items()}
        return [pb_utils.InferenceResponse([pb_utils.Tensor(name, np.ascontiguousarray(parts[name][i]))
                                            for name in outputs])
                for i in range(len(requests))]
