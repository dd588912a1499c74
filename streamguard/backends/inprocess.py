"""The in-process backend as a `DetectorSpec.load`, without importing torch until it is called.

Built-in detectors register their spec with `inprocess_loader`: registering (what a worker judging on
Triton does) needs no torch; loading the model in this process imports it, or says which extra to install.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from streamguard.detectors.spec import DetectorBackend, LoadContext
from streamguard.extras import missing_extra

if TYPE_CHECKING:
    import torch

FEATURE = "the in-process detector backend"


def inprocess_loader(build: Callable[[LoadContext], torch.nn.Module]) -> Callable[[LoadContext], DetectorBackend]:
    """`torch_loader` of ``build``, importing torch (and what ``build`` imports) only when called."""

    def load(ctx: LoadContext) -> DetectorBackend:
        try:
            from streamguard.backends.torch_inprocess import TorchBackend

            module: Any = build(ctx)
        except ModuleNotFoundError as exc:
            extra = missing_extra(exc, FEATURE)
            if extra is None:
                raise
            raise extra from exc
        return TorchBackend(module, device=ctx.device)

    return load
