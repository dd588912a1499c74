"""The Python-backend model every part of the NIRNet ensemble uses: `initialize` loads its slice, `execute`
runs it.

Every part's ``1/model.py`` (a copy of ``triton_repo/nirnet-model.py``) imports this class. The ``role``
parameter says which part it is (`streamguard.triton.nirnet_parts.ROLES`); ``weights_dir`` is the NIRNet
weights directory, loaded with `streamguard.builtin.nirnet.model.load_model` (the in-process backend's code,
the one safetensors file) and cut down to the part, so a part computes exactly what that module computes
in-process. The ``clip`` role loads the backbone from ``backbone_cache_dir`` / ``backbone_checkpoint`` at fp32,
as the in-process backend does. Tensors are read by the names in the part's config, inputs in config order.
Importing this module needs Triton's stub (``triton_python_backend_utils``), so it is only imported inside Triton.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend stub

from streamguard.builtin.nirnet.model import NIRNet, load_model
from streamguard.config import BackboneSettings

Run = Callable[..., torch.Tensor]


def _parameter(config: dict[str, Any], key: str) -> str | None:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value or None


def _part(model: NIRNet, role: str) -> Run:
    if role == "extractor":
        return model.extractor
    if role == "head":
        return lambda *features: model.head(torch.cat(features, dim=1))
    branch = {"noise": model.noise, "frequency": model.frequency, "semantic": model.semantic}.get(role)
    if branch is None:
        raise pb_utils.TritonModelException(f"role {role!r}: no such NIRNet part, or the model lacks that branch")
    return branch


def _clip(encoder: Any) -> Run:
    def run(whole: torch.Tensor) -> torch.Tensor:
        # The crops of one image carry the same whole image: CLIP runs once per distinct image, as in-process.
        unique, index = torch.unique(whole.reshape(len(whole), -1), dim=0, return_inverse=True)
        return encoder(unique.reshape(-1, *whole.shape[1:])).float()[index]
    return run


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        role = _parameter(config, "role")
        if args.get("model_instance_kind") == "GPU":
            self.device = f"cuda:{args['model_instance_device_id']}"
        else:
            self.device = "cpu"
        if role == "clip":
            from streamguard.backbone import load_backbone

            cache_dir, checkpoint = _parameter(config, "backbone_cache_dir"), _parameter(config, "backbone_checkpoint")
            if cache_dir is None:
                raise pb_utils.TritonModelException(f"{config.get('name')}: backbone_cache_dir must be set")
            settings = BackboneSettings(cache_dir=Path(cache_dir), checkpoint=Path(checkpoint) if checkpoint else None)
            self.run = _clip(load_backbone(settings, self.device, precision="fp32").eval())
        else:
            weights_dir = _parameter(config, "weights_dir")
            if role is None or weights_dir is None:
                raise pb_utils.TritonModelException(
                    f"{config.get('name')}: parameters role, weights_dir must be set; build the repository with "
                    "`streamguard triton build`")
            self.run = _part(load_model(Path(weights_dir), self.device), role)
        self.inputs = [str(t["name"]) for t in config["input"]]
        self.output = str(config["output"][0]["name"])
        pb_utils.Logger.log_info(f"nirnet {role} loaded: version={_parameter(config, 'streamguard_version')} "
                                 f"device={self.device}")

    def execute(self, requests: list[Any]) -> list[Any]:
        # One forward over every request the dynamic batcher handed over.
        arrays = {name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
                  for name in self.inputs}
        sizes = [a.shape[0] for a in arrays[self.inputs[0]]]
        batch = [torch.from_numpy(np.concatenate(arrays[name])).to(self.device) for name in self.inputs]
        with torch.inference_mode():
            out = self.run(*batch).float().cpu().numpy()
        parts = np.split(out, np.cumsum(sizes)[:-1])
        return [pb_utils.InferenceResponse([pb_utils.Tensor(self.output, np.ascontiguousarray(part))])
                for part in parts]
