"""Content credentials: C2PA manifests signed here, with certificates made here, judged by the real pipeline.

Each test signs a JPEG with c2pa-python's Builder under an ES256 chain from its own CA; the operator's trust
anchors (``credentials.trust_anchors``) name that CA. The CLIP detectors are stand-ins weighed by the default
fusion weights (tests/clip_standin.py), so the verdicts are the product's default fusion and policy.
"""

from __future__ import annotations

import datetime as dt
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import c2pa
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError
from structlog.testing import capture_logs

from stack import TEST_POLICY
from streamguard.decide import Decider
from streamguard.tenants import Tenants
from streamguard.config import VALIDATED_AI_THRESHOLD
from clip_standin import pipeline
from images import encode, noise
from streamguard.builtin.credentials.manifest import assess
from streamguard.builtin.credentials.plugin import CAPTURED_LOGIT, GENERATED_LOGIT, NAME, logit_for
from streamguard.config import load_settings
from streamguard.plugins import build_plugin_manager
from streamguard.registry import collect_detectors
from streamguard.schemas import DetectorScore
from streamguard.scoring import ImageJob, Outcome, Scorer

IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"
COMMENT = b"streamguard test photo"
# The CLIP stand-ins' logit when they are sure an image is real: the bound the credentials logits are sized
# against (streamguard/builtin/credentials/plugin.py).
SURE_REAL = -12.0


@dataclass(frozen=True)
class Chain:
    key_pem: bytes
    certs_pem: bytes  # signer first, then its CA
    ca_pem: bytes



@pytest.fixture(autouse=True)
def _shipped_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The credential's weight is sized against the shipped fusion and policy: judge under those, not the
    policy the other tests pin for their scripted detectors."""
    for name in TEST_POLICY:
        monkeypatch.delenv(name, raising=False)

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "streamguard tests")])


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_usage(*, sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=not sign, crl_sign=not sign,
                         encipher_only=False, decipher_only=False)


def make_chain(label: str) -> Chain:
    """A root CA and an ES256 claim-signing certificate under it, as C2PA's profile asks (EKU, key usage)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name(f"{label} root")).issuer_name(_name(f"{label} root"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(_key_usage(sign=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(_name(f"{label} signer")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(sign=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Chain(key_pem=key_pem, certs_pem=_pem(leaf) + _pem(ca), ca_pem=_pem(ca))


@dataclass(frozen=True)
class Pki:
    trusted: Chain
    untrusted: Chain  # a CA the operator never listed
    anchors: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    trusted, untrusted = make_chain("trusted"), make_chain("unknown")
    anchors = tmp_path_factory.mktemp("credentials") / "anchors.pem"
    anchors.write_bytes(trusted.ca_pem)
    return Pki(trusted=trusted, untrusted=untrusted, anchors=anchors)


def photo() -> bytes:
    return encode(noise((64, 48), seed=3), "JPEG", quality=90, comment=COMMENT)


def sign(data: bytes, chain: Chain, source_type: str | None, generator: str = "streamguard-tests",
         remote_url: str | None = None) -> bytes:
    action: dict[str, Any] = {"action": "c2pa.created"}
    if source_type is not None:
        action["digitalSourceType"] = IPTC + source_type
    manifest = {"claim_generator_info": [{"name": generator, "version": "1.0"}], "title": "image.jpg",
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [action]}}]}
    context = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}},
                                      "verify": {"verify_after_sign": False}})
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain.certs_pem, chain.key_pem, None))
    out = io.BytesIO()
    with context, signer, c2pa.Builder(manifest, context=context) as builder:
        if remote_url is not None:  # the image only points at its manifest
            builder.set_no_embed()
            builder.set_remote_url(remote_url)
        builder.sign(signer, "image/jpeg", io.BytesIO(data), out)
    return out.getvalue()


def judge(clip_logit: float, pki: Pki, *images: bytes) -> list[Outcome]:
    settings, pm = pipeline(clip_logit, credentials={"trust_anchors": str(pki.anchors)})
    with Scorer(settings, pm) as scorer:
        return scorer.score([ImageJob(f"img-{i}", data) for i, data in enumerate(images)])


def score_of(outcome: Outcome, detector: str = NAME) -> DetectorScore:
    assert outcome.verdict is not None, outcome.error
    (score,) = [s for s in outcome.verdict.scores if s.detector == detector]
    return score


def manifest_logs(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == "credentials.manifest"]


