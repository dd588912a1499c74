"""The photo inside a screenshot (`find_inset`) and the views cut from it (``-inset``)."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from images import encode
from PIL import Image, ImageDraw

from streamguard.config import IntakeSettings
from streamguard.intake import DecodedImage, InputContract, decode_image, prepare, prepare_views
from streamguard.intake.contract import view_tag, with_views
from streamguard.intake.decode import decode_box
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


def texture(size: tuple[int, int], seed: int) -> Image.Image:
    """Detail 3 native pixels across: resolved at a 224-px view of a 570-px photo, lost at a quarter scale."""
    cells = np.random.default_rng(seed).integers(0, 256, (size[1] // 3, size[0] // 3, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize(size, Image.Resampling.NEAREST)


def test_a_photo_held_too_small_by_a_reduced_decode_is_decoded_again() -> None:
    # A landscape post on a phone: the screen's decode for a 224-px view is a quarter scale (270x480), which
    # holds the 1080x570 photo at 270x142.
    data = encode(screen(texture((1080, 570), seed=1), (0, 420)), "JPEG", quality=90)
    held, native = decode_image(data, IntakeSettings(), 224), decode_image(data, IntakeSettings())
    assert held.rgb.size == (270, 480)
    box = find_inset(held.rgb)
    assert box is not None and min(box[2] - box[0], box[3] - box[1]) < 224
    region = decode_box(held, box, 224)
    # The smallest draft scale that gives the photo the view's size: half, not the file's full size.
    assert 224 <= min(region.size) < 2 * 224 and abs(region.width - 540) <= 2
    # The view is what the native file's photo gives (the same box), not the held pixels enlarged.
    scale = native.rgb.width / held.rgb.width
    same_box = native.rgb.crop(tuple(round(v * scale) for v in box))
    reference = prepare(DecodedImage(same_box, "JPEG", *same_box.size), InputContract())
    enlarged = prepare(DecodedImage(held.rgb.crop(box), "JPEG", *same_box.size), InputContract())
    view = prepare(held, with_views(InputContract(), "resize-inset"))
    assert np.abs(view - reference).mean() < 0.5 * np.abs(enlarged - reference).mean()


def test_a_photo_the_held_pixels_serve_is_not_decoded_again() -> None:
    data = encode(screen(texture((1080, 900), seed=2), (0, 420)), "JPEG", quality=90)
    held = decode_image(data, IntakeSettings(), 224)
    box = find_inset(held.rgb)
    assert box is not None and min(box[2] - box[0], box[3] - box[1]) >= 224
    assert decode_box(held, box, 224).tobytes() == held.rgb.crop(box).tobytes()
    native = decode_image(data, IntakeSettings())
    native_box = find_inset(native.rgb)
    assert native_box is not None and decode_box(native, native_box, 224).size == native.rgb.crop(native_box).size


def test_bytes_that_fail_to_decode_again_keep_the_held_view() -> None:
    # A batch's inputs are prepared together: a second decode that fails must not cost the other images.
    data = encode(screen(texture((1080, 570), seed=5), (0, 420)), "JPEG", quality=90)
    held = decode_image(data, IntakeSettings(), 224)
    box = find_inset(held.rgb)
    assert box is not None
    for broken in (data[: len(data) // 2], b"not an image at all"):
        again = decode_box(replace(held, data=broken), box, 224)
        assert again.tobytes() == held.rgb.crop(box).tobytes()
    assert min(decode_box(held, box, 224).size) >= 224  # the intact bytes are decoded again


def test_decoding_again_keeps_the_orientation_and_serves_other_formats() -> None:
    upright = screen(texture((1080, 570), seed=3), (0, 420))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the file holds the screen on its side
    sideways = encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())
    held = decode_image(sideways, IntakeSettings(), 224)
    plain = decode_image(encode(upright, "JPEG", quality=95), IntakeSettings(), 224)
    assert held.rgb.size == plain.rgb.size == (270, 480)
    box = find_inset(held.rgb)
    assert box is not None and box == find_inset(plain.rgb)
    turned, straight = decode_box(held, box, 224), decode_box(plain, box, 224)
    assert turned.size == straight.size
    assert np.abs(np.asarray(turned, np.float32) - np.asarray(straight, np.float32)).mean() < 4
    # A PNG is reduced by an integer factor after decoding: its photo comes back at native pixels.
    shot = screen(texture((1440, 400), seed=4), (0, 420), size=(1440, 2560))
    reduced = decode_image(encode(shot, "PNG"), IntakeSettings(), 224)
    assert reduced.rgb.size == (720, 1280)
    assert decode_box(reduced, (0, 210, 720, 410), 224).tobytes() == shot.crop((0, 420, 1440, 820)).tobytes()


def test_inset_view_names_and_versions() -> None:
    assert with_views(InputContract(), "crops4+whole-trimmed-inset").aggregate == "trimmed-mean"
    with pytest.raises(ValueError, match="-inset"):
        with_views(InputContract(), "resize-inset-trimmed")
    assert view_tag("resize-inset") == f"resize-inset{INSET_VERSION}"
    assert view_tag("crops2") == "crops2"
