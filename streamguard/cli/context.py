"""Shared state of one CLI invocation: the settings and the plugin manager, built on first use."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import click
import pluggy
from pydantic import ValidationError

from streamguard.config import Settings, load_settings
from streamguard.logs import configure_logging
from streamguard.plugins import build_plugin_manager


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

    @cached_property
    def plugin_manager(self) -> pluggy.PluginManager:
        return build_plugin_manager(self.settings.plugins)
