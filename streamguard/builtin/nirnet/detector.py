"""What the built-in NIRNet detector is, without torch: its weights directory, version, input and spec."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from streamguard.builtin.nirnet.files import CONFIG_FILE, WEIGHTS_FILE, NirnetConfig, has_weights, read_config, version
from streamguard.config import Settings, TritonSettings
from streamguard.detectors.spec import Calibration, DetectorBackend, DetectorInput, DetectorSpec, LoadContext
from streamguard.extras import missing_extra
from streamguard.intake.contract import InputContract
from streamguard.intake.decode import DecodedImage

log = structlog.get_logger(__name__)

FEATURE = "the in-process detector backend"


def contract(config: NirnetConfig) -> InputContract:
    """Native crops (never resized) as raw [0, 1] pixels: mean 0 and std 1 leave ``/ 255`` alone, so the
    extractor sees the values the imprint lives in. The trainer prepares its crops with this same contract."""
    return InputContract(size=config.crop_size, fit="crop", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                         crops=config.crops, aggregate=config.aggregate)


def whole_contract(image_size: int) -> InputContract:
    """CLIP's own input for the semantic branch, whatever the crops' contract: the resized, CLIP-normalised
    whole image. The in-process backend and the Triton backend both prepare it with this."""
    return InputContract(size=image_size, fit="resize")


def distinct_images(batch: Sequence[DetectorInput]) -> tuple[list[DecodedImage], list[int]]:
    """The distinct images of ``batch`` (crops of one image carry the very same `DecodedImage` object: by
    identity) and, for each input, the index of its image among them."""
    slot: dict[int, int] = {}
    images: list[DecodedImage] = []
    for item in batch:
        if id(item.image) not in slot:
            slot[id(item.image)] = len(images)
            images.append(item.image)
    return images, [slot[id(item.image)] for item in batch]


@dataclass(frozen=True)
class NirnetDetector:
    name: str
    default_weights: Path
    description: str

    def weights_dir(self, settings: Settings) -> Path:
        """``detectors.options.<name>.weights_dir`` when set, else the shipped folder."""
        return Path(settings.detectors.options.get(self.name, {}).get("weights_dir", self.default_weights))

    def spec(self, settings: Settings) -> DetectorSpec | None:
        """Its `DetectorSpec`, or None (and one warning) while its weights directory holds no trained model."""
        directory = self.weights_dir(settings)
        if not has_weights(directory):
            log.warning("detector.weights_missing", detector=self.name, weights_dir=str(directory),
                        hint=f"no {WEIGHTS_FILE} and {CONFIG_FILE} there: train NIRNet into it, or set "
                             f"detectors.options.{self.name}.weights_dir")
            return None
        try:
            config = read_config(directory)
        except (OSError, ValueError, TypeError) as exc:
            # One unreadable model must not take the plugin's hook down with it: say why and register nothing.
            log.warning("detector.config_unreadable", detector=self.name, weights_dir=str(directory),
                        error=f"{type(exc).__name__}: {exc}")
            return None

        def load(ctx: LoadContext) -> DetectorBackend:
            try:
                from streamguard.builtin.nirnet.backend import load_backend

                return load_backend(directory, settings.backbone, ctx.device)
            except ModuleNotFoundError as exc:
                extra = missing_extra(exc, FEATURE)
                if extra is None:
                    raise
                raise extra from exc

        return DetectorSpec(
            name=self.name,
            version=version(self.name, directory),
            load=load,
            contract=contract(config),
            calibration=Calibration.load(directory),
            weights_dir=directory,
            description=self.description,
            # On Triton: the ensemble `streamguard triton build` writes (`streamguard.triton.build_nirnet`), which
            # takes the crops as PIXELS like any model and, with the semantic branch, each crop's whole image
            # beside it: its own backend sends both (`streamguard.backends.triton_nirnet`).
            triton_model=self.name,  # the ensemble is named like the detector
            triton_backend=_triton_backend if config.semantic else None,
        )


def _triton_backend(model: str, settings: TritonSettings, version: str) -> DetectorBackend:
    # Imported here: registering the detector needs neither tritonclient nor numpy's Triton path.
    from streamguard.backends.triton_nirnet import NirnetTritonBackend

    return NirnetTritonBackend(settings, expected_version=version, model=model)
