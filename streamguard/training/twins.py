"""Real-class twins: real training photos made again as a platform also meets them (`night`'s night mode,
`renders`' feed screenshots). A twin keeps its photo's label and source, so it leaves training with that
source in every fold, outer or inner (`Embedded.without`, `choose_by_groups`)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from streamguard.evaluation.datasets import REAL, Sample
from streamguard.training.night import NIGHT_VERSION, NightMode
from streamguard.training.renders import FEED_VERSION, FeedPost


class Twins(Protocol):
    """An image's bytes -> its twin's (`matched`'s reconstruction, `night`'s night mode, `renders`' feed post);
    ``version`` is in the twins' embedding cache key."""

    version: str

    def __call__(self, data: bytes) -> bytes: ...


class RealTwins(Twins, Protocol):
    """Twins that stay real; ``suffix`` makes a twin's id, never taken for its photo's in a split or cache."""

    suffix: str


def twin_photos(train_reals: Sequence[Sample], count: int, seed: int) -> list[Sample]:
    """``count`` of the real training photos (all when fewer), seeded: the same choice in every fold, whose
    held-out photos then leave it (`Embedded.without`), so all folds share one embedding cache."""
    if any(s.label != REAL for s in train_reals):
        raise ValueError("real-class twins are made of real photos only")
    ordered = sorted(train_reals, key=lambda s: s.id)
    return sorted(random.Random(seed).sample(ordered, min(count, len(ordered))), key=lambda s: s.id)


def twin_of(sample: Sample, maker: RealTwins) -> Sample:
    """A real photo's twin: real, of the photo's source (it leaves training with the photo)."""
    return replace(sample, id=sample.id + maker.suffix)


@dataclass(frozen=True)
class Asked:
    """Twins a training run asked for: ``count`` photos through ``maker``, whose drawing is at ``recipe``."""

    name: str
    count: int
    maker: RealTwins
    recipe: int


def real_twins(night: int = 0, feed: int = 0) -> list[Asked]:
    """The real-class twins asked for, in the order their rows join training (the embedding order depends on it)."""
    kinds = (Asked("night", night, NightMode(), NIGHT_VERSION), Asked("feed", feed, FeedPost(), FEED_VERSION))
    for kind in kinds:
        if kind.count < 0:
            raise ValueError(f"{kind.name}_twins must be 0 or more, not {kind.count}")
    return [kind for kind in kinds if kind.count]


def twin_settings(asked: Sequence[Asked]) -> dict[str, list[int]]:
    """What a fold or a probe's meta records of its twins: a changed count or drawing must train again."""
    return {f"{kind.name}_twins": [kind.count, kind.recipe] for kind in asked}
