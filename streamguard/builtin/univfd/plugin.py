"""Registers the built-in `univfd` detector (plugin name ``builtin-univfd``).

Registering needs no torch (a worker judging on Triton has none): the model's modules are imported when
the in-process backend loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from streamguard.backends.inprocess import inprocess_loader
from streamguard.builtin.univfd.files import detector_version
from streamguard.config import Settings
from streamguard.detectors.spec import Calibration, DetectorSpec, LoadContext
from streamguard.hookspecs import hookimpl
from streamguard.intake.contract import InputContract

if TYPE_CHECKING:
    import torch

NAME = "univfd"
WEIGHTS_DIR = Path(__file__).parent / "weights"


def weights_dir(settings: Settings) -> Path:
    """The shipped head, unless ``detectors.options.univfd.weights_dir`` names another."""
    return Path(settings.detectors.options.get(NAME, {}).get("weights_dir", WEIGHTS_DIR))


@hookimpl
def register_detectors(register, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    directory = weights_dir(settings)

    def build(ctx: LoadContext) -> torch.nn.Module:
        from streamguard.backbone import load_backbone
        from streamguard.builtin.univfd.model import build_univfd

        return build_univfd(load_backbone(settings.backbone, ctx.device), directory)

    register(
        DetectorSpec(
            name=NAME,
            version=detector_version(directory),
            load=inprocess_loader(build),
            contract=InputContract(size=224, fit="resize"),
            calibration=Calibration.load(directory),
            weights_dir=directory,
            triton_model=NAME,  # `streamguard triton build` names the model after the detector
            description="UnivFD baseline: linear probe on the frozen CLIP ViT image embedding.",
        )
    )
