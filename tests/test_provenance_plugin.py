"""The example third-party plugin: installed from plugins/, found through its entry point."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from PIL import PngImagePlugin

from images import encode, solid
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
    assert score_metadata(camera) == -1.0
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
    assert names == {"builtin-fusion", "builtin-policy", "builtin-univfd", "builtin-pinclip", "builtin-mpft",
                     "provenance"}
