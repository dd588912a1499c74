"""A deterministic detector for tests: logit = gain * (mean brightness - 0.5).

Bright images read as AI-generated, dark ones as real, so a test controls the verdict with the pixels it
paints. It runs through the real in-process torch backend. The ``delay_s`` option makes each batch slow,
so stream tests can kill a worker while work is in flight; ``fail_above`` makes a batch holding an image
brighter than it fail (a detector error: the verdict is degraded).
"""

from __future__ import annotations

import time

import torch

from streamguard import DetectorSpec, InputContract, LoadContext, hookimpl
from streamguard.backends.torch_inprocess import torch_loader


class Brightness(torch.nn.Module):
    def __init__(self, gain: float, delay_s: float = 0.0, fail_above: float | None = None) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(gain), requires_grad=False)
        self.delay_s = delay_s
        self.fail_above = fail_above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay_s:
            time.sleep(self.delay_s)
        mean = x.mean(dim=(1, 2, 3))
        if self.fail_above is not None and bool((mean > self.fail_above).any()):
            raise RuntimeError(f"test fault: an image brighter than {self.fail_above}")
        return self.gain * (mean - 0.5)


def _build(ctx: LoadContext) -> torch.nn.Module:
    fail_above = ctx.options.get("fail_above")
    return Brightness(float(ctx.options.get("gain", 10.0)), float(ctx.options.get("delay_s", 0.0)),
                      None if fail_above is None else float(fail_above))


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
