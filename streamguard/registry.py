"""Collect the detectors that plugins register, refusing duplicates and malformed specs by name."""

from __future__ import annotations

import pluggy
import structlog

from streamguard.config import Settings
from streamguard.detectors.spec import DetectorSpec
from streamguard.plugins import call_each

log = structlog.get_logger(__name__)


def collect_detectors(pm: pluggy.PluginManager, settings: Settings) -> list[DetectorSpec]:
    specs: dict[str, DetectorSpec] = {}

    def register(spec: DetectorSpec) -> None:
        if not isinstance(spec, DetectorSpec):
            raise TypeError(f"register() takes a DetectorSpec, not {type(spec).__name__}")
        if spec.name in specs:
            log.error("detector.duplicate_name", detector=spec.name)
            return
        # The deny list also takes detector names, so one of a plugin's several detectors can be switched
        # off; the allow list names plugins only, or allowing a plugin would not allow its detectors.
        if spec.name in settings.plugins.deny:
            log.info("detector.denied", detector=spec.name)
            return
        specs[spec.name] = spec

    call_each(pm, "register_detectors", register=register, settings=settings)
    return list(specs.values())
