"""The in-process backend: a torch module that maps a (N, 3, H, W) batch to N logits."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from streamguard.detectors.spec import DetectorBackend, DetectorInput, LoadContext


class TorchBackend:
    def __init__(self, module: torch.nn.Module, device: str = "cpu") -> None:
        self._device = torch.device(device)
        self._module = module.eval().to(self._device)

    def predict(self, batch: Sequence[DetectorInput]) -> list[float | None]:
        if not batch:
            return []
        if any(item.pixels is None for item in batch):
            raise ValueError("the torch backend needs pixels; declare an InputContract on the detector")
        x = torch.from_numpy(np.stack([item.pixels for item in batch])).to(self._device)  # type: ignore[misc]
        with torch.inference_mode():
            out = self._module(x)
        logits = out.reshape(len(batch), -1)[:, 0].float().cpu().tolist()
        return list(logits)

    def close(self) -> None:
        self._module.to("cpu")


def torch_loader(build: Callable[[LoadContext], torch.nn.Module]) -> Callable[[LoadContext], DetectorBackend]:
    """Turn a function that builds a module (weights loaded) into a `DetectorSpec.load`."""

    def load(ctx: LoadContext) -> DetectorBackend:
        return TorchBackend(build(ctx), device=ctx.device)

    return load
