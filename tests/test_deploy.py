"""Guards for deploy/: the Helm chart and the image, checked against the package without a helm binary.

No template is rendered here. The checks read values.yaml and Chart.yaml as YAML and the templates as
text, and compare them with what the worker really reads (`streamguard.config`) and serves
(`streamguard.worker.health`): a misspelt `.Values` path, a `STREAMGUARD_*` variable the worker does
not have, a probe on the wrong path or port, a grace period shorter than the drain.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, SecretStr

import streamguard
from streamguard.config import CONFIG_ENV, Settings, WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "streamguard"
TEMPLATES = CHART / "templates"

# After the drain budget the worker's shutdown still joins its processing thread (up to 5 s) and closes
# the producer (up to 5 s) before the final commit (streamguard/worker/loop.py, Worker.run).
SHUTDOWN_TAIL_S = 10

# values.yaml keys that no template reads, on purpose. Anything else unread is a dead, misleading knob.
UNUSED_ON_PURPOSE: set[str] = set()  # every value a template does not read is a mistake

VALUES_REF = re.compile(r"(?<![\w.])\$?\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
ENV_NAME = re.compile(r"\bSTREAMGUARD_[A-Z0-9_]*[A-Z0-9]\b")
TEMPLATE_COMMENT = re.compile(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", re.S)


def values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def template_files() -> list[Path]:
    files = sorted(p for p in TEMPLATES.iterdir() if p.is_file())
    assert files, "no templates"
    return files


def template_text(name: str) -> str:
    return (TEMPLATES / name).read_text()


def deploy_text_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file())


def values_refs(text: str) -> list[str]:
    return [m.group(1)[1:] for m in VALUES_REF.finditer(TEMPLATE_COMMENT.sub("", text))]


def lookup(tree: Any, dotted: str) -> Any:
    node = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(dotted)
        node = node[key]
    return node


def leaf_paths(tree: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            paths += leaf_paths(value, path + ".")
        else:
            paths.append(path)
    return paths


def line_setting(text: str, name: str) -> str:
    """The line of a template that sets environment variable NAME (a `NAME: value` map entry)."""
    lines = [line for line in text.splitlines() if re.match(rf"\s*{name}\s*:", line)]
    assert len(lines) == 1, f"{name} set {len(lines)} times"
    return lines[0]


def block(text: str, key: str) -> list[str]:
    """The lines nested under the first `key:` line (more indented than it)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"\s*{key}:\s*$", line):
            indent = len(line) - len(line.lstrip())
            body = []
            for nxt in lines[i + 1 :]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                body.append(nxt)
            return body
    raise AssertionError(f"no {key}: block")


def field_in(lines: list[str], key: str) -> str:
    found = [m.group(1).strip() for line in lines if (m := re.match(rf"\s*-?\s*{key}:\s*(.+)$", line))]
    assert found, f"no {key}: in block"
    return found[0]


# -- the chart's files ----------------------------------------------------------------------------------


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == CHART.name  # helm lint: the directory is named after the chart
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    assert chart["appVersion"] == streamguard.__version__
    assert isinstance(values(), dict)


def test_every_values_reference_exists_in_values_yaml() -> None:
    tree = values()
    missing = []
    for path in template_files():
        for ref in values_refs(path.read_text()):
            try:
                lookup(tree, ref)
            except KeyError:
                missing.append(f"{path.name}: .Values.{ref}")
    assert not missing, f"templates read values that values.yaml does not define: {missing}"


def test_every_values_key_is_read_by_a_template() -> None:
    refs = {ref for path in template_files() for ref in values_refs(path.read_text())}

    def used(leaf: str) -> bool:  # read itself, or through an ancestor passed whole (toYaml)
        return any(leaf == ref or leaf.startswith(ref + ".") for ref in refs)

    unused = {leaf for leaf in leaf_paths(values()) if not used(leaf)}
    assert unused == UNUSED_ON_PURPOSE, f"values.yaml keys no template reads: {sorted(unused)}"


def test_template_blocks_are_balanced() -> None:
    opener = re.compile(r"\{\{-?\s*(?:if|with|range|define|block)\b")
    end = re.compile(r"\{\{-?\s*end\s*-?\}\}")
    for path in template_files():
        text = TEMPLATE_COMMENT.sub("", path.read_text())
        assert text.count("{{") == text.count("}}"), path.name
        assert len(opener.findall(text)) == len(end.findall(text)), f"{path.name}: unbalanced if/with/range/end"


