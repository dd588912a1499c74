"""Twins: training images made again as a platform also meets them (`night`'s night mode of a real photo,
`renders`' feed screenshot of a real photo or of a generated image, `portraits`' portrait of a real photo's
person, `memes`' meme of an image of either class). A twin keeps its image's label and group, so it leaves
training with that group in every fold, outer or inner (`Embedded.without`, `choose_by_groups`)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import structlog

from streamguard.evaluation.datasets import FAKE, REAL, Sample, SampleReader
from streamguard.training.memes import MEME_VERSION, Meme
from streamguard.training.night import NIGHT_VERSION, NightMode
from streamguard.training.portraits import PORTRAIT_VERSION, PortraitCrop, with_faces
from streamguard.training.renders import FEED_VERSION, FeedPost

log = structlog.get_logger(__name__)


class Twins(Protocol):
    """An image's bytes -> its twin's (`matched`'s reconstruction, `night`'s night mode, `renders`' feed post);
    ``version`` is in the twins' embedding cache key."""

    version: str

    def __call__(self, data: bytes) -> bytes: ...


class KeptTwins(Twins, Protocol):
    """Twins that keep their image's label; ``suffix`` makes a twin's id, never taken for its image's in a split
    or cache."""

    suffix: str


def twin_photos(train: Sequence[Sample], count: int, seed: int) -> list[Sample]:
    """``count`` of the training images of one class (all when fewer), seeded: the same choice in every fold,
    whose held-out images then leave it (`Embedded.without`), so all folds share one embedding cache."""
    if len({s.label for s in train}) > 1:
        raise ValueError("twins are made of one class's images at a time")
    ordered = sorted(train, key=lambda s: s.id)
    return sorted(random.Random(seed).sample(ordered, min(count, len(ordered))), key=lambda s: s.id)


def twin_of(sample: Sample, maker: KeptTwins) -> Sample:
    """An image's twin: of the image's label and group (it leaves training with the image)."""
    return replace(sample, id=sample.id + maker.suffix)


@dataclass(frozen=True)
class Asked:
    """Twins a training run asked for: ``count`` images of class ``label`` through ``maker``, whose drawing is
    at ``recipe``. ``among``: the training images (and a cache folder) -> those a twin can be made of, where
    not every image makes one."""

    name: str
    count: int
    label: int
    maker: KeptTwins
    recipe: int
    among: Callable[[Sequence[Sample], Path], list[Sample]] | None = None


def asked_twins(night: int = 0, feed: int = 0, feed_fake: int = 0, portrait: int = 0, meme: int = 0) -> list[Asked]:
    """The twins asked for, in the order their rows join training (the embedding order depends on it).
    ``feed_fake``: generated training images shown as feed posts, so that a feed's chrome is no cue to the
    real class and a screenshotted generation is still judged by its pixels. ``portrait``: real photos with a
    face, each cropped as a portrait of it. ``meme``: as many images of each class made into memes, so that a
    caption is a cue to neither class (step 31: posts of one class only opened a hole for the other)."""
    kinds = (Asked("night", night, REAL, NightMode(), NIGHT_VERSION),
             Asked("feed", feed, REAL, FeedPost(), FEED_VERSION),
             Asked("feed_fake", feed_fake, FAKE, FeedPost(), FEED_VERSION),
             Asked("portrait", portrait, REAL, PortraitCrop(), PORTRAIT_VERSION, with_faces),
             Asked("meme", meme, REAL, Meme(), MEME_VERSION),
             Asked("meme_fake", meme, FAKE, Meme(), MEME_VERSION))
    for kind in kinds:
        if kind.count < 0:
            raise ValueError(f"{kind.name}_twins must be 0 or more, not {kind.count}")
    return [kind for kind in kinds if kind.count]


class TwinCounts(Protocol):
    """A training or LOSO config's twin counts, by the names `TrainConfig` and `LosoConfig` both give them."""

    night_twins: int
    feed_twins: int
    feed_fake_twins: int
    portrait_twins: int
    meme_twins: int


def asked_of(cfg: TwinCounts) -> list[Asked]:
    """The twins ``cfg`` asks its probe for (`asked_twins`)."""
    return asked_twins(night=cfg.night_twins, feed=cfg.feed_twins, feed_fake=cfg.feed_fake_twins,
                       portrait=cfg.portrait_twins, meme=cfg.meme_twins)


def twin_settings(asked: Sequence[Asked]) -> dict[str, list[int]]:
    """What a fold or a probe's meta records of its twins: a changed count or drawing must train again."""
    return {f"{kind.name}_twins": [kind.count, kind.recipe] for kind in asked}


def twin_files(asked: Sequence[Asked], samples: Sequence[Sample], seed: int, cache_dir: Path) -> list[Sample]:
    """Each asked kind's twins as files, for training that reads its samples from disk (the fine-tuned
    detectors' prefix cache keys an input by its sample), where a probe makes them as it embeds.

    Drawn as a probe draws them: among every training image of the kind's class, whatever a fold holds out,
    so all folds share the files; a twin is a sample of its image's label, group and split, so `split_samples`
    holds it out with its image. Written once under ``cache_dir`` (a twin depends only on its image's bytes
    and its maker's version); an image no twin can be made of is logged and left out, as an unreadable
    training image is."""
    out: list[Sample] = []
    reader = SampleReader()
    try:
        for kind in asked:
            pool = [s for s in samples if s.split == "train" and s.label == kind.label]
            pool = kind.among(pool, cache_dir) if kind.among is not None else pool
            root = cache_dir / f"twins-{kind.maker.version}"
            root.mkdir(parents=True, exist_ok=True)
            for sample in twin_photos(pool, kind.count, seed):
                path = root / f"{hashlib.sha256(sample.id.encode()).hexdigest()[:20]}.img"
                if not path.is_file():
                    try:
                        data = kind.maker(reader.read(sample))
                    except Exception as exc:  # noqa: BLE001 - one image without a twin is not fatal
                        log.warning("twins.skipped", kind=kind.name, sample=sample.id, error=str(exc))
                        continue
                    tmp = path.with_suffix(".tmp")
                    tmp.write_bytes(data)
                    tmp.replace(path)
                out.append(replace(twin_of(sample, kind.maker), path=str(path), member=None))
    finally:
        reader.close()
    return out
