"""The example third-party plugin: installed from plugins/, found through its entry point."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from PIL import Image, PngImagePlugin

from clip_standin import pipeline
from images import encode, noise, solid
from streamguard.scoring import ImageJob, Scorer
from streamguard_provenance import score_metadata

IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"


def test_rules() -> None:
    assert score_metadata({"xmp": f'<Iptc4xmpExt:DigitalSourceType>{IPTC}trainedAlgorithmicMedia<'}) == 6.0
    assert score_metadata({"xmp": f"{IPTC}compositeWithTrainedAlgorithmicMedia"}) == 3.0
    assert score_metadata({"info.parameters": "cat\nSteps: 20, Sampler: Euler a, CFG scale: 7"}) == 6.0
    assert score_metadata({"info.prompt": '{"3": {"class_type": "KSampler"}}'}) == 6.0
    assert score_metadata({"exif.Software": "Adobe Firefly"}) == 5.0
    camera = {"exif.Make": "Canon", "exif.Model": "EOS R5", "exif.DateTimeOriginal": "2024:01:01 10:00:00"}
    assert score_metadata(camera) is None  # unsigned camera EXIF is no evidence: anyone can write it
    assert score_metadata({**camera, "exif.Software": "Midjourney"}) == 5.0
    assert score_metadata({"exif.Make": "Canon"}) is None
    assert score_metadata({}) is None


def test_scores_a_generator_png_through_the_pipeline(settings, pm) -> None:  # type: ignore[no-untyped-def]
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a castle\nSteps: 25, Sampler: DDIM, Seed: 3")
    buf = io.BytesIO()
    solid(128).save(buf, format="PNG", pnginfo=info)
    with Scorer(settings, pm) as scorer:
        tagged, plain = scorer.score([ImageJob("a", buf.getvalue()), ImageJob("b", encode(solid(128), "PNG"))])
    by_name = {s.detector: s for s in tagged.verdict.scores}  # type: ignore[union-attr]
    assert by_name["provenance"].probability is not None and by_name["provenance"].probability > 0.99
    plain_score = {s.detector: s for s in plain.verdict.scores}["provenance"]  # type: ignore[union-attr]
    assert plain_score.logit is None and plain_score.error is None  # abstained


def test_product_path_has_no_test_detector() -> None:
    """Without the tests' private plugin directory, only the product's plugins load."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "STREAMGUARD_PLUGINS__DENY")}
    proc = subprocess.run([sys.executable, "-m", "streamguard", "plugins"], capture_output=True, text=True,
                          env=env, timeout=120, check=True)
    names = {p["name"] for p in json.loads(proc.stdout)["plugins"]}
    # mpft and nirnet are opt-in (plugins.enable): validated, they did not earn their compute by default.
    assert names == {"builtin-fusion", "builtin-policy", "builtin-univfd", "builtin-pinclip", "builtin-credentials",
                     "provenance"}


def _with_camera_exif(img: Image.Image) -> bytes:
    """A JPEG whose EXIF claims a camera shot it, as a forger writes it (unsigned)."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "EOS R5"  # Make, Model
    exif.get_ifd(0x8769)[0x9003] = "2024:01:01 10:00:00"  # Exif IFD: DateTimeOriginal
    return encode(img, "JPEG", quality=90, exif=exif)


def test_forged_camera_exif_never_clears_a_generated_image() -> None:
    generated = noise((64, 48), seed=5)
    # The CLIP detectors lean fake (p 0.57 each): uncertain, close enough to 0.5 that any pull toward real
    # from the EXIF (the old -1.0 at the default weight 1) would have cleared it.
    settings, pm = pipeline(0.3)
    with Scorer(settings, pm) as scorer:
        forged, bare = scorer.score([ImageJob("forged", _with_camera_exif(generated)),
                                     ImageJob("bare", encode(generated, "JPEG", quality=90))])
    assert forged.image is not None and forged.image.metadata.get("exif.Make") == "Canon"  # the EXIF was read
    provenance = {s.detector: s for s in forged.verdict.scores}["provenance"]  # type: ignore[union-attr]
    assert provenance.logit is None and provenance.error is None
    assert forged.verdict.label == bare.verdict.label == "uncertain"  # type: ignore[union-attr]
    assert forged.verdict.probability == bare.verdict.probability  # type: ignore[union-attr]


def test_generator_metadata_still_moves_toward_ai() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a castle\nSteps: 25, Sampler: DDIM, Seed: 3")
    buf = io.BytesIO()
    noise((64, 48), seed=5).save(buf, format="PNG", pnginfo=info)
    settings, pm = pipeline(0.3)
    with Scorer(settings, pm) as scorer:
        tagged, plain = scorer.score([ImageJob("tagged", buf.getvalue()),
                                      ImageJob("plain", encode(noise((64, 48), seed=5), "PNG"))])
    assert tagged.verdict.probability > plain.verdict.probability  # type: ignore[union-attr,operator]
