"""A deterministic detector for tests: logit = gain * (mean brightness - 0.5).

Bright images read as AI-generated, dark ones as real, so a test controls the verdict with the pixels it
paints. It runs through the real in-process torch backend.
"""

from __future__ import annotations

import torch

from streamguard import DetectorSpec, InputContract, LoadContext, hookimpl
from streamguard.backends.torch_inprocess import torch_loader


class Brightness(torch.nn.Module):
    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(gain), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * (x.mean(dim=(1, 2, 3)) - 0.5)


def _build(ctx: LoadContext) -> torch.nn.Module:
    return Brightness(float(ctx.options.get("gain", 10.0)))


@hookimpl
def register_detectors(register) -> None:  # type: ignore[no-untyped-def]
    register(
        DetectorSpec(
            name="brightness",
            version="test-1",
            load=torch_loader(_build),
            # Pixels in [0, 1]: no normalisation, so the module reads brightness directly.
            contract=InputContract(size=32, fit="resize", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
            description="test-only brightness detector",
        )
    )
