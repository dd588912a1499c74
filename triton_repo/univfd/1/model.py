"""UnivFD on Triton's Python backend: loads the model in `initialize`, runs it in `execute`.

Paths come from the config's `parameters` (written by `streamguard triton build`), never from this file.
"""

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from streamguard.backbone import load_backbone
from streamguard.builtin.univfd.model import UnivFD, load_probe
from streamguard.config import BackboneSettings


def _parameter(config, key):
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value or None


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        weights_dir = _parameter(config, "weights_dir")
        cache_dir = _parameter(config, "backbone_cache_dir")
        if weights_dir is None or cache_dir is None:
            raise pb_utils.TritonModelException(
                "univfd: parameters weights_dir and backbone_cache_dir are empty; build the repository with "
                "`streamguard triton build`"
            )
        checkpoint = _parameter(config, "backbone_checkpoint")
        if args.get("model_instance_kind") == "GPU":
            self.device = f"cuda:{args['model_instance_device_id']}"
        else:
            self.device = "cpu"
        settings = BackboneSettings(cache_dir=Path(cache_dir), checkpoint=Path(checkpoint) if checkpoint else None)
        probe, _ = load_probe(Path(weights_dir))
        self.model = UnivFD(load_backbone(settings, self.device), probe).to(self.device).eval()
        pb_utils.Logger.log_info(
            f"univfd loaded: version={_parameter(config, 'streamguard_version')} device={self.device}"
        )

    def execute(self, requests):
        # One forward over every request the dynamic batcher handed over.
        arrays = [pb_utils.get_input_tensor_by_name(r, "PIXELS").as_numpy() for r in requests]
        sizes = [a.shape[0] for a in arrays]
        pixels = torch.from_numpy(np.concatenate(arrays)).to(self.device)
        with torch.inference_mode():
            logits = self.model(pixels).float().cpu().numpy().reshape(-1, 1)
        responses = []
        for part in np.split(logits, np.cumsum(sizes)[:-1]):
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("LOGITS", np.ascontiguousarray(part))]))
        return responses
