"""Procedural screenshots in univfd's real class (`streamguard.training.renders`): what a render is, that it
is reproducible from its seed, and that no fold, outer or inner, ever holds one out; what a feed post's
screenshot of a real photo is."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from images import encode
from streamguard.evaluation.datasets import REAL
from streamguard.training.loso import Fold
from streamguard.training.probe_choice import Candidate, Embedded, choose_by_groups
from streamguard.training.renders import FEED_ASPECTS, SCREENS, SOURCE, FeedPost, render_screen, rendered_samples


def test_a_render_is_a_lossless_screen_reproducible_from_its_seed() -> None:
    first, again, other = render_screen(7), render_screen(7), render_screen(8)
    assert first == again and first != other
    image = Image.open(io.BytesIO(first))
    assert image.format == "PNG" and image.size in SCREENS
    pixels = np.asarray(image.convert("RGB"))
    # Flat fills, as a UI is drawn: most of the screen is a handful of colours...
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    assert np.sort(counts)[::-1][:8].sum() > 0.8 * counts.sum()
    # ...and edges anti-aliased by the 2x supersampling: intermediate shades exist beside the fills.
    assert len(colours) > 30


def test_rendered_samples_are_real_training_images_written_once(tmp_path: Path) -> None:
    samples = rendered_samples(3, seed=5, cache_dir=tmp_path)
    assert [s.label for s in samples] == [REAL] * 3
    assert {s.source for s in samples} == {SOURCE} and {s.split for s in samples} == {"train"}
    assert len({s.id for s in samples}) == 3
    written = Path(samples[0].path)
    stamp = written.stat().st_mtime_ns
    assert rendered_samples(3, seed=5, cache_dir=tmp_path)[0].path == str(written)
    assert written.stat().st_mtime_ns == stamp  # not drawn again
    assert rendered_samples(1, seed=6, cache_dir=tmp_path)[0].id != samples[0].id


def test_renders_stay_in_every_inner_fold() -> None:
    """Extra rows of no data group are fitted on by every inner fold, and never scored as a left-out group."""
    from streamguard.evaluation.datasets import FAKE, Sample

    def sample(name: str, i: int, label: int, split: str = "train") -> Sample:
        return Sample(id=f"r/{name}/{i}{split}", path="x", member=None, label=label,
                      generator="real" if label == REAL else name, family="x",
                      source=name if label == REAL else "r", split=split)

    rng = np.random.default_rng(0)
    train_samples = [sample(f"src{k}", i, REAL) for k in range(3) for i in range(5)] + [
        sample(f"gen{k}", i, FAKE) for k in range(3) for i in range(5)]
    val_samples = [sample(s.group, 0, s.label, "val") for s in train_samples[::5]]
    renders = [sample(SOURCE, i, REAL) for i in range(4)]

    def embedded(samples: list[Sample], mark: float) -> Embedded:
        x = np.concatenate([rng.normal(0, 1, (len(samples), 3)), np.full((len(samples), 1), mark)], axis=1)
        return Embedded(x, np.arange(len(samples)), samples)

    fitted: list[int] = []

    def fit(cand: object, x: np.ndarray, y: np.ndarray) -> object:
        from sklearn.linear_model import LogisticRegression

        fitted.append(int((x[:, -1] == 1.0).sum()))
        return LogisticRegression().fit(x, y)

    folds = [Fold("a", generators=("gen0",), sources=("src0",)), Fold("b", generators=("gen1",), sources=("src1",))]
    chosen = choose_by_groups(embedded(train_samples, 0.0), embedded(val_samples, 0.0), [Candidate(1.0)],
                              lambda x, c: x, fit, {}, folds, extra=embedded(renders, 1.0))
    assert fitted == [4, 4]  # every fold fits on all four renders
    assert chosen is not None


def photo_frame(screenshot: Image.Image, colour: tuple[int, int, int]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Where a screenshot shows a photo of one flat ``colour`` (JPEG's error allowed), and its bounding box."""
    pixels = np.asarray(screenshot.convert("RGB"), np.int16)
    mask = (np.abs(pixels - np.asarray(colour, np.int16)) < 12).all(axis=-1)
    rows, cols = np.nonzero(mask)
    return mask, (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)


def flat_photo(k: int, size: tuple[int, int]) -> tuple[bytes, tuple[int, int, int]]:
    colour = (13 + 3 * k, 200 - 5 * k, 77 + 4 * k)  # colours a theme's greys and accent hardly meet
    return encode(Image.new("RGB", size, colour), "JPEG", quality=95), colour


def test_a_feed_post_shows_the_photo_in_an_apps_frame_reproducibly() -> None:
    """The photo fills a phone's width or a centred column on a wider screen, between the app's chrome."""
    post, portrait = FeedPost(), set()
    for k in range(12):
        photo, colour = flat_photo(k, (900, 600))
        shot = post(photo)
        assert shot == post(photo)  # the same in every fold and draw
        image = Image.open(io.BytesIO(shot))
        assert image.format in ("PNG", "JPEG") and image.size in SCREENS
        mask, (left, top, right, bottom) = photo_frame(image, colour)
        assert mask[top:bottom, left:right].mean() > 0.97  # one rectangle: the post's frame
        width, height = image.size
        if height > width:
            assert right - left >= width - 2  # a phone gives the post its whole width
            assert abs((bottom - top) - (right - left) / 1.5) <= 6  # and keeps a 3:2 photo's shape (JPEG blurs edges)
        else:
            assert right - left < 0.6 * width and abs(left - (width - right)) <= 3  # a centred column
        assert 0.15 < mask.mean() < 0.85  # with the app's chrome around it
        portrait.add(height > width)
    assert portrait == {True, False}
    assert post(flat_photo(0, (900, 600))[0]) != post(flat_photo(1, (900, 600))[0])


def test_a_feed_post_crops_a_panorama_to_the_apps_widest_frame() -> None:
    for k in range(4):
        photo, colour = flat_photo(k, (2000, 500))
        _, (left, top, right, bottom) = photo_frame(Image.open(io.BytesIO(FeedPost()(photo))), colour)
        assert abs((bottom - top) - (right - left) / FEED_ASPECTS[1]) <= 6


def test_a_feed_post_shows_the_photo_the_right_way_round() -> None:
    left_colour, right_colour = (200, 30, 40), (30, 60, 210)
    photo = Image.new("RGB", (800, 600), left_colour)
    photo.paste(right_colour, (400, 0, 800, 600))
    image = Image.open(io.BytesIO(FeedPost()(encode(photo, "PNG"))))
    _, (l_left, l_top, l_right, l_bottom) = photo_frame(image, left_colour)
    _, (r_left, r_top, r_right, r_bottom) = photo_frame(image, right_colour)
    assert abs(l_right - r_left) <= 4 and abs(l_top - r_top) <= 2 and abs(l_bottom - r_bottom) <= 2
    assert abs((l_right - l_left) - (r_right - r_left)) <= 4  # the halves stay halves
