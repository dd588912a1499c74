"""The photo inside a screenshot (`find_inset`) and the views cut from it (``-inset``)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from images import encode
from PIL import Image, ImageDraw

from streamguard.config import IntakeSettings
from streamguard.intake import InputContract, decode_image, prepare, prepare_views
from streamguard.intake.contract import view_tag, with_views
from streamguard.intake.inset import INSET_VERSION, InsetRules, find_inset
from streamguard.training.renders import FeedPost, render_screen


def photo(size: tuple[int, int], seed: int, sky: bool = True) -> Image.Image:
    """Continuous tone as a camera gives it: smooth shapes, fine grain, and (``sky``) a clear sky in the top
    third, a smooth gradient with no grain, which is flat at block scale but drifts from block to block."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(coarse, np.float64) + rng.normal(0, 6, (h, w, 3))
    if sky:
        rows = h // 3
        ramp = np.linspace(120, 230, rows)[:, None, None] * np.ones((1, w, 1))
        pixels[:rows] = ramp * np.array([0.55, 0.75, 1.0])
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def screen(shown: Image.Image, at: tuple[int, int], size: tuple[int, int] = (1080, 1920),
           dark: bool = False) -> Image.Image:
    """An app's screen with ``shown`` pasted at ``at``: flat bars and cards, lines of text."""
    background, surface, ink = ((18, 18, 18), (40, 40, 44), (230, 230, 230)) if dark else \
        ((250, 250, 250), (235, 236, 240), (20, 20, 20))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, size[0], 90), fill=surface)
    draw.rectangle((0, size[1] - 140, size[0], size[1]), fill=surface)
    for k in range(6):
        draw.text((40, 120 + 40 * k), "a line of caption text " * 3, fill=ink, font_size=28)
    y = at[1] + shown.height + 30
    for k in range(8):
        draw.text((40, y + 40 * k), "comments and their replies, one line " * 2, fill=ink, font_size=28)
    image.paste(shown, at)
    return image


def decoded(image: Image.Image, fmt: str = "PNG", **kwargs: int) -> Image.Image:
    return Image.open(io.BytesIO(encode(image, fmt, **kwargs))).convert("RGB")


def overlap(found: tuple[int, int, int, int], truth: tuple[int, int, int, int]) -> float:
    """Intersection over union of two boxes."""
    inter = max(0, min(found[2], truth[2]) - max(found[0], truth[0])) * \
        max(0, min(found[3], truth[3]) - max(found[1], truth[1]))

    def area(b: tuple[int, int, int, int]) -> int:
        return (b[2] - b[0]) * (b[3] - b[1])

    return inter / (area(found) + area(truth) - inter)


