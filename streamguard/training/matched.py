"""Content-matched fakes for the probe: each real training photo, reconstructed through an autoencoder,
comes back as a generated image.

"Aligned datasets" (Rajan et al., ICLR'25) and B-Free (CVPR'25) make the generated class out of the real
one, so that the two classes differ only by a decoder's imprint: content, size and format cannot be what
the probe learns. Without a generator's VAE offline, the decoder is NIRNet's simulator's
(`nirnet.autoencoder.TinyAutoencoder`: latent-diffusion's downsampling and nearest-neighbour upsampling),
trained here on real photos only, as a VAE is.

Under leave-one-source-out the autoencoder must not have seen the held-out photos: it learns on the real
photos of the first data root that holds none of the held-out real sources (`reference_root`), so a fold
that holds out one of wild-train's real sources gets an autoencoder trained on wild-more's, and the
others wild-train's.

Measured, not shipped (docs/validation.md step 22): on one draw +0.026 balanced AUC over the 26 LOSO folds,
but -0.037 after JPEG q75, and no more decisive under the 2% false-flag rule.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import structlog
import torch
from PIL import Image, JpegImagePlugin

from streamguard.config import IntakeSettings
from streamguard.evaluation.datasets import FAKE, REAL, Sample
from streamguard.intake import decode_image
from streamguard.training.nirnet.autoencoder import (
    TRAINING_CROP,
    TRAINING_IMAGES,
    AutoencoderConfig,
    TinyAutoencoder,
    train_autoencoder,
)
from streamguard.training.nirnet.groups import choose, read_crops

log = structlog.get_logger(__name__)

GENERATOR = "matched-autoencoder"
SUFFIX = "#matched"
# Real photos are brought to a generator's output size before the reconstruction: a 12-megapixel photo's
# imprint would be shrunk away by the training augmentation's rescale (shortest side 160-512), while
# generated images are mostly 256-1024 px.
MAX_SIDE = 512
# In the embedding cache key and the LOSO folds' settings: twins encoded another way must never pass for these.
TWIN_FORMAT = "photo-format"
# NIRNet's autoencoder trained for longer: at its 300 steps the twins are blurred and their colours shift (L1
# 0.089), which the probe would learn as "generated" and then find in night and low-light photos. 10,000 steps
# at lr 4e-3 (~2.5 min on 2 cores) reach L1 0.026 and a mean PSNR of 26.5 dB on 20 wild-train photos it never
# saw, within the range the latent-diffusion paper reports for its autoencoders (about 23-28 dB).
AUTOENCODER_STEPS = 10_000
AUTOENCODER_LR = 4e-3
AUTOENCODER = AutoencoderConfig(factor=4, width=16, latent_channels=4)


def root_of(sample: Sample) -> str:
    """The data root's id that `load_samples` put in front of every sample id."""
    return sample.id.split("/", 1)[0]


def reference_root(samples: Sequence[Sample], held_sources: Sequence[str]) -> str:
    """The first root (in the order of the data) with real photos and none of ``held_sources``' photos."""
    roots: dict[str, set[str]] = {}
    for s in samples:
        if s.label == REAL:
            roots.setdefault(root_of(s), set()).add(s.source)
    for root, sources in roots.items():
        if not sources & set(held_sources):
            return root
    raise ValueError(f"matched fakes need a data root whose real photos are all in training; every root "
                     f"holds one of {sorted(held_sources)}")


class Matcher:
    """Real image bytes -> the bytes of their reconstruction (shortest side at most ``MAX_SIDE``), in the
    photo's format: a JPEG photo's twin in its JPEG tables, any other's as PNG."""

    def __init__(self, model: TinyAutoencoder, root: str, intake: IntakeSettings) -> None:
        self.model = model.eval()
        self.intake = intake
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.numpy().tobytes())
        # In the embedding cache key: other weights must never read this reconstruction's embeddings.
        self.version = f"{root}-{digest.hexdigest()[:10]}-{TWIN_FORMAT}"

    def __call__(self, data: bytes) -> bytes:
        source = Image.open(io.BytesIO(data))
        image = decode_image(data, self.intake, None).rgb.convert("RGB")
        scale = MAX_SIDE / min(image.size)
        if scale < 1:
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.LANCZOS)
        pixels = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)[None]
        with torch.inference_mode():
            out = self.model.reconstruct(pixels)[0]
        array = (out.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        if source.format == "JPEG":
            # In the photo's own JPEG tables, so the format says nothing about the class ("Fake or JPEG?").
            # It was meant to mend the lossless twins' fragility under JPEG q75 (-0.040 on LOSO) and did not
            # (-0.037); more likely the smoothing the twins teach is what JPEG breaks (docs/validation.md step 22).
            sampling = JpegImagePlugin.get_sampling(source)
            Image.fromarray(array).save(buffer, format="JPEG", qtables=source.quantization,
                                        **({"subsampling": sampling} if sampling >= 0 else {}))
        else:
            Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()


def train_matcher(samples: Sequence[Sample], held_sources: Sequence[str], seed: int, intake: IntakeSettings,
                  cache_dir: Path | None = None) -> Matcher:
    """The autoencoder of ``reference_root``'s real training photos (train split), seeded; kept in
    ``cache_dir`` under what it was trained on, since every fold of a LOSO run with the same root asks again."""
    root = reference_root(samples, held_sources)
    reals = [s for s in samples if s.label == REAL and s.split == "train" and root_of(s) == root]
    chosen = choose(reals, TRAINING_IMAGES, seed)
    steps = AUTOENCODER_STEPS
    request = [root, seed, steps, AUTOENCODER_LR, TRAINING_CROP, asdict(AUTOENCODER), [s.id for s in chosen]]
    cache = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps(request).encode()).hexdigest()[:16]
        cache = cache_dir / f"matcher-{root}-{key}.pt"
        if cache.is_file():
            model = TinyAutoencoder(AUTOENCODER)
            model.load_state_dict(torch.load(cache, weights_only=True))
            return Matcher(model, root, intake)
    crops = [pixels for _, pixels in read_crops(chosen, TRAINING_CROP, seed, intake=intake)
             if min(pixels.shape[-2:]) >= TRAINING_CROP]
    if not crops:
        raise ValueError(f"matched fakes: no real training photo of {root} has {TRAINING_CROP} px a side")
    trained = train_autoencoder(crops, steps=steps, seed=seed, crop=TRAINING_CROP, config=AUTOENCODER,
                                lr=AUTOENCODER_LR)
    log.info("train.matcher_trained", root=root, images=len(crops), steps=trained.steps,
             final_loss=round(sum(trained.losses[-100:]) / len(trained.losses[-100:]), 5))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(trained.model.state_dict(), cache)
    return Matcher(trained.model, root, intake)


def matched(sample: Sample) -> Sample:
    """The generated twin of a real sample: its own id, the generator's name, the photo's source (so that it
    leaves training with its photo's group)."""
    return replace(sample, id=sample.id + SUFFIX, label=FAKE, generator=GENERATOR, family="simulated")

