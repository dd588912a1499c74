"""Twins: training images made again as a platform also meets them (`night`'s night mode of a real photo,
`renders`' feed screenshot of a real photo or of a generated image, `portraits`' portrait of a real photo's
person). A twin keeps its image's label and group, so it leaves training with that group in every fold, outer
or inner (`Embedded.without`, `choose_by_groups`)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from streamguard.evaluation.datasets import FAKE, REAL, Sample
from streamguard.training.night import NIGHT_VERSION, NightMode
from streamguard.training.portraits import PORTRAIT_VERSION, PortraitCrop, with_faces
from streamguard.training.renders import FEED_VERSION, FeedPost


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


def asked_twins(night: int = 0, feed: int = 0, feed_fake: int = 0, portrait: int = 0) -> list[Asked]:
    """The twins asked for, in the order their rows join training (the embedding order depends on it).
    ``feed_fake``: generated training images shown as feed posts, so that a feed's chrome is no cue to the
    real class and a screenshotted generation is still judged by its pixels. ``portrait``: real photos with a
    face, each cropped as a portrait of it."""
    kinds = (Asked("night", night, REAL, NightMode(), NIGHT_VERSION),
             Asked("feed", feed, REAL, FeedPost(), FEED_VERSION),
             Asked("feed_fake", feed_fake, FAKE, FeedPost(), FEED_VERSION),
             Asked("portrait", portrait, REAL, PortraitCrop(), PORTRAIT_VERSION, with_faces))
    for kind in kinds:
        if kind.count < 0:
            raise ValueError(f"{kind.name}_twins must be 0 or more, not {kind.count}")
    return [kind for kind in kinds if kind.count]


def twin_settings(asked: Sequence[Asked]) -> dict[str, list[int]]:
    """What a fold or a probe's meta records of its twins: a changed count or drawing must train again."""
    return {f"{kind.name}_twins": [kind.count, kind.recipe] for kind in asked}
