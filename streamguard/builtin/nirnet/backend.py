"""NIRNet in this process: its crops through the noise branches, its images through CLIP for the semantic one.

Why the backend computes the CLIP embedding itself, from ``DetectorInput.image``: under a multi-view
contract the runner hands every crop to the backend as an input of its own, each carrying the decoded image
it came from, and averages the crops' logits. A ``whole`` view would instead be scored as one more crop
(its logit averaged with theirs, its resized pixels run through the noise branches, which is what NIRNet
must never do), and the shared CLIP trunk runs on the detector's own contract, i.e. on the crops. Here the
whole image is resized for CLIP once per image and its embedding joins each of its crops; the crops stay
the contract's raw native pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from streamguard.backbone import ClipImageEncoder, load_backbone
from streamguard.builtin.cliphead.model import HeadMismatch
from streamguard.builtin.nirnet.detector import distinct_images, whole_contract
from streamguard.builtin.nirnet.model import NIRNet, load_model
from streamguard.config import BackboneSettings
from streamguard.detectors.spec import DetectorInput
from streamguard.intake.contract import InputContract, prepare


# Crops per forward pass. The extractor keeps full resolution through every layer: a batch of 16 images
# x 4 crops of 256 px would hold ~0.5 GB per activation at width 32, so crops go through in slices.
CROPS_PER_PASS = 16


def semantic_contract(encoder: ClipImageEncoder) -> InputContract:
    """CLIP's own input, whatever the crops' contract: the resized, CLIP-normalised whole image. The trainer
    (`streamguard.training.nirnet`) embeds its images through this very contract."""
    return whole_contract(encoder.image_size)  # the one the Triton backend prepares for the ensemble's CLIP


class NirnetBackend:
    """`DetectorBackend` of NIRNet: one logit per input crop; ``encoder`` is required by the semantic branch."""

    def __init__(self, model: NIRNet, encoder: ClipImageEncoder | None = None, device: str = "cpu",
                 crops_per_pass: int = CROPS_PER_PASS) -> None:
        if model.config.semantic and encoder is None:
            raise ValueError("this NIRNet has a semantic branch: it needs the CLIP encoder")
        self._device = torch.device(device)
        self._per_pass = max(1, crops_per_pass)
        self._model = model.eval().to(self._device)
        self._encoder = encoder.eval().to(self._device) if model.config.semantic and encoder is not None else None
        self._whole = semantic_contract(self._encoder) if self._encoder is not None else None

    def predict(self, batch: Sequence[DetectorInput]) -> list[float | None]:
        if not batch:
            return []
        if any(item.pixels is None for item in batch):
            raise ValueError("NIRNet needs its crops; declare its InputContract on the detector")
        embeddings = self._embeddings(batch)
        logits: list[float | None] = []
        for at in range(0, len(batch), self._per_pass):
            part = batch[at:at + self._per_pass]
            crops = torch.from_numpy(np.stack([item.pixels for item in part])).to(self._device)  # type: ignore[misc]
            with torch.inference_mode():
                out = self._model(crops, None if embeddings is None else embeddings[at:at + len(part)])
            logits.extend(float(v) for v in out.float().cpu().tolist())
        return logits

    def _embeddings(self, batch: Sequence[DetectorInput]) -> torch.Tensor | None:
        """Each input's CLIP embedding of the image it came from: one encoder pass per distinct image."""
        if self._encoder is None or self._whole is None:
            return None
        images, slots = distinct_images(batch)  # the Triton backend sends each crop's image the same way
        pixels = torch.from_numpy(np.stack([prepare(image, self._whole) for image in images])).to(self._device)
        with torch.inference_mode():
            embeddings = self._encoder(pixels).float()
        return embeddings[torch.tensor(slots, device=self._device)]

    def close(self) -> None:
        self._model.to("cpu")
        if self._encoder is not None:
            self._encoder.to("cpu")


def load_backend(directory: Path, backbone: BackboneSettings, device: str = "cpu") -> NirnetBackend:
    """NIRNet from ``directory``, with the ``backbone`` CLIP encoder when its semantic branch needs one.

    The encoder runs at fp32 whatever ``backbone.precision``: it is one pass per image (not per crop), and a
    single precision keeps the version naming one model."""
    model = load_model(directory, device)
    config = model.config
    if not config.semantic:
        return NirnetBackend(model, None, device)
    encoder = load_backbone(backbone, device, precision="fp32")
    hint = "retrain it on this backbone, or serve a model without the semantic branch"
    if encoder.embed_dim != config.semantic_dim:
        raise HeadMismatch(f"the nirnet semantic branch in {directory} expects {config.semantic_dim}-d CLIP "
                           f"embeddings but the backbone gives {encoder.embed_dim}; {hint}")
    if config.backbone is not None and config.backbone != encoder.version:
        # Same width, other weights: the embeddings' directions mean something else to its MLP.
        raise HeadMismatch(f"the nirnet semantic branch in {directory} was trained on backbone {config.backbone}, "
                           f"this backbone is {encoder.version}; {hint}")
    return NirnetBackend(model, encoder, device)
