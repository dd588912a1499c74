"""Shared state of one CLI invocation: the settings and the plugin manager, built on first use."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import click
import pluggy
from pydantic import ValidationError

from streamguard.config import Settings, load_settings
from streamguard.logs import configure_logging
from streamguard.plugins import build_plugin_manager, enabling

# For the commands that judge files (scan, eval, calibrate): the worker's detectors.timeout_s protects a
# stream's latency, but offline an image lost to a slow model on busy cores is only a lost image.
detector_timeout_option = click.option(
    "--detector-timeout",
    "detector_timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds a detector may take on one batch before its images get an error score "
    "(default: no limit; detectors.timeout_s is the worker's).",
)


class AppContext:
    def __init__(self, config_file: Path | None) -> None:
        self._config_file = config_file

    @cached_property
    def settings(self) -> Settings:
        try:
            settings = load_settings(self._config_file)
        except (ValidationError, FileNotFoundError, ValueError) as exc:
            raise click.ClickException(f"invalid configuration: {exc}") from None
        configure_logging(settings.log)
        return settings

    def offline_settings(self, detector_timeout_s: float | None) -> Settings:
        """The settings with the detector timeout of a command that judges files rather than a stream."""
        settings = self.settings
        detectors = settings.detectors.model_copy(update={"timeout_s": detector_timeout_s})
        return settings.model_copy(update={"detectors": detectors})

    @cached_property
    def plugin_manager(self) -> pluggy.PluginManager:
        return build_plugin_manager(self.settings.plugins)

    def plugin_manager_for(self, detector: str) -> pluggy.PluginManager:
        """The plugins of a command that measures ``detector`` by name: an opt-in built-in's detector (mpft,
        pin-clip, nirnet) is measured without enabling it in the configuration first."""
        settings = enabling(self.settings.plugins, detector)
        return self.plugin_manager if settings is self.settings.plugins else build_plugin_manager(settings)