def test_signed_generated_image_is_flagged_with_the_credential_as_evidence(pki: Pki) -> None:
    original = photo()
    signed = sign(original, pki.trusted, "trainedAlgorithmicMedia")
    with capture_logs() as logs:
        plain, flagged = judge(SURE_REAL, pki, original, signed)
    # The CLIP detectors alone clear it, and without a manifest the credentials detector has nothing to say.
    assert plain.verdict is not None and plain.verdict.label == "real"
    assert score_of(plain).logit is None and score_of(plain).error is None
    # The credential carries the verdict against them.
    assert flagged.verdict is not None and flagged.verdict.label == "ai_generated"
    credential = score_of(flagged)
    assert credential.logit == GENERATED_LOGIT and credential.probability is not None and credential.probability > 0.999
    assert flagged.verdict.probability is not None and flagged.verdict.probability >= VALIDATED_AI_THRESHOLD
    # The verdict a tenant is told names the credential as evidence, beside its share of the fused logit.
    settings, pm = pipeline(SURE_REAL, credentials={"trust_anchors": str(pki.anchors)})
    told = Decider(pm).decide(flagged.verdict, Tenants(settings).resolve(None))
    assert told.label == "ai_generated" and told.explanation is not None
    (evidence,) = [e for e in told.explanation.evidence if e.kind == "credential"]
    assert evidence.detail["declared"] == "generated" and evidence.detail["logit"] == GENERATED_LOGIT
    assert not [e for e in Decider(pm).decide(plain.verdict, Tenants(settings).resolve(None)).explanation.evidence  # type: ignore[union-attr]
                if e.kind == "credential"]  # no manifest, no credential evidence
    (entry,) = manifest_logs(logs)
    assert entry["content_sha256"] == flagged.sha256 and entry["log_level"] == "info"
    assert (entry["state"], entry["declared"], entry["counted"]) == ("Trusted", "generated", True)
    assert entry["issuer"] == "streamguard tests" and entry["source_types"] == ["trainedAlgorithmicMedia"]


def test_composite_with_generated_parts_is_generation_too(pki: Pki) -> None:
    (outcome,) = judge(SURE_REAL, pki, sign(photo(), pki.trusted, "compositeWithTrainedAlgorithmicMedia"))
    assert score_of(outcome).logit == GENERATED_LOGIT
    assert outcome.verdict.label == "ai_generated"  # type: ignore[union-attr]


def test_capture_manifest_moves_toward_real(pki: Pki) -> None:
    original = photo()
    captured = sign(original, pki.trusted, "digitalCapture", generator="Test Camera Firmware")
    # CLIP leaning fake (p 0.73 each): uncertain alone, real with the camera's credential.
    plain, signed = judge(1.0, pki, original, captured)
    assert plain.verdict.label == "uncertain"  # type: ignore[union-attr]
    assert score_of(signed).logit == CAPTURED_LOGIT and signed.verdict.label == "real"  # type: ignore[union-attr]
    # CLIP fairly sure (p 0.95 each; the fusion alone would say 0.86) or sure it is fake: the credential does
    # not clear it, a person decides.
    for clip_logit in (3.0, 8.0):
        (disputed,) = judge(clip_logit, pki, captured)
        assert disputed.verdict.label == "uncertain", clip_logit  # type: ignore[union-attr]


def test_tampered_image_does_not_count(pki: Pki) -> None:
    signed = sign(photo(), pki.trusted, "trainedAlgorithmicMedia")
    assert signed.count(COMMENT) == 1
    tampered = signed.replace(COMMENT, COMMENT.upper())  # still a good JPEG, no longer the signed bytes
    with capture_logs() as logs:
        (outcome,) = judge(SURE_REAL, pki, tampered)
    score = score_of(outcome)
    assert score.logit is None and score.error is None  # abstained: not evidence either way
    assert outcome.verdict.label == "real"  # type: ignore[union-attr]  # what the CLIP detectors say
    (entry,) = manifest_logs(logs)
    assert (entry["state"], entry["counted"], entry["log_level"]) == ("Invalid", False, "warning")
    assert "assertion.dataHash.mismatch" in entry["failures"] and "not evidence" in entry["reason"]


def test_untrusted_chain_does_not_count(pki: Pki) -> None:
    with capture_logs() as logs:
        (outcome,) = judge(SURE_REAL, pki, sign(photo(), pki.untrusted, "trainedAlgorithmicMedia"))
    score = score_of(outcome)
    assert score.logit is None and score.error is None
    assert outcome.verdict.label == "real"  # type: ignore[union-attr]
    (entry,) = manifest_logs(logs)
    assert (entry["state"], entry["declared"], entry["counted"]) == ("Valid", "generated", False)
    assert "signingCredential.untrusted" in entry["failures"]


