"""Portrait twins (`streamguard.training.portraits`): a real photo's face found, framed as a portrait at the
photo's own pixels, and only photos with a face chosen; OpenCV's cascade runs for real on drawn faces."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from images import drawn_face, encode, noise, solid
from streamguard.evaluation.datasets import REAL, Sample
from streamguard.training.portraits import (FRAMING, MIN_SIDE, PORTRAIT_VERSION, PortraitCrop, largest_face,
                                            portrait_box, with_faces)
from streamguard.training.twins import asked_twins, twin_settings


def centre(box: tuple[int, int, int, int]) -> tuple[float, float]:
    x, y, w, h = box
    return x + w / 2, y + h / 2


@pytest.mark.parametrize("at", [(240, 170), (110, 150), (380, 220)])
def test_a_drawn_face_is_found_where_it_was_drawn(at: tuple[int, int]) -> None:
    face = largest_face(drawn_face(at=at))
    assert face is not None
    cx, cy = centre(face)
    assert abs(cx - at[0]) < 30 and abs(cy - at[1]) < 40


def test_a_face_on_a_large_photo_is_found_in_the_photos_pixels() -> None:
    # Looked for on a copy at DETECT_SIDE, answered at the photo's own scale.
    face = largest_face(drawn_face(size=(2400, 1800), at=(1500, 800), r=300))
    assert face is not None
    cx, cy = centre(face)
    assert abs(cx - 1500) < 120 and abs(cy - 800) < 160 and face[2] > 500


@pytest.mark.parametrize("image", [solid(120, (480, 360)), noise((480, 360), seed=3)], ids=["flat", "noise"])
def test_no_face_is_found_where_none_is(image: Image.Image) -> None:
    assert largest_face(image) is None


def test_the_portrait_frames_the_face_square_and_a_little_below_it() -> None:
    face = (400, 300, 100, 100)
    left, top, right, bottom = portrait_box(face, (1200, 900), framing=2.5)
    assert right - left == bottom - top == 250
    assert left <= 400 and right >= 500 and top <= 300 and bottom >= 400  # the whole face
    assert (left + right) / 2 == 450 and (top + bottom) / 2 > 350  # centred across, lower than the face


def test_the_portrait_moves_inside_the_photo_and_shrinks_to_fit_it() -> None:
    left, top, right, bottom = portrait_box((0, 0, 100, 100), (1200, 900), framing=3.0)  # face at a corner
    assert (left, top, right, bottom) == (0, 0, 300, 300)
    left, top, right, bottom = portrait_box((950, 750, 100, 100), (1000, 800), framing=3.0)
    assert (right, bottom) == (1000, 800) and right - left == 300
    assert portrait_box((20, 20, 100, 100), (200, 160), framing=3.0) == (0, 0, 160, 160)  # the photo's short side


def test_a_twin_is_a_seeded_jpeg_portrait_of_the_face_at_the_photos_pixels() -> None:
    photo = encode(drawn_face(size=(800, 600), at=(300, 250), r=70), "PNG")
    twin = PortraitCrop()(photo)
    assert twin == PortraitCrop()(photo)  # seeded by the photo's bytes: every fold and draw sees the same
    image = Image.open(io.BytesIO(twin))
    assert image.format == "JPEG" and image.width == image.height and image.width >= MIN_SIDE
    found = largest_face(drawn_face(size=(800, 600), at=(300, 250), r=70))
    assert found is not None
    assert FRAMING[0] * found[2] - 1 <= image.width <= min(FRAMING[1] * found[2] + 1, 600)  # cropped, not resized
    face = largest_face(image)  # the face is still there, across the middle of the portrait
    assert face is not None and abs(centre(face)[0] - image.width / 2) < 0.15 * image.width


def test_a_photo_without_a_face_makes_no_twin() -> None:
    photo = encode(noise((480, 360), seed=5), "JPEG")
    assert not PortraitCrop().frames(photo)
    with pytest.raises(ValueError, match="no face"):
        PortraitCrop()(photo)


def test_a_face_too_small_to_frame_a_portrait_makes_no_twin() -> None:
    # Found on a photo whose short side is under MIN_SIDE: the portrait could only be that small.
    small = encode(drawn_face(size=(150, 120), at=(75, 60), r=28), "PNG")
    face = largest_face(Image.open(io.BytesIO(small)))
    assert face is not None
    assert not PortraitCrop().frames(small)
    with pytest.raises(ValueError, match=f"under {MIN_SIDE}"):
        PortraitCrop()(small)


def _samples(directory: Path) -> list[Sample]:
    images = {"face-a": drawn_face(), "plain": solid(90, (480, 360)), "face-b": drawn_face(at=(300, 200), r=70),
              "noisy": noise((480, 360), seed=9)}
    samples = []
    for name, image in images.items():
        image.save(directory / f"{name}.png")
    (directory / "broken.png").write_bytes(b"not an image")
    for name in (*images, "broken"):
        samples.append(Sample(id=name, path=str(directory / f"{name}.png"), member=None, label=REAL,
                              generator="real", family="real", source="photos", split="train"))
    return samples


def test_only_photos_with_a_face_are_chosen_and_each_is_asked_about_once(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    samples = _samples(tmp_path)
    cache = tmp_path / "cache"
    assert [s.id for s in with_faces(samples, cache)] == ["face-a", "face-b"]
    assert json.loads((cache / f"portrait-faces-{PORTRAIT_VERSION}.json").read_text()) == {
        "broken": False, "face-a": True, "face-b": True, "noisy": False, "plain": False}

    def asked(self: PortraitCrop, data: bytes) -> bool:
        raise AssertionError("asked again about a photo already answered")

    monkeypatch.setattr(PortraitCrop, "frames", asked)
    assert [s.id for s in with_faces(samples, cache)] == ["face-a", "face-b"]  # every fold asks the cache


def test_portrait_twins_are_asked_for_last_and_recorded_with_their_recipe() -> None:
    asked = asked_twins(feed=2, portrait=5)
    assert [(kind.name, kind.count, kind.label) for kind in asked] == [("feed", 2, REAL), ("portrait", 5, REAL)]
    assert asked[1].among is with_faces and asked[0].among is None
    assert twin_settings(asked)["portrait_twins"] == [5, PORTRAIT_VERSION]
    with pytest.raises(ValueError, match="portrait_twins must be 0 or more"):
        asked_twins(portrait=-1)
