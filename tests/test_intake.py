from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image, ImageFile

from images import animated_gif, encode, mpo, noise, png_bomb, png_strip, solid, truncated_jpeg
from streamguard.config import IntakeSettings
from streamguard.errors import (
    CorruptImage,
    EmptyImage,
    IntakeError,
    TooLarge,
    UnsupportedFormat,
    UnsupportedGeometry,
)
from streamguard.intake import (
    CLIP_MEAN,
    CLIP_STD,
    InputContract,
    decode_image,
    decode_side,
    estimate_decoded_pixels,
    prepare,
    read_header,
)

LIMITS = IntakeSettings()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF"])
def test_each_format_decodes_to_rgb(fmt: str) -> None:
    img = noise((40, 30)) if fmt != "GIF" else solid(120, (40, 30))
    data = encode(img, fmt)
    decoded = decode_image(data, LIMITS)
    assert decoded.format == fmt
    assert decoded.rgb.mode == "RGB"
    assert (decoded.width, decoded.height) == (40, 30) == decoded.rgb.size


def test_animated_gif_takes_first_frame_and_counts_frames() -> None:
    decoded = decode_image(animated_gif(frames=3), LIMITS)
    assert decoded.frames == 3
    assert np.asarray(decoded.rgb)[0, 0].tolist() == [40, 40, 40]


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (60, 20), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs 90 degrees clockwise
    decoded = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95), LIMITS)
    assert (decoded.width, decoded.height) == (20, 60)
    top = np.asarray(decoded.rgb)[:5].mean(axis=(0, 1))
    assert top[0] > 200 and top[1] < 60  # the red strip is now on top


def test_alpha_is_composited_on_white() -> None:
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    decoded = decode_image(encode(img, "PNG"), LIMITS)
    assert np.asarray(decoded.rgb).min() == 255


def test_palette_with_transparency() -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 1)
    data = encode(img, "PNG", transparency=0)
    rgb = np.asarray(decode_image(data, LIMITS).rgb)
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb[4, 4].tolist() == [255, 255, 255]


def test_cmyk_jpeg_becomes_rgb() -> None:
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    rgb = np.asarray(decode_image(encode(img, "JPEG", quality=95), LIMITS).rgb).mean(axis=(0, 1))
    assert rgb[0] > 200 and rgb[1] < 60 and rgb[2] < 60