def test_remote_manifest_is_not_fetched(pki: Pki) -> None:
    url = "https://c2pa.example.invalid/manifest.c2pa"
    with capture_logs() as logs:
        (outcome,) = judge(SURE_REAL, pki, sign(photo(), pki.trusted, "trainedAlgorithmicMedia", remote_url=url))
    assert score_of(outcome).logit is None and outcome.verdict.label == "real"  # type: ignore[union-attr]
    (entry,) = manifest_logs(logs)
    assert (entry["state"], entry["counted"], entry["log_level"]) == ("Remote", False, "info")
    assert url in entry["failures"][0]


def test_missing_library_loads_and_abstains_with_a_clear_log(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    signed = sign(photo(), pki.trusted, "trainedAlgorithmicMedia")
    monkeypatch.setitem(sys.modules, "c2pa", None)  # import c2pa now raises ImportError, as in an install without it
    monkeypatch.delitem(sys.modules, "streamguard.builtin.credentials.verify", raising=False)
    settings, pm = pipeline(SURE_REAL, credentials={"trust_anchors": str(pki.anchors)})
    with capture_logs() as logs, Scorer(settings, pm) as scorer:
        (runner,) = [r for r in scorer.runners if r.spec.name == NAME]
        (outcome,) = scorer.score([ImageJob("signed", signed)])
    assert runner.load_error is None
    score = score_of(outcome)
    assert score.logit is None and score.error is None and not outcome.verdict.degraded  # type: ignore[union-attr]
    (missing,) = [e for e in logs if e["event"] == "credentials.library_missing"]
    assert missing["log_level"] == "warning" and "c2pa-python" in missing["hint"]


def test_off_without_trust_anchors() -> None:
    settings = load_settings()
    with capture_logs() as logs:
        names = {spec.name for spec in collect_detectors(build_plugin_manager(settings.plugins), settings)}
    assert NAME not in names
    assert any(e["event"] == "credentials.off" for e in logs)


def test_trust_anchors_are_checked_at_start(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for path in (junk, tmp_path / "missing.pem"):
        with pytest.raises(ValidationError, match="credentials.trust_anchors"):
            load_settings(credentials={"trust_anchors": str(path)})


def test_version_changes_with_the_anchors(pki: Pki, tmp_path: Path) -> None:
    other = tmp_path / "other.pem"
    other.write_bytes(pki.trusted.ca_pem + pki.untrusted.ca_pem)

    def version(anchors: Path) -> str:
        settings = load_settings(credentials={"trust_anchors": str(anchors)})
        (spec,) = [s for s in collect_detectors(build_plugin_manager(settings.plugins), settings) if s.name == NAME]
        return spec.version

    assert version(pki.anchors) != version(other)
    assert version(pki.anchors).startswith("credentials-1+c2pa-0.38.1+anchors-")


# -- the rules, on manifest stores as c2pa's Reader reports them ------------------------------------------


def _store(state: str, *manifests: dict[str, Any]) -> dict[str, Any]:
    """A store whose first manifest is the active one."""
    labels = [f"urn:c2pa:{i}" for i in range(len(manifests))]
    return {"active_manifest": labels[0], "manifests": dict(zip(labels, manifests, strict=True)),
            "validation_state": state}


def _manifest(*source_types: str, label: str = "c2pa.actions.v2", generator: str = "app") -> dict[str, Any]:
    actions = [{"action": "c2pa.edited", "digitalSourceType": IPTC + t} for t in source_types]
    return {"claim_generator_info": [{"name": generator}], "signature_info": {"issuer": "Vendor"},
            "assertions": [{"label": label, "data": {"actions": actions}}]}


def test_generation_in_an_ingredient_survives_an_edit() -> None:
    finding = assess(_store("Trusted", _manifest(), _manifest("trainedAlgorithmicMedia")))
    assert finding.declared == "generated" and logit_for(finding) == GENERATED_LOGIT


def test_camera_claim_generator_is_capture_only_when_trusted() -> None:
    camera = _manifest(generator="Leica Camera AG M11-P")
    assert logit_for(assess(_store("Trusted", camera))) == CAPTURED_LOGIT
    assert logit_for(assess(_store("Valid", camera))) is None
    # A camera's name beside a declared non-capture source is not a capture.
    assert assess(_store("Trusted", _manifest("digitalCreation", generator="Leica"))).declared == "none"


def test_rules_read_both_action_labels_and_skip_the_empty_source() -> None:
    assert assess(_store("Trusted", _manifest("digitalCapture", label="c2pa.actions"))).declared == "captured"
    assert assess(_store("Trusted", _manifest("empty", generator="Nikon Z9"))).declared == "captured"
    neither = assess(_store("Trusted", _manifest("digitalCreation")))
    assert neither.declared == "none" and logit_for(neither) is None and "neither" in neither.reason
