"""Commands that describe streamguard: ``schema``, ``config show``, ``plugins``."""

from __future__ import annotations

import json

import click

from streamguard.cli.context import AppContext
from streamguard.plugins import plugin_infos
from streamguard.registry import collect_detectors
from streamguard.schemas import RECORDS, json_schemas

pass_app = click.make_pass_decorator(AppContext)


@click.command("schema")
@click.argument("record", required=False, type=click.Choice(sorted(RECORDS)))
def schema_command(record: str | None) -> None:
    """Print the JSON Schema of RECORD, or of every record."""
    schemas = json_schemas()
    click.echo(json.dumps(schemas[record] if record else schemas, indent=2))


@click.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("show")
@pass_app
def config_show(app: AppContext) -> None:
    """Print the effective configuration (file, environment, defaults), secrets redacted."""
    click.echo(json.dumps(app.settings.redacted(), indent=2))


@click.command("plugins")
@pass_app
def plugins_command(app: AppContext) -> None:
    """List loaded plugins and the detectors they register."""
    pm = app.plugin_manager
    out = {
        "plugins": [info.__dict__ for info in plugin_infos(pm)],
        "detectors": [
            {
                "name": spec.name,
                "version": spec.version,
                "description": spec.description,
                "contract": None if spec.contract is None else spec.contract.__dict__,
            }
            for spec in collect_detectors(pm, app.settings)
        ],
    }
    click.echo(json.dumps(out, indent=2, default=list))