def test_16_bit_grayscale_is_scaled_not_clipped() -> None:
    arr = np.full((8, 8), 32896, dtype=np.uint16)  # mid-grey in 16 bits
    data = encode(Image.fromarray(arr), "PNG")
    rgb = np.asarray(decode_image(data, LIMITS).rgb)
    assert abs(int(rgb[0, 0, 0]) - 128) <= 1


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", EmptyImage),
        (b"this is a text file, not an image\n", UnsupportedFormat),
        (truncated_jpeg(), CorruptImage),
        (png_bomb(), TooLarge),
    ],
    ids=["zero-bytes", "text", "truncated-jpeg", "decompression-bomb"],
)
def test_bad_input_raises_typed_errors(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_image(data, LIMITS)


def test_byte_limit() -> None:
    data = encode(noise((64, 64)), "PNG")
    with pytest.raises(TooLarge, match="bytes"):
        decode_image(data, IntakeSettings(max_bytes=len(data) - 1))


def test_pixel_limit_is_checked_before_decoding() -> None:
    with pytest.raises(TooLarge, match="pixels"):
        decode_image(encode(noise((100, 100)), "PNG"), IntakeSettings(max_pixels=9_999))


def test_format_allow_list() -> None:
    with pytest.raises(UnsupportedFormat, match="BMP"):
        decode_image(encode(noise(), "BMP"), IntakeSettings(formats=["JPEG", "PNG"]))


def test_large_jpeg_is_decoded_at_reduced_size_when_allowed() -> None:
    data = encode(noise((1600, 1200)), "JPEG", quality=90)
    reduced = decode_image(data, LIMITS, min_side=224)
    assert reduced.reduced
    assert min(reduced.rgb.size) >= 224 and reduced.rgb.size[0] <= 400
    assert (reduced.width, reduced.height) == (1600, 1200)
    full = decode_image(data, LIMITS, min_side=None)
    assert full.rgb.size == (1600, 1200) and not full.reduced


def test_decode_side_combines_contracts() -> None:
    assert decode_side([InputContract(224), InputContract(336)]) == 336
    assert decode_side([InputContract(224), InputContract(256, fit="crop")]) is None
    assert decode_side([None]) is None


def test_resize_contract_output_is_normalised() -> None:
    decoded = decode_image(encode(solid(255, (300, 200)), "PNG"), LIMITS)
    x = prepare(decoded, InputContract(224))
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    expected = (1.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    np.testing.assert_allclose(x.mean(axis=(1, 2)), expected, rtol=1e-5)


def test_crop_contract_keeps_native_pixels() -> None:
    img = noise((300, 260), seed=3)
    decoded = decode_image(encode(img, "PNG"), LIMITS)
    x = prepare(decoded, InputContract(64, fit="crop", mean=(0, 0, 0), std=(1, 1, 1)))
    native = np.asarray(img)[98:162, 118:182].transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(x, native, atol=1e-6)


def test_crop_contract_pads_small_images() -> None:
    decoded = decode_image(encode(noise((20, 10)), "PNG"), LIMITS)
    assert prepare(decoded, InputContract(64, fit="crop")).shape == (3, 64, 64)


def test_crop_contract_refuses_reduced_decode() -> None:
    data = encode(noise((1600, 1200)), "JPEG")
    with pytest.raises(ValueError, match="native"):
        prepare(decode_image(data, LIMITS, min_side=224), InputContract(224, fit="crop"))


def test_metadata_is_extracted() -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler a")
    buf = io.BytesIO()
    solid(10).save(buf, format="PNG", pnginfo=info)
    meta = decode_image(buf.getvalue(), LIMITS).metadata
    assert "Steps: 20" in meta["info.parameters"]
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "EOS 5D"
    meta = decode_image(encode(solid(10), "JPEG", exif=exif.tobytes()), LIMITS).metadata
    assert meta["exif.Make"] == "Canon" and meta["exif.Model"] == "EOS 5D"


# -- geometry, memory and multi-picture JPEGs ------------------------------------------------------------


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding any pixel fails the test: what is refused or estimated must be decided from the header."""

    def load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.fixture
def resizes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """Records every output size `Image.resize` is asked for, and refuses (before allocating) any larger than
    224x224, so a test of a huge resize fails instead of exhausting memory."""
    sizes: list[tuple[int, int]] = []
    original = Image.Image.resize

    def resize(self: Image.Image, size: tuple[int, int], *args: object, **kwargs: object) -> Image.Image:
        sizes.append(tuple(size))
        assert size[0] * size[1] <= 224 * 224, f"resize to {size[0]}x{size[1]}"
        return original(self, size, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image.Image, "resize", resize)
    yield sizes


def _gradient(size: tuple[int, int]) -> Image.Image:
    # Smooth content encodes small and quickly as PNG, unlike noise.
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.broadcast_to((x + y) / 2, (h, w, 3)).astype(np.uint8))


def _red_left_strip(size: tuple[int, int]) -> Image.Image:
    img = _gradient(size)
    img.paste((255, 0, 0), (0, 0, size[0] // 6, size[1]))
    return img


def _rotated_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs 90 degrees clockwise
    return exif.tobytes()


def _red_on_top(rgb: Image.Image) -> bool:
    top = np.asarray(rgb)[:5].mean(axis=(0, 1))
    return bool(top[0] > 200 and top[1] < 60 and top[2] < 60)


def test_extreme_aspect_ratio_is_refused_before_decoding(no_pixel_decoding: None) -> None:
    data = png_strip(1, 100_000)
    assert len(data) < 1000
    with pytest.raises(UnsupportedGeometry, match=r"1x100000 .* over the limit of 20:1") as caught:
        decode_image(data, LIMITS, min_side=224)
    assert isinstance(caught.value, IntakeError) and caught.value.stage == "decode"


@pytest.mark.parametrize(
    ("size", "limit", "refused"),
    [((400, 20), 20.0, False), ((20, 420), 20.0, True), ((420, 20), 25.0, False), ((40, 20), 1.5, True)],
)
def test_aspect_ratio_limit(size: tuple[int, int], limit: float, refused: bool) -> None:
    data = encode(solid(90, size), "PNG")
    settings = IntakeSettings(max_aspect_ratio=limit)
    if refused:
        with pytest.raises(UnsupportedGeometry, match=f"{size[0]}x{size[1]}"):
            decode_image(data, settings)
    else:
        assert decode_image(data, settings).rgb.size == size


def test_prepare_resamples_only_the_region_that_survives_the_crop(
    resizes: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    img = noise((4750, 250), seed=5)  # 19:1, just under the default limit
    decoded = decode_image(encode(img, "PNG"), LIMITS)
    x = prepare(decoded, InputContract(224, mean=(0, 0, 0), std=(1, 1, 1)))
    assert x.shape == (3, 224, 224) and resizes == [(224, 224)]
    # The same pixels as resizing the whole strip (to 4256x224) and cropping its centre.
    monkeypatch.undo()
    left = (4256 - 224) // 2
    whole = img.resize((4256, 224), Image.Resampling.BICUBIC).crop((left, 0, left + 224, 224))
    np.testing.assert_allclose(x.transpose(1, 2, 0) * 255.0, np.asarray(whole), atol=1.01)


def test_prepare_of_a_strip_allocates_nothing_large(resizes: list[tuple[int, int]]) -> None:
    # With the aspect limit lifted, the 1x100000 strip decodes (100000 pixels) and must still prepare cheaply.
    decoded = decode_image(png_strip(1, 100_000), IntakeSettings(max_aspect_ratio=1e6), min_side=224)
    x = prepare(decoded, InputContract(224))
    assert x.shape == (3, 224, 224) and all(w * h <= 224 * 224 for w, h in resizes)
    expected = -np.asarray(CLIP_MEAN, np.float32) / np.asarray(CLIP_STD, np.float32)
    np.testing.assert_allclose(x.mean(axis=(1, 2)), expected, rtol=1e-5)


def test_large_png_is_held_reduced_when_allowed() -> None:
    img = _red_left_strip((2100, 1400))
    data = encode(img, "PNG", exif=_rotated_exif())
    reduced = decode_image(data, LIMITS, min_side=224)
    # The largest integer reduction that keeps 3x the contract's side: the contract's resize stays fair.
    assert reduced.reduced and reduced.rgb.size == (700, 1050)
    assert (reduced.width, reduced.height) == (1400, 2100) and _red_on_top(reduced.rgb)
    full = decode_image(data, LIMITS, min_side=None)
    assert full.rgb.size == (1400, 2100) and not full.reduced and _red_on_top(full.rgb)
    contract = InputContract(224)
    assert np.abs(prepare(reduced, contract) - prepare(full, contract)).mean() < 0.01


def test_mpo_is_judged_as_jpeg_on_its_primary_image() -> None:
    data = mpo(Image.new("RGB", (64, 48), (250, 0, 0)), Image.new("RGB", (64, 48), (0, 0, 250)), quality=95)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    decoded = decode_image(data, IntakeSettings(formats=["JPEG"]))
    assert decoded.format == "JPEG" and decoded.frames == 2
    red = np.asarray(decoded.rgb).mean(axis=(0, 1))
    assert red[0] > 200 and red[2] < 60
    with pytest.raises(UnsupportedFormat, match="MPO"):
        decode_image(data, IntakeSettings(formats=["PNG"]))


def test_mpo_is_decoded_at_reduced_size_and_oriented() -> None:
    data = mpo(_red_left_strip((1600, 1200)), noise((1600, 1200)), exif=_rotated_exif(), quality=90)
    reduced = decode_image(data, LIMITS, min_side=224)
    assert reduced.reduced and reduced.rgb.size == (300, 400)  # JPEG draft at 1/4
    assert (reduced.width, reduced.height) == (1200, 1600) and _red_on_top(reduced.rgb)
    assert decode_image(data, LIMITS).rgb.size == (1200, 1600)


def _estimate_cases() -> list[tuple[str, bytes, int | None, int]]:
    jpeg = encode(noise((1600, 1200)), "JPEG", quality=90)
    return [
        ("png-native", encode(noise((300, 200)), "PNG"), None, 300 * 200),
        ("png-small", encode(noise((300, 200)), "PNG"), 224, 300 * 200),
        ("png-reduced", encode(_gradient((2100, 1400)), "PNG"), 224, 1050 * 700),
        ("jpeg-draft", jpeg, 224, 400 * 300),
        ("jpeg-draft-336", jpeg, 336, 800 * 600),
        ("jpeg-native", jpeg, None, 1600 * 1200),
        ("mpo-draft", mpo(noise((1600, 1200)), noise((1600, 1200), seed=1)), 224, 400 * 300),
        ("gif", animated_gif(3, (40, 30)), 224, 40 * 30),
    ]


@pytest.mark.parametrize(("data", "side", "pixels"), [c[1:] for c in _estimate_cases()],
                         ids=[c[0] for c in _estimate_cases()])
def test_estimate_decoded_pixels_matches_what_decode_holds(data: bytes, side: int | None, pixels: int) -> None:
    assert estimate_decoded_pixels(data, LIMITS, side) == pixels
    decoded = decode_image(data, LIMITS, min_side=side)
    assert decoded.rgb.size[0] * decoded.rgb.size[1] == pixels
    # Decoded from the header a batch read to size itself (drafted already for a JPEG): the same image, the
    # original's sides and frames included.
    header = read_header(data, LIMITS, side)
    assert header.decoded_pixels == pixels
    again = decode_image(data, LIMITS, min_side=side, header=header)
    assert again == decoded and np.array_equal(np.asarray(again.rgb), np.asarray(decoded.rgb))


def test_estimate_decoded_pixels_reads_only_the_header(no_pixel_decoding: None) -> None:
    data = encode(noise((1600, 1200)), "JPEG")
    assert estimate_decoded_pixels(data, LIMITS, 224) == 400 * 300


@pytest.mark.parametrize(
    ("data", "settings"),
    [
        (b"", LIMITS),
        (b"this is a text file, not an image\n", LIMITS),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, LIMITS),
        (png_bomb(), LIMITS),
        (png_strip(1, 100_000), LIMITS),
        (encode(noise(), "BMP"), IntakeSettings(formats=["JPEG", "PNG"])),
        (encode(noise(), "PNG"), IntakeSettings(max_bytes=100)),
    ],
    ids=["empty", "text", "garbage-png", "bomb", "strip", "format-not-allowed", "over-max-bytes"],
)
def test_estimate_is_zero_for_what_decode_refuses(data: bytes, settings: IntakeSettings) -> None:
    assert estimate_decoded_pixels(data, settings, 224) == 0
    with pytest.raises(IntakeError):
        decode_image(data, settings, min_side=224)
