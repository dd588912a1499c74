"""What a C2PA manifest store declares about an image, and whether the verifier believed it.

Pure data in, data out: the input is the store as c2pa's Reader reports it (``Reader.json()``), so the rules
are tested without the library. Whether a finding counts as evidence is the detector's call
(`streamguard.builtin.credentials.plugin`); here a declaration is read the same whether or not it is trusted,
so an untrusted one can still be logged for what it claimed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

# c2pa's validation states. Only "Trusted" means the signature verified, the signer chains to a configured
# anchor and every hash (the asset's bytes included) matched; "Valid" is a sound signature by a signer
# nobody vouched for, which anyone with a self-made CA can produce.
TRUSTED = "Trusted"
INVALID = "Invalid"  # a hash or a signature did not match: tampered, or broken by re-encoding
UNREADABLE = "Unreadable"  # a manifest is there, but the library could not parse it
REMOTE = "Remote"  # the image points at a manifest elsewhere, which is not fetched

# IPTC digital source types (cv.iptc.org/newscodes/digitalsourcetype/), by the last part of the URI.
# Generated: made by a trained model, whole or in part (a generative fill counts: the pixels are not all
# a camera's). algorithmicMedia (procedural, no training) and algorithmicallyEnhanced (denoise, upscaling)
# are neither, on purpose.
GENERATED_SOURCE_TYPES = frozenset({"trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia"})
# Captured: pixels from a sensor; computationalCapture is a phone's multi-frame processing of one shot,
# compositeCapture a merge of captures (HDR, panoramas) with nothing synthetic.
CAPTURE_SOURCE_TYPES = frozenset({"digitalCapture", "computationalCapture", "compositeCapture"})
# Cameras that sign at capture often leave digitalSourceType out and name themselves as claim generator.
# Only read from a store the verifier trusted, so the name is vouched for by the signer's certificate.
_CAMERA_MAKERS = re.compile(
    r"\b(leica|nikon|sony|canon|fujifilm|panasonic|lumix|hasselblad|ricoh|pentax|om system|olympus)\b",
    re.IGNORECASE,
)
_MAX_FAILURES = 8

Declared = Literal["generated", "captured", "none"]


@dataclass(frozen=True)
class Finding:
    """One image's manifest store: the verifier's state and what the manifests declare."""

    state: str  # c2pa's Trusted, Valid or Invalid; or Unreadable, Remote
    declared: Declared
    source_types: tuple[str, ...] = ()
    claim_generator: str = ""
    issuer: str = ""
    failures: tuple[str, ...] = ()  # c2pa's failure codes (or the read error), the first few

    @property
    def trusted(self) -> bool:
        return self.state == TRUSTED

    @property
    def reason(self) -> str:
        """Why the finding counts or not, in a few words, for logs."""
        if not self.trusted:
            why = ", ".join(self.failures) or "no trusted signer"
            return f"{self.state.lower()} manifest ({why}): not evidence either way"
        if self.declared == "none":
            return "trusted manifest that declares neither generation nor capture"
        return f"trusted manifest declaring {self.declared} content"


def assess(store: Mapping[str, Any]) -> Finding:
    """The finding for one manifest store (the JSON of ``c2pa.Reader.json()``)."""
    manifests: Mapping[str, Any] = store.get("manifests") or {}
    active = manifests.get(store.get("active_manifest") or "") or {}
    # Generation anywhere in the chain (the active manifest or an ingredient's) survives later edits; capture
    # is what the active manifest, the one bound to these bytes, says.
    chain_types = {t for manifest in manifests.values() for t in _source_types(manifest)}
    active_types = set(_source_types(active))
    generator = _claim_generator(active)
    if chain_types & GENERATED_SOURCE_TYPES:
        declared: Declared = "generated"
    elif active_types & CAPTURE_SOURCE_TYPES:
        declared = "captured"
    elif not active_types and _CAMERA_MAKERS.search(generator):
        declared = "captured"
    else:
        declared = "none"
    signature = active.get("signature_info") or {}
    return Finding(
        state=str(store.get("validation_state") or INVALID),
        declared=declared,
        source_types=tuple(sorted(chain_types)),
        claim_generator=generator,
        issuer=str(signature.get("issuer") or signature.get("common_name") or ""),
        failures=tuple(_failure_codes(store))[:_MAX_FAILURES],
    )


def _source_types(manifest: Mapping[str, Any]) -> Iterable[str]:
    for assertion in manifest.get("assertions") or ():
        label = str(assertion.get("label", ""))
        # c2pa.actions (v1) and c2pa.actions.v2; a second instance of an assertion is labelled "...__1".
        if not re.fullmatch(r"c2pa\.actions(\.v\d+)?(__\d+)?", label):
            continue
        for action in (assertion.get("data") or {}).get("actions") or ():
            for uri in (action.get("digitalSourceType"), (action.get("parameters") or {}).get("digitalSourceType")):
                name = uri.rstrip("/").rsplit("/", 1)[-1] if isinstance(uri, str) else ""
                if name and name != "empty":  # "empty" is c2pa's placeholder for a source not stated
                    yield name


def _claim_generator(manifest: Mapping[str, Any]) -> str:
    names = [str(info.get("name", "")) for info in manifest.get("claim_generator_info") or () if info.get("name")]
    legacy = manifest.get("claim_generator")  # claims v1 spell it as one string
    if isinstance(legacy, str) and legacy:
        names.append(legacy)
    return "; ".join(names)[:200]


def _failure_codes(store: Mapping[str, Any]) -> Iterable[str]:
    results = store.get("validation_results") or {}
    for status in (results.get("activeManifest") or {}).get("failure") or ():
        yield str(status.get("code"))
    for delta in results.get("ingredientDeltas") or ():
        for status in (delta.get("validationDeltas") or {}).get("failure") or ():
            yield f"ingredient {status.get('code')}"
