"""Read and verify the C2PA manifest embedded in an image's bytes, with c2pa-python.

The only module that imports c2pa: the detector imports it when it loads, so a process without the library
still starts, and the detector abstains (`streamguard.builtin.credentials.plugin`).

Verification is offline. Remote manifests (a URL in the XMP instead of an embedded store) are not fetched: a
worker must not make requests that uploaders choose. Revocation (OCSP) is not fetched either, so a revoked
signer counts until the operator takes its anchor out.
"""

from __future__ import annotations

import io
import json

import c2pa

from streamguard.builtin.credentials.manifest import REMOTE, UNREADABLE, Finding, assess

# The formats that can carry an embedded store, by Pillow's name; others (BMP) cannot hold one.
_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "TIFF": "image/tiff",
         "AVIF": "image/avif", "HEIF": "image/heif"}


class Verifier:
    """Verifies manifests against the operator's trust anchors; one per detector, used from its thread."""

    def __init__(self, trust_anchors_pem: str) -> None:
        # trust_anchors replaces the library's own anchors: only the operator's roots are trusted. The
        # context parses the settings once; each Reader copies what it needs.
        self._context = c2pa.Context.from_dict({
            "trust": {"trust_anchors": trust_anchors_pem},
            "verify": {"verify_trust": True, "remote_manifest_fetch": False, "ocsp_fetch": False},
        })

    def read(self, data: bytes, image_format: str) -> Finding | None:
        """The finding for an image's embedded store; None when it has none (or its format cannot hold one)."""
        mime = _MIME.get(image_format)
        if mime is None or not data:
            return None
        try:
            reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, self._context)
            if reader is None:
                return None
            with reader:
                store = json.loads(reader.json())
        except c2pa.C2paError.NotSupported:
            return None  # a container variant the library cannot parse: no store could be read from it
        except c2pa.C2paError as exc:
            message = str(exc)[:300]
            # The library spells this one "Remote: ...", which its Python layer does not map to RemoteManifest.
            if isinstance(exc, c2pa.C2paError.RemoteManifest) or message.startswith("Remote"):
                return Finding(state=REMOTE, declared="none", failures=(message,))
            # A store that is there but broken is the uploader's doing, not the detector's failure: it is
            # reported, and the image is judged by the other detectors.
            return Finding(state=UNREADABLE, declared="none", failures=(message,))
        return assess(store)

    def close(self) -> None:
        self._context.close()
