"""Multi-view contracts: native crops (and the whole view) scored separately and aggregated per image."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from streamguard.config import DetectorSettings, IntakeSettings
from streamguard.detectors.runner import DetectorRunner
from streamguard.detectors.spec import Calibration, DetectorInput, DetectorSpec
from streamguard.intake import InputContract, aggregate_logits, decode_image, prepare, prepare_views
from streamguard.intake.inset import INSET_VERSION
from streamguard.intake.contract import JPEG_QUALITY, JPEG_SCALE, crop_boxes, decode_side, view_tag, with_views
from streamguard.scoring import _input


def test_crops_cover_the_image_evenly_and_stay_inside() -> None:
    assert crop_boxes(512, 512, 224, 4) == [(16, 16), (272, 16), (16, 272), (272, 272)]
    assert crop_boxes(512, 512, 224, 1) == [(144, 144)]  # one crop is the centre crop
    for w, h, n in ((1000, 500, 4), (300, 900, 3), (4000, 3000, 9), (225, 224, 5)):
        boxes = crop_boxes(w, h, 224, n)
        assert 1 <= len(boxes) <= n and len(set(boxes)) == len(boxes)
        assert all(0 <= x <= w - 224 and 0 <= y <= h - 224 for x, y in boxes)
    # An image smaller than a crop has one position: it is not scored four times over.
    assert crop_boxes(200, 150, 224, 4) == [(0, 0)]


def test_aggregation_is_a_mean_or_trimmed_mean_never_a_max() -> None:
    assert aggregate_logits([1.0, 2.0, 3.0, 10.0], "mean") == pytest.approx(4.0)
    assert aggregate_logits([1.0, 2.0, 3.0, 10.0], "trimmed-mean") == pytest.approx(2.5)
    assert aggregate_logits([1.0, 10.0], "trimmed-mean") == pytest.approx(5.5)  # too few views to trim
    assert aggregate_logits([None, 4.0], "mean") == 4.0
    assert aggregate_logits([None, None], "mean") is None


def _decoded(w: int, h: int, seed: int = 0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return decode_image(buf.getvalue(), IntakeSettings(), None)


def test_views_are_native_pixels_then_the_whole_view() -> None:
    image = _decoded(600, 400)
    contract = InputContract(size=224, fit="crop", crops=4, whole=True)
    views = prepare_views(image, contract)
    assert views.shape == (5, 3, 224, 224) and views.dtype == np.float32
    native = np.asarray(image.rgb)
    left, top = crop_boxes(600, 400, 224, 4)[0]
    expected = (native[top:top + 224, left:left + 224].astype(np.float32) / 255 - np.asarray(contract.mean, np.float32)
                ) / np.asarray(contract.std, np.float32)
    # Within float32 rounding of the textbook formula (the normalisation is one multiply-add).
    np.testing.assert_allclose(views[0], expected.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)
    whole = prepare(image, InputContract(size=224, fit="resize"))
    np.testing.assert_allclose(views[4], whole, rtol=1e-6)
    with pytest.raises(ValueError, match="need fit 'crop'"):
        InputContract(fit="resize", crops=4)


def test_an_image_too_small_for_a_crop_is_padded_or_resized_as_the_contract_says() -> None:
    resized = InputContract(size=224, fit="resize")
    for w, h in ((96, 64), (600, 200)):  # both sides short, then the short side only
        image = _decoded(w, h, seed=w)
        whole = prepare(image, resized)
        # "resize": the resized view alone, once, exactly as a resize contract gives it.
        crops = InputContract(size=224, fit="crop", crops=2, whole=True, small_image="resize")
        np.testing.assert_array_equal(prepare_views(image, crops), whole[None])
        np.testing.assert_array_equal(prepare(image, InputContract(size=224, fit="crop", small_image="resize")), whole)
        # "pad" (the default, NIRNet's): the native pixels, mirror-padded, then the whole view.
        padded = prepare_views(image, InputContract(size=224, fit="crop", crops=2, whole=True))
        assert len(padded) == (2 if w < 224 else 3)
        np.testing.assert_array_equal(padded[-1], whole)
        assert not np.allclose(padded[0], whole)  # native pixels (tests/test_intake.py checks the padding)
    big = _decoded(300, 224)  # a short side of exactly a crop: native crops, whatever small_image says
    assert len(prepare_views(big, InputContract(size=224, fit="crop", crops=2, small_image="resize"))) == 2
    with pytest.raises(ValueError, match="small_image must be"):
        InputContract(fit="crop", small_image="shrink")  # type: ignore[arg-type]


class ViewMean:
    """A backend whose logit for a view is its mean pixel: aggregation is then checkable by hand."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def predict(self, batch: Sequence[DetectorInput]) -> list[float | None]:
        self.seen.append(len(batch))
        assert all(x.pixels is not None and x.pixels.shape == (3, 224, 224) for x in batch)
        return [float(x.pixels.mean()) for x in batch]  # type: ignore[union-attr]

    def close(self) -> None:
        pass