@pytest.mark.parametrize("dark", [False, True], ids=["light", "dark"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_the_photo_a_screen_shows_is_found_sky_and_all(dark: bool, fmt: str) -> None:
    shown = photo((1080, 900), seed=1)
    truth = (0, 420, 1080, 1320)  # a phone gives the post its whole width
    box = find_inset(decoded(screen(shown, truth[:2], dark=dark), fmt, **({"quality": 75} if fmt == "JPEG" else {})))
    assert box is not None
    assert overlap(box, truth) > 0.9
    # Never reaching into the chrome: at most a reduced block's worth (~4 native px a 8 px block at 512) past
    # the frame, so what is judged is the photo.
    assert box[1] >= truth[1] - 8 and box[3] <= truth[3] + 8


def test_a_centred_column_on_a_wide_screen_is_found() -> None:
    shown = photo((700, 520), seed=2)
    truth = (610, 200, 1310, 720)
    box = find_inset(screen(shown, truth[:2], size=(1920, 1080)))
    assert box is not None and overlap(box, truth) > 0.9


def test_photos_and_screens_without_a_photo_have_no_inset() -> None:
    for seed in range(4):
        assert find_inset(photo((1024, 768), seed)) is None
        assert find_inset(photo((640, 960), seed, sky=False)) is None
    # A screen of text, bars and buttons holds nothing to judge apart from itself.
    for seed in range(12):
        assert find_inset(Image.open(io.BytesIO(render_screen(seed))).convert("RGB")) is None


def test_a_photos_own_flat_sky_does_not_make_it_a_screen() -> None:
    """A blown-out sky is exactly flat, one grey, like an app's background; but it meets the land along a
    ragged horizon, where a screen frames its photo with straight chrome (`InsetRules.min_frame`)."""
    land = np.asarray(photo((1200, 900), seed=6, sky=False)).copy()
    horizon = 330 + (60 * np.sin(np.arange(1200) / 70.0) + 40 * np.sin(np.arange(1200) / 23.0)).astype(int)
    for x, y in enumerate(horizon):
        land[:y, x] = 255
    image = Image.fromarray(land)
    assert find_inset(image) is None
    assert find_inset(image, InsetRules(min_frame=0.0)) is not None  # what the frame rule turns away


def test_a_thumbnail_is_not_what_a_screen_shows() -> None:
    """A photo under `InsetRules.min_share` of the screen (an avatar, a link preview) is not taken."""
    assert find_inset(screen(photo((160, 160), seed=3, sky=False), (460, 900))) is None


def test_feed_posts_are_found_inside_the_posts_frame() -> None:
    """`FeedPost` draws the chrome its own way (themes, sidebars, a quarter re-shared as JPEG): the photo,
    a textured blue one that no theme paints, is still what is found."""
    found = 0
    for seed in range(10):
        rng = np.random.default_rng(seed)
        red = photo((900, 640), seed, sky=False).getchannel("R")
        blue = Image.merge("RGB", (red, Image.new("L", red.size, 10), Image.new("L", red.size, 240)))
        post = FeedPost()(encode(blue, "JPEG", quality=int(rng.integers(85, 96))))
        shot = Image.open(io.BytesIO(post)).convert("RGB")
        pixels = np.asarray(shot).astype(np.int16)
        mask = (pixels[..., 1] < 60) & (pixels[..., 2] > 190)
        box = find_inset(shot)
        if box is None:
            continue
        found += 1
        left, top, right, bottom = box
        assert mask[top:bottom, left:right].mean() > 0.95  # inside the frame, give or take a line of chrome
        assert mask[top:bottom, left:right].sum() > 0.85 * mask.sum()  # and most of it
    assert found >= 8


def test_the_inset_view_is_the_photo_prepared_as_the_contract_says() -> None:
    shown = photo((1080, 900), seed=4)
    shot = screen(shown, (0, 420))
    image = decode_image(encode(shot, "PNG"), IntakeSettings())
    box = find_inset(image.rgb)
    assert box is not None
    inside = decode_image(encode(image.rgb.crop(box), "PNG"), IntakeSettings())
    for view in ("resize", "crops2+whole"):
        plain = with_views(InputContract(), view)
        inset = with_views(InputContract(), f"{view}-inset")
        assert inset.inset and not plain.inset
        make = prepare_views if plain.multiview else prepare
        np.testing.assert_array_equal(make(image, inset), make(inside, plain))
        assert not np.array_equal(make(image, inset), make(image, plain))
    # An image with no inset is prepared as it always was.
    alone = decode_image(encode(photo((800, 600), seed=5), "PNG"), IntakeSettings())
    np.testing.assert_array_equal(prepare(alone, with_views(InputContract(), "resize-inset")),
                                  prepare(alone, InputContract()))


def test_inset_view_names_and_versions() -> None:
    assert with_views(InputContract(), "crops4+whole-trimmed-inset").aggregate == "trimmed-mean"
    with pytest.raises(ValueError, match="-inset"):
        with_views(InputContract(), "resize-inset-trimmed")
    assert view_tag("resize-inset") == f"resize-inset{INSET_VERSION}"
    assert view_tag("crops2") == "crops2"
