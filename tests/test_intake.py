from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from images import animated_gif, encode, noise, png_bomb, solid, truncated_jpeg
from streamguard.config import IntakeSettings
from streamguard.errors import CorruptImage, EmptyImage, TooLarge, UnsupportedFormat
from streamguard.intake import CLIP_MEAN, CLIP_STD, InputContract, decode_image, decode_side, prepare

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