@pytest.mark.parametrize("aggregate", ["mean", "trimmed-mean"])
def test_the_runner_scores_every_view_and_aggregates_per_image(aggregate: str) -> None:
    contract = InputContract(size=224, fit="crop", crops=4, whole=True, aggregate=aggregate)  # type: ignore[arg-type]
    backend = ViewMean()
    spec = DetectorSpec(name="d", version="v1", load=lambda ctx: backend, contract=contract, calibration=Calibration())
    runner = DetectorRunner(spec, DetectorSettings())
    runner.start()
    images = [_decoded(600, 400, 1), _decoded(180, 120, 2)]  # five views, and two (one crop + whole)
    inputs = [_input(image, contract) for image in images]
    import time

    scores = runner.collect(runner.submit(inputs), len(inputs), time.perf_counter())
    assert backend.seen == [7]  # one backend call with every view of the batch
    for x, score in zip(inputs, scores, strict=True):
        expected = aggregate_logits([float(v.mean()) for v in x.views], aggregate)
        assert score.raw_logit == pytest.approx(expected, rel=1e-6)
    runner.close()


def test_a_flipped_contract_adds_each_views_mirror_image_after_the_views() -> None:
    image = _decoded(600, 400, 3)
    resized = prepare_views(image, with_views(InputContract(), "resize-flip"))
    whole = prepare(image, InputContract())
    assert resized.shape == (2, 3, 224, 224)
    np.testing.assert_array_equal(resized[0], whole)
    np.testing.assert_array_equal(resized[1], whole[:, :, ::-1])
    contract = with_views(InputContract(), "crops2+whole-trimmed-flip")
    assert contract.multiview and contract.aggregate == "trimmed-mean" and contract.fit == "crop"
    plain = prepare_views(image, with_views(InputContract(), "crops2+whole"))
    views = prepare_views(image, contract)
    assert len(views) == 2 * len(plain) == 6
    np.testing.assert_array_equal(views[:3], plain)
    np.testing.assert_array_equal(views[3:], plain[:, :, :, ::-1])


def test_flip_view_names() -> None:
    both = with_views(InputContract(), "resize-flip-inset")
    assert both.flip and both.inset and both.fit == "resize"
    assert not with_views(InputContract(), "resize-inset").flip
    assert with_views(InputContract(flip=True), "resize").flip  # a contract's own flip is kept
    for name in ("resize-inset-flip", "resize-trimmed-flip", "flip"):  # -trimmed needs views, -inset after -flip
        with pytest.raises(ValueError, match="views must be"):
            with_views(InputContract(), name)


def _round_trip(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _png(img: Image.Image, min_side: int | None):  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return decode_image(buf.getvalue(), IntakeSettings(), min_side)


def test_a_jpeg_contract_judges_the_shown_pixels_as_a_jpeg_at_one_scale() -> None:
    rng = np.random.default_rng(5)
    photo = Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).resize((1200, 900), Image.BICUBIC)
    plain = with_views(InputContract(), "resize")
    contract = with_views(InputContract(), "resize-jpeg")
    assert contract.jpeg == JPEG_QUALITY and not contract.multiview
    side = JPEG_SCALE * contract.size
    # The decode holds what the encode needs (a JPEG upload is drafted no smaller than this).
    assert decode_side([contract]) == side and decode_side([plain]) == plain.size
    image = _png(photo, decode_side([contract]))
    # A large upload is brought to the one scale, encoded, decoded, and only then viewed.
    at_scale = photo.resize((side * 4 // 3, side), Image.BICUBIC)
    expected = prepare(_png(_round_trip(at_scale, JPEG_QUALITY), None), plain)
    np.testing.assert_array_equal(prepare(image, contract), expected)
    assert np.abs(prepare(image, contract) - prepare(image, plain)).mean() > 0.01  # the encode happened
    # A smaller one is encoded as it is; a crop contract's native pixels are never rescaled for it.
    small = photo.resize((400, 300), Image.BICUBIC)
    np.testing.assert_array_equal(prepare(_png(small, side), contract),
                                  prepare(_png(_round_trip(small, JPEG_QUALITY), None), plain))
    crops = with_views(InputContract(), "crops2+whole-flip-jpeg")
    np.testing.assert_array_equal(prepare_views(_png(photo, None), crops),
                                  prepare_views(_png(_round_trip(photo, JPEG_QUALITY), None),
                                                with_views(InputContract(), "crops2+whole-flip")))


def test_jpeg_view_names_and_versions() -> None:
    contract = with_views(InputContract(), "resize-flip-inset-jpeg")
    assert contract.flip and contract.inset and contract.jpeg == JPEG_QUALITY
    assert with_views(InputContract(), "resize-inset").jpeg is None
    assert with_views(InputContract(jpeg=90), "resize").jpeg == 90  # a contract's own quality is kept
    for name in ("resize-jpeg-inset", "resize-jpeg-flip", "jpeg"):  # -jpeg comes last
        with pytest.raises(ValueError, match="views must be"):
            with_views(InputContract(), name)
    with pytest.raises(ValueError, match="quality from 1 to 95"):
        InputContract(jpeg=100)
    # The quality is in the version: verdicts judged at another one are not reused by dedupe.
    assert view_tag("resize-jpeg") == f"resize-jpeg{JPEG_QUALITY}"
    assert view_tag("resize-inset-jpeg") == f"resize-inset{INSET_VERSION}-jpeg{JPEG_QUALITY}"
    assert view_tag("resize-inset") == f"resize-inset{INSET_VERSION}"
