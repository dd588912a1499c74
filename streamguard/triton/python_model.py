"""The Python-backend model every built-in detector uses on Triton: `initialize` loads it, `execute` runs it.

Each `triton_repo/<detector>/1/model.py` imports this class. What to load comes from the config's
``parameters`` (written by `streamguard triton build`): the detector's name, its weights directory and the
backbone's cache or checkpoint, never from the code. Importing it needs Triton's stub
(``triton_python_backend_utils``), so it is only imported inside Triton.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend stub

from streamguard.backbone import load_backbone
from streamguard.config import BackboneSettings
from streamguard.triton.served import served_detector


def _parameter(config: dict[str, Any], key: str) -> str | None:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value or None


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        detector, weights_dir = _parameter(config, "detector"), _parameter(config, "weights_dir")
        cache_dir = _parameter(config, "backbone_cache_dir")
        if detector is None or weights_dir is None or cache_dir is None:
            raise pb_utils.TritonModelException(
                f"{config.get('name')}: parameters detector, weights_dir and backbone_cache_dir must be set; build "
                "the repository with `streamguard triton build`"
            )
        checkpoint = _parameter(config, "backbone_checkpoint")
        if args.get("model_instance_kind") == "GPU":
            self.device = f"cuda:{args['model_instance_device_id']}"
        else:
            self.device = "cpu"
        settings = BackboneSettings(cache_dir=Path(cache_dir), checkpoint=Path(checkpoint) if checkpoint else None)
        served = served_detector(detector)
        self.model = served.build(load_backbone(settings, self.device), Path(weights_dir)).to(self.device).eval()
        pb_utils.Logger.log_info(
            f"{detector} loaded: version={_parameter(config, 'streamguard_version')} device={self.device}"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        # One forward over every request the dynamic batcher handed over.
        arrays = [pb_utils.get_input_tensor_by_name(r, "PIXELS").as_numpy() for r in requests]
        sizes = [a.shape[0] for a in arrays]
        pixels = torch.from_numpy(np.concatenate(arrays)).to(self.device)
        with torch.inference_mode():
            logits = self.model(pixels).float().cpu().numpy().reshape(-1, 1)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("LOGITS", np.ascontiguousarray(part))])
                for part in np.split(logits, np.cumsum(sizes)[:-1])]