# -- settings the chart hands the worker ----------------------------------------------------------------


def check_setting_name(name: str) -> str | None:
    """Why NAME is not a setting `Settings` reads from the environment, or None when it is."""
    if name == CONFIG_ENV:
        return None
    parts = name.removeprefix("STREAMGUARD_").lower().split("__")
    if len(parts) < 2:
        return "not nested as STREAMGUARD_<SECTION>__<FIELD>"
    section, field, rest = parts[0], parts[1], parts[2:]
    if section not in Settings.model_fields:
        return f"no section {section!r} (the worker would silently ignore it)"
    model = Settings.model_fields[section].annotation
    assert isinstance(model, type) and issubclass(model, BaseModel)
    if field not in model.model_fields:
        return f"section {section!r} has no field {field!r} (the worker would refuse to start)"
    if rest and typing.get_origin(model.model_fields[field].annotation) is not dict:
        return f"{section}.{field} is not a map, so it has no sub-keys"
    return None


def test_every_streamguard_variable_under_deploy_is_a_real_setting() -> None:
    names: dict[str, set[str]] = {}
    for path in deploy_text_files():
        for name in ENV_NAME.findall(path.read_text(errors="replace")):
            names.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert "STREAMGUARD_WORKER__HEALTH_PORT" in names  # the scan itself works
    wrong = {name: (why, sorted(names[name])) for name in names if (why := check_setting_name(name))}
    assert not wrong, f"not settings of streamguard.config.Settings: {wrong}"


def test_setting_name_check_catches_mistakes() -> None:
    assert check_setting_name("STREAMGUARD_WORKER__GROUP_ID") is None
    assert check_setting_name("STREAMGUARD_FUSION__WEIGHTS__PROVENANCE") is None
    assert check_setting_name("STREAMGUARD_WORKER__GROUPID")
    assert check_setting_name("STREAMGUARD_WORKERS__GROUP_ID")
    assert check_setting_name("STREAMGUARD_GROUP_ID")
    assert check_setting_name("STREAMGUARD_WORKER__GROUP_ID__X")


def secret_setting_names() -> set[str]:
    names = {"STREAMGUARD_REDIS__URL"}  # may carry a password
    for section, info in Settings.model_fields.items():
        model = info.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        for field, finfo in model.model_fields.items():
            if SecretStr in (finfo.annotation, *typing.get_args(finfo.annotation)):
                names.add(f"STREAMGUARD_{section.upper()}__{field.upper()}")
    return names


def test_secrets_come_from_secrets_only() -> None:
    secrets = secret_setting_names()
    assert "STREAMGUARD_KAFKA__SASL_PASSWORD" in secrets
    for name in ("configmap.yaml",):
        leaked = secrets & set(ENV_NAME.findall(template_text(name)))
        assert not leaked, f"{name} holds secret settings {leaked}"
    lines = template_text("deployment.yaml").splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*- name:\s*(STREAMGUARD_\w+)\s*$", line)
        if m and m.group(1) in secrets:
            assert lines[i + 1].strip() == "valueFrom:" and lines[i + 2].strip() == "secretKeyRef:", m.group(1)
    deployment = template_text("deployment.yaml")
    for name in ("STREAMGUARD_REDIS__URL", "STREAMGUARD_KAFKA__SASL_PASSWORD"):
        assert re.search(rf"- name:\s*{name}\s*\n\s*valueFrom:", deployment), f"{name} not from a Secret"


# -- probes, ports, shutdown ------------------------------------------------------------------------------


def test_probes_hit_the_worker_health_endpoints() -> None:
    deployment = template_text("deployment.yaml")
    port_name = field_in(block(deployment, "ports"), "name")
    expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        body = block(deployment, probe)
        assert field_in(body, "path") == path, probe
        assert field_in(body, "port") in (port_name, field_in(block(deployment, "ports"), "containerPort")), probe
    # The worker's handler really serves these paths.
    source = (ROOT / "streamguard" / "worker" / "health.py").read_text()
    assert all(f'"{p}"' in source for p in ("/healthz", "/readyz", "/metrics"))


