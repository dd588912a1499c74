"""Perturbations: bytes in, different bytes out, decodable, sized and encoded as documented."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from streamguard.errors import CorruptImage
from streamguard.evaluation.perturb import (FEED_POST, MEME, NORMALIZED, PERTURBATIONS, SWEEP, cache_tag,
                                            parse_perturbations, perturb)
from streamguard.training.memes import MEME_VERSION, Meme
from streamguard.training.renders import FEED_VERSION, SCREENS, FeedPost
from test_eval_datasets import BRIGHT, encoded


def opened(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.mark.parametrize("name", list(PERTURBATIONS))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_every_perturbation_changes_bytes_and_decodes(name: str, fmt: str) -> None:
    # Pillow's default JPEG quality is 75: re-saving such a file at q=75 can give the very same bytes.
    data = encoded(BRIGHT, fmt, size=(64, 48), **({"quality": 92} if fmt == "JPEG" else {}))
    out = perturb(name, data)
    assert out != data
    img = opened(out)
    assert img.mode == "RGB"
    assert out == perturb(name, data), "perturbations must be deterministic"


def test_formats_and_sizes() -> None:
    png, jpeg = encoded(BRIGHT, "PNG", size=(64, 48)), encoded(BRIGHT, "JPEG", size=(64, 48))
    assert opened(perturb("jpeg30", png)).format == "JPEG"
    assert opened(perturb("blur2", png)).format == "PNG"
    assert opened(perturb("blur2", jpeg)).format == "JPEG"  # no format shortcut handed to the detector
    assert opened(perturb("downscale0.5", png)).size == (32, 24)
    assert opened(perturb("downscale0.25", jpeg)).size == (16, 12)
    norm = opened(perturb(NORMALIZED, png))
    assert (norm.format, norm.size) == ("JPEG", (256, 256))
    assert opened(perturb(NORMALIZED, encoded(BRIGHT, "PNG", size=(300, 1000)))).size == (256, 256)
    big = encoded(BRIGHT, "PNG", size=(2000, 1000))
    social = opened(perturb("social", big))
    assert (social.format, social.size) == ("JPEG", (1080, 540))
    assert opened(perturb("social", png)).size == (64, 48)  # small images are not enlarged


def test_brightness_survives_so_labels_stay_meaningful() -> None:
    data = encoded(BRIGHT, "PNG", size=(64, 48))
    for name in (*SWEEP, NORMALIZED):  # the feed post adds an app's chrome: its brightness is the app's
        mean = np.asarray(opened(perturb(name, data)).convert("L")).mean() / 255
        assert abs(mean - BRIGHT) < 0.05, name


def test_undecodable_bytes_raise_the_intake_error() -> None:
    with pytest.raises(CorruptImage):
        perturb("jpeg75", encoded(BRIGHT, "JPEG")[:200])
    assert perturb("none", b"anything") == b"anything"


def test_parse_perturbations() -> None:
    assert parse_perturbations("none") == []
    assert parse_perturbations("all") == list(SWEEP)
    assert parse_perturbations("blur2,jpeg") == ["jpeg95", "jpeg75", "jpeg50", "jpeg30", "blur2"]
    assert parse_perturbations("social, downscale") == ["downscale0.5", "downscale0.25", "social"]
    assert parse_perturbations("feedpost,jpeg75") == ["jpeg75", FEED_POST]  # asked by name only
    assert parse_perturbations("meme, feedpost") == [FEED_POST, MEME]
    assert FEED_POST not in parse_perturbations("all") and MEME not in parse_perturbations("all")
    with pytest.raises(ValueError, match="unknown perturbation 'sepia'"):
        parse_perturbations("jpeg,sepia")


def test_feed_post_shows_the_decoded_image_in_a_screenshot() -> None:
    jpeg = encoded(BRIGHT, "JPEG", size=(300, 200), quality=92)
    out = perturb(FEED_POST, jpeg)
    shot = opened(out)
    assert shot.size in SCREENS  # a whole screen, the photo inside it
    # The post is drawn from the decoded pixels, as the training twins are from a photo's bytes: a JPEG's
    # own bytes would seed and decode alike, but the perturbation's input is the intake's decode.
    decoded = io.BytesIO()
    opened(jpeg).convert("RGB").save(decoded, format="PNG", compress_level=1)
    assert out == FeedPost()(decoded.getvalue())
    assert cache_tag(FEED_POST).endswith(f".{FEED_VERSION}")  # a redrawn post is scored again


def test_meme_captions_the_decoded_image() -> None:
    jpeg = encoded(BRIGHT, "JPEG", size=(300, 200), quality=92)
    out = perturb(MEME, jpeg)
    meme = opened(out)
    assert meme.format == "JPEG" and meme.width == 300 and meme.height >= 200  # a band may sit above
    decoded = io.BytesIO()
    opened(jpeg).convert("RGB").save(decoded, format="PNG", compress_level=1)
    assert out == Meme()(decoded.getvalue())  # drawn from the intake's decode, as the feed post is
    assert cache_tag(MEME).endswith(f".{MEME_VERSION}")  # a redrawn meme is scored again
