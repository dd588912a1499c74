"""`streamguard train nirnet`'s configuration: what defines the weights, and the command that reproduces them.

CPU defaults, and why:
- ``crop_size`` 128 and ``crops`` 2 training crops per image per epoch (at random native positions, a
  different pair each epoch): the extractor runs at full resolution through every layer, so a 128 px crop
  costs a quarter of a 256 px one, and two crops an image at batches of 8 images keep a CPU step near a
  second. ``serve_crops`` 4: the served contract (and validation, which scores exactly as served) averages
  four crops spread over the image, a cheap gain at inference that training does not pay for.
- The model's sizes are `NirnetConfig`'s (depth 8, width 32, features 64): the paper's extractor is a
  DnCNN of this shape; the tests shrink them.
- ``simulated_share`` 0.5: half the real crops of an epoch also come back imprinted as a label-1 sample
  (a content-matched pair), so the simulator's fakes are as many as a quarter of the batch, not a majority
  that would drown the real generators' own imprints.
- ``jpeg_share`` 0.2: one crop in five (of either class) is JPEG re-encoded, as platforms re-encode uploads.
- ``residual_source`` denoiser: needs nothing trained or downloaded, and it measures every training
  generator's own imprint (one statistic per generator); ``autoencoder`` trains a tiny VAE-shaped
  autoencoder here, ``vae:PATH`` uses an operator's diffusers AutoencoderKL.
- ``difference_vae`` None: the Difference-Aware Loss needs a VAE encoder, and none ships or downloads here;
  ``difference_weight`` 0.1 when one is given keeps it a shaping term beside the classification loss (both
  start near 1: the loss is relative to the latent difference's energy, BCE near log 2).
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamguard.builtin.nirnet.files import BRANCHES, NirnetConfig

DEFAULT_OUT = Path(".cache/nirnet")  # shipping is a deliberate copy into the plugin's weights/ folder
RESIDUAL_SOURCES = ("denoiser", "autoencoder", "vae:PATH")
# The ablations `train loso --method` trains per fold, by name: each is the default recipe with one thing
# changed, so its held-out scores beside "nirnet"'s say what that thing is worth on unseen sources.
ABLATIONS: dict[str, dict[str, Any]] = {
    "nirnet-no-simulator": {"simulator": False},
    "nirnet-autoencoder": {"residual_source": "autoencoder"},
    **{f"nirnet-{branch}": {"branches": (branch,)} for branch in BRANCHES},
}


@dataclass(frozen=True)
class NirnetRecipe:
    data: tuple[str, ...]
    out: Path = DEFAULT_OUT
    seed: int = 0
    epochs: int = 5
    batch_size: int = 8  # images per step; each brings `crops` crops and its simulated fakes
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 2  # epochs without a better validation AUC (ties: lower log-loss) before stopping
    crop_size: int = 128
    crops: int = 2  # training crops per image and epoch
    serve_crops: int = 4  # crops of the served contract, which validation scores through
    branches: tuple[str, ...] = BRANCHES
    extractor_depth: int = 8
    width: int = 32  # extractor and branch width
    feature_dim: int = 64
    hidden_dim: int = 64
    simulator: bool = True
    simulated_share: float = 0.5  # chance that a real training crop also comes back imprinted (label 1)
    residual_source: str = "denoiser"
    autoencoder_steps: int = 200
    jpeg_share: float = 0.2  # chance that any training crop, whatever its label, is JPEG re-encoded
    # The Difference-Aware Loss on the simulator's pairs, through an operator's diffusers AutoencoderKL
    # (`difference.py`); off without one, as nothing of the kind ships or downloads here.
    difference_vae: str | None = None
    difference_weight: float = 0.1
    fit_max_per_group: int = 64  # images per generator the imprint statistics are fitted on
    pool_below: int = 8  # generators with fewer training fakes are pooled with their family for the stats
    limit_per_group: int | None = None
    holdout_generators: tuple[str, ...] = ()
    holdout_sources: tuple[str, ...] = ()
    device: str = "cpu"
    cache_dir: Path = Path(".cache/train")
    checkpoint_dir: Path | None = None  # default: under cache_dir, per output folder
    resume: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        if min(self.epochs, self.batch_size, self.patience, self.crop_size, self.crops, self.serve_crops) < 1:
            raise ValueError("epochs, batch_size, patience, crop_size, crops and serve_crops must be at least 1")
        if not 0.0 <= self.simulated_share <= 1.0 or not 0.0 <= self.jpeg_share <= 1.0:
            raise ValueError("simulated_share and jpeg_share are probabilities, in [0, 1]")
        if self.residual_source not in ("denoiser", "autoencoder") and not self.residual_source.startswith("vae:"):
            raise ValueError(f"residual source must be one of {RESIDUAL_SOURCES}, not {self.residual_source!r}")
        if self.residual_source == "vae:":
            raise ValueError("vae:PATH needs the path of a diffusers AutoencoderKL")
        if self.difference_vae is not None:
            if not self.simulator:
                raise ValueError("the Difference-Aware Loss learns from the simulator's pairs: it needs the simulator")
            if "noise" not in self.branches and "frequency" not in self.branches:
                raise ValueError("the Difference-Aware Loss trains the extractor, which only the noise and "
                                 "frequency branches read")
            if self.difference_weight <= 0:
                raise ValueError("difference_weight must be positive")
        self.model_config()  # branches and sizes checked where the model defines them

    @property
    def semantic(self) -> bool:
        return "semantic" in self.branches

    def model_config(self, semantic_dim: int = 512, backbone: str | None = None) -> NirnetConfig:
        return NirnetConfig(crop_size=self.crop_size, crops=self.serve_crops, extractor_depth=self.extractor_depth,
                            extractor_width=self.width, branch_width=self.width, feature_dim=self.feature_dim,
                            semantic_dim=semantic_dim, hidden_dim=self.hidden_dim, branches=tuple(self.branches),
                            backbone=backbone)

    def fingerprint(self) -> dict[str, Any]:
        """What defines the trained weights: a checkpoint resumes only under the same fingerprint. Left out:
        the epoch budget (resuming to train longer is the point), where files go, the device and the bars."""
        keep = ("seed", "batch_size", "lr", "weight_decay", "patience", "crop_size", "crops", "serve_crops",
                "extractor_depth", "width", "feature_dim", "hidden_dim", "simulator", "simulated_share",
                "residual_source", "autoencoder_steps", "jpeg_share", "fit_max_per_group", "pool_below",
                "limit_per_group")
        out: dict[str, Any] = {"method": "nirnet", "data": list(self.data), "branches": list(self.branches),
                               "holdout_generators": list(self.holdout_generators),
                               "holdout_sources": list(self.holdout_sources)}
        out.update({k: getattr(self, k) for k in keep})
        if self.difference_vae is not None:  # only when on: checkpoints of runs without it stay resumable
            out.update(difference_vae=self.difference_vae, difference_weight=self.difference_weight)
        return json.loads(json.dumps(out, default=str))

    def resolved_checkpoint_dir(self) -> Path:
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        key = hashlib.sha256(str(self.out.resolve()).encode()).hexdigest()[:10]
        return self.cache_dir / "checkpoints" / f"nirnet-{key}"

    def command(self) -> str:
        """The ``streamguard train nirnet`` command line that reproduces this recipe's weights."""
        args = ["streamguard", "train", "nirnet"]
        for root in self.data:
            args += ["--data", root]
        args += ["--seed", str(self.seed), "--epochs", str(self.epochs), "--batch-size", str(self.batch_size),
                 "--lr", repr(self.lr), "--weight-decay", repr(self.weight_decay), "--patience", str(self.patience),
                 "--crop-size", str(self.crop_size), "--crops", str(self.crops),
                 "--serve-crops", str(self.serve_crops), "--branches", ",".join(self.branches),
                 "--extractor-depth", str(self.extractor_depth), "--width", str(self.width),
                 "--feature-dim", str(self.feature_dim), "--hidden-dim", str(self.hidden_dim),
                 "--jpeg-share", repr(self.jpeg_share)]
        if self.simulator:
            args += ["--simulated-share", repr(self.simulated_share), "--residual-source", self.residual_source]
            if self.residual_source == "autoencoder":
                args += ["--autoencoder-steps", str(self.autoencoder_steps)]
            if self.difference_vae is not None:
                args += ["--difference-vae", self.difference_vae, "--difference-weight", repr(self.difference_weight)]
        else:
            args.append("--no-simulator")
        if self.limit_per_group is not None:
            args += ["--limit-per-group", str(self.limit_per_group)]
        for generator in self.holdout_generators:
            args += ["--holdout-generator", generator]
        for source in self.holdout_sources:
            args += ["--holdout-source", source]
        return shlex.join(args)