def test_container_port_is_the_health_port() -> None:
    deployment = template_text("deployment.yaml")
    port = field_in(block(deployment, "ports"), "containerPort")
    default = WorkerSettings().health_port
    if port.isdigit():  # a literal port must be the one the worker is configured to listen on
        assert int(port) == int(configured("STREAMGUARD_WORKER__HEALTH_PORT", default))
    else:
        refs = values_refs(port)
        assert len(refs) == 1, port
        env_refs = values_refs(line_setting(template_text("configmap.yaml"), "STREAMGUARD_WORKER__HEALTH_PORT"))
        assert refs == env_refs, "containerPort and STREAMGUARD_WORKER__HEALTH_PORT read different values"
    expose = re.findall(r"^EXPOSE\s+(\d+)", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert expose == [str(default)]


def test_metrics_service_and_servicemonitor_agree() -> None:
    service = template_text("service.yaml")
    deployment = template_text("deployment.yaml")
    assert field_in(block(service, "ports"), "targetPort") == field_in(block(deployment, "ports"), "name")
    service_port = field_in(block(service, "ports"), "name")
    assert field_in(block(template_text("servicemonitor.yaml"), "endpoints"), "port") == service_port
    assert field_in(block(template_text("servicemonitor.yaml"), "endpoints"), "path") == "/metrics"
    assert re.search(r"clusterIP:\s*None", service)


def configured(name: str, default: Any) -> Any:
    """The value the chart's defaults give setting NAME: extraEnv, else the ConfigMap's values key, else DEFAULT."""
    tree = values()
    for entry in tree.get("extraEnv") or []:
        if entry.get("name") == name:
            return entry["value"]
    configmap = template_text("configmap.yaml")
    if re.search(rf"^\s*{name}\s*:", configmap, re.M):
        refs = values_refs(line_setting(configmap, name))
        assert len(refs) == 1, name
        return lookup(tree, refs[0])
    return default


def test_grace_period_covers_the_drain_budget() -> None:
    deployment = template_text("deployment.yaml")
    grace_line = [line for line in deployment.splitlines() if "terminationGracePeriodSeconds:" in line]
    assert len(grace_line) == 1
    refs = values_refs(grace_line[0])
    tree = values()
    grace = float(lookup(tree, refs[0])) if refs else float(grace_line[0].split(":", 1)[1])
    drain = float(configured("STREAMGUARD_WORKER__DRAIN_TIMEOUT_S", WorkerSettings().drain_timeout_s))
    assert grace > drain + SHUTDOWN_TAIL_S, f"grace {grace}s does not cover drain {drain}s + {SHUTDOWN_TAIL_S}s"


# -- scaling ----------------------------------------------------------------------------------------------


def test_keda_watches_the_workers_group_topic_and_brokers() -> None:
    scaled = template_text("scaledobject.yaml")
    configmap = template_text("configmap.yaml")
    trigger = block(scaled, "triggers")
    for key, env in [
        ("consumerGroup", "STREAMGUARD_WORKER__GROUP_ID"),
        ("topic", "STREAMGUARD_WORKER__INPUT_TOPIC"),
        ("bootstrapServers", "STREAMGUARD_KAFKA__BOOTSTRAP_SERVERS"),
    ]:
        assert values_refs(field_in(trigger, key)) == values_refs(line_setting(configmap, env)), key
    assert field_in(trigger, "type") == "kafka"
    assert scaled.lstrip().startswith("{{- if .Values.keda.enabled }}")

    from streamguard.worker.loop import consumer_config

    assert field_in(trigger, "offsetResetPolicy") == consumer_config(Settings())["auto_offset_reset"]


def test_replicas_are_capped_by_partitions() -> None:
    scaled = template_text("scaledobject.yaml")
    max_line = field_in(scaled.splitlines(), "maxReplicaCount")
    assert max_line.startswith("{{ min ") and set(values_refs(max_line)) == {
        "keda.maxReplicaCount",
        "worker.inputTopicPartitions",
    }
    # With KEDA on, the Deployment must leave replicas to the HPA.
    deployment = template_text("deployment.yaml")
    assert re.search(r"\{\{-? if not \.Values\.keda\.enabled \}\}\n(?:.*\n)?\s*replicas:", deployment)
    tree = values()
    assert tree["replicaCount"] <= tree["worker"]["inputTopicPartitions"]


@pytest.mark.parametrize("name", ["pdb.yaml", "servicemonitor.yaml", "scaledobject.yaml"])
def test_optional_resources_are_conditional(name: str) -> None:
    first = template_text(name).lstrip().splitlines()[0]
    assert re.match(r"\{\{-? if .*\.Values\.\w+\.enabled", first), name
