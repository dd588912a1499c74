"""Guards for deploy/: the Helm chart, the images, and what the tools say about them.

Two kinds of checks. The first read values.yaml, Chart.yaml and the templates as text and compare them
with what the worker really reads (`streamguard.config`) and serves (`streamguard.worker.health`): a
misspelt `.Values` path, a `STREAMGUARD_*` variable the worker does not have, a probe on the wrong path or
port, a grace period shorter than the drain.

The second run the real tools, installed by scripts/install_deploy_tools.sh (pinned, checksummed; the
session fixture runs it, and a missing tool fails the tests, never skips them): `helm lint --strict` and
`helm template` (helm 4) for each configuration in CONFIGS, every rendered manifest validated against the
Kubernetes 1.29 and 1.33 schemas (kubernetes-validate, strict: unknown fields fail) and the KEDA and
prometheus-operator CRD schemas, checkov once over every rendering and the Dockerfiles, hadolint on each
Dockerfile, and the rendered worker environment loaded by the worker's own `Settings`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import typing
from dataclasses import dataclass
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
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            # A table of sections (tenants.<name>): the chart sets none of it, but none may hold a secret
            # the chart would then have to route through a Secret.
            nested = [a for a in typing.get_args(model) if isinstance(a, type) and issubclass(a, BaseModel)]
            assert nested, f"settings section {section} is neither a model nor a table of models"
            assert not any(SecretStr in (f.annotation, *typing.get_args(f.annotation))
                           for m in nested for f in m.model_fields.values()), section
            continue
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
        "worker.processes",  # each pod holds that many consumers of the group
    }
    # With KEDA on, the Deployment must leave replicas to the HPA.
    deployment = template_text("deployment.yaml")
    assert re.search(r"\{\{-? if not \.Values\.keda\.enabled \}\}\n(?:.*\n)?\s*replicas:", deployment)
    tree = values()
    assert tree["replicaCount"] <= tree["worker"]["inputTopicPartitions"]


@pytest.mark.parametrize(
    "name", ["pdb.yaml", "servicemonitor.yaml", "scaledobject.yaml", "networkpolicy-worker.yaml"]
)
def test_optional_resources_are_conditional(name: str) -> None:
    first = template_text(name).lstrip().splitlines()[0]
    assert re.match(r"\{\{-? if .*\.Values\.\w+\.enabled", first), name


# == the real tools ======================================================================================
#
# scripts/install_deploy_tools.sh installs them (idempotent; a second run takes a second). Everything below
# renders the chart with helm for each configuration and hands the manifests to the validators.

INSTALL_SCRIPT = ROOT / "scripts" / "install_deploy_tools.sh"
TOOLS_DIR = ROOT / ".cache" / "deploy-tools"
CI_VALUES = CHART / "ci"
RELEASE, NAMESPACE = "sg", "streamguard"
# The oldest Kubernetes still commonly run and a current one; the chart must render valid for both.
KUBE_VERSIONS = ("1.29.0", "1.33.0")
# Configuration name -> values file under the chart's ci/ (None: the chart's defaults).
CONFIGS: dict[str, str | None] = {
    "default": None,
    "triton-gpu": "triton-gpu-values.yaml",
    "keda-servicemonitor": "keda-servicemonitor-values.yaml",
    "tls-sasl": "tls-sasl-values.yaml",
    "oauthbearer": "oauthbearer-values.yaml",
    "inprocess": "inprocess-values.yaml",
}
DOCKERFILES = ("Dockerfile", "Dockerfile.inprocess", "Dockerfile.triton")
# Secret mounts of the worker's and Triton's pods: the settings that name files point under these.
SECRET_ROOT = "/etc/streamguard/"


@dataclass(frozen=True)
class Tools:
    helm: Path
    checkov: Path
    hadolint: Path
    crd_schemas: dict[tuple[str, str], dict[str, Any]]


@pytest.fixture(scope="session")
def tools() -> Tools:
    """Install (or find installed) the pinned tools; a missing or broken tool fails, it never skips."""
    env = dict(os.environ, PROJECT_PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"{INSTALL_SCRIPT.name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    found = Tools(
        helm=TOOLS_DIR / "bin" / "helm",
        checkov=TOOLS_DIR / "venv" / "bin" / "checkov",
        hadolint=TOOLS_DIR / "venv" / "bin" / "hadolint",
        crd_schemas={},
    )
    for tool in (found.helm, found.checkov, found.hadolint):
        assert os.access(tool, os.X_OK), f"{tool} missing after {INSTALL_SCRIPT.name}"
    for path in sorted((TOOLS_DIR / "crd-schemas").glob("*.json")):
        schema = json.loads(path.read_text())
        props = schema["properties"]
        found.crd_schemas[(props["apiVersion"]["const"], props["kind"]["const"])] = schema
    assert set(found.crd_schemas) == {
        ("keda.sh/v1alpha1", "ScaledObject"),
        ("keda.sh/v1alpha1", "TriggerAuthentication"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
    }
    return found


def helm(tools: Tools, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(tools.helm), *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HELM_CACHE_HOME=str(TOOLS_DIR / "helm-cache"),
                                   HELM_CONFIG_HOME=str(TOOLS_DIR / "helm-config"),
                                   HELM_DATA_HOME=str(TOOLS_DIR / "helm-data")))
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def values_args(config: str) -> list[str]:
    name = CONFIGS[config]
    return ["-f", str(CI_VALUES / name)] if name else []


def template(tools: Tools, config: str, kube_version: str = KUBE_VERSIONS[-1], *extra: str,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    return helm(tools, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", kube_version,
                *values_args(config), *extra, check=check)


@pytest.fixture(scope="session")
def rendered(tools: Tools) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Every configuration rendered for every Kubernetes version, once per session."""
    out = {}
    for config in CONFIGS:
        for version in KUBE_VERSIONS:
            docs = [d for d in yaml.safe_load_all(template(tools, config, version).stdout) if d]
            assert docs, (config, version)
            out[(config, version)] = docs
    return out


def manifests(rendered: dict[tuple[str, str], list[dict[str, Any]]], config: str) -> list[dict[str, Any]]:
    return rendered[(config, KUBE_VERSIONS[-1])]


def find(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{len(found)} {kind} named *{name_suffix}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)


def worker(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return find(docs, "Deployment", "streamguard")


def triton(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return find(docs, "Deployment", "-triton")


def container(deployment: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return containers[0] if name is None else next(c for c in containers if c["name"] == name)


def worker_env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The worker container's environment: the ConfigMap (envFrom) overlaid with env (value or valueFrom)."""
    env: dict[str, Any] = dict(find(docs, "ConfigMap")["data"])
    for entry in container(worker(docs)).get("env", []):
        env[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return env


# -- helm -------------------------------------------------------------------------------------------------


def test_helm_is_helm_4(tools: Tools) -> None:
    assert helm(tools, "version", "--template", "{{.Version}}").stdout.strip() == "v4.1.4"


@pytest.mark.parametrize("config", CONFIGS)
def test_helm_lint_strict(tools: Tools, config: str) -> None:
    proc = helm(tools, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *values_args(config))
    assert "0 chart(s) failed" in proc.stdout, proc.stdout


def test_every_configuration_renders_what_it_should(rendered: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    expected = {
        "default": ["ConfigMap", "Deployment", "Deployment", "NetworkPolicy", "NetworkPolicy",
                    "PodDisruptionBudget", "PodDisruptionBudget", "Service", "Service", "ServiceAccount"],
        "triton-gpu": ["ConfigMap", "Deployment", "Deployment", "NetworkPolicy", "NetworkPolicy",
                       "PodDisruptionBudget", "PodDisruptionBudget", "Service", "Service", "ServiceAccount"],
        "keda-servicemonitor": ["ConfigMap", "Deployment", "Deployment", "NetworkPolicy", "NetworkPolicy",
                                "PodDisruptionBudget", "PodDisruptionBudget", "ScaledObject", "Service", "Service",
                                "ServiceAccount", "ServiceMonitor", "ServiceMonitor"],
        "tls-sasl": ["ConfigMap", "Deployment", "Deployment", "NetworkPolicy", "NetworkPolicy", "PodDisruptionBudget",
                     "PodDisruptionBudget", "ScaledObject", "Secret", "Service", "Service", "ServiceAccount",
                     "TriggerAuthentication"],
        "oauthbearer": ["ConfigMap", "Deployment", "Deployment", "NetworkPolicy", "NetworkPolicy",
                        "PodDisruptionBudget", "PodDisruptionBudget", "ScaledObject", "Secret", "Service", "Service",
                        "ServiceAccount", "TriggerAuthentication"],
        "inprocess": ["ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "ScaledObject", "Service",
                      "ServiceAccount", "ServiceMonitor"],
    }
    assert set(expected) == set(CONFIGS)
    for (config, version), docs in rendered.items():
        assert sorted(d["kind"] for d in docs) == expected[config], (config, version, kinds(docs))
        for doc in docs:  # namespaced, labelled as one release
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
            assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


# -- schemas: Kubernetes 1.29 / 1.33 and the CRDs -----------------------------------------------------------


def validate_manifest(tools: Tools, doc: dict[str, Any], kube_version: str) -> None:
    """Raise unless DOC is valid: a CRD kind against its schema, anything else against Kubernetes' own
    (strict: a field Kubernetes does not know fails)."""
    import jsonschema
    import kubernetes_validate

    crd = tools.crd_schemas.get((doc["apiVersion"], doc["kind"]))
    if crd is not None:
        jsonschema.Draft202012Validator(crd).validate(doc)
    else:
        kubernetes_validate.validate(doc, kube_version, strict=True)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("config", CONFIGS)
def test_rendered_manifests_are_valid(tools: Tools, rendered: dict[tuple[str, str], list[dict[str, Any]]],
                                      config: str, kube_version: str) -> None:
    failures = []
    for doc in rendered[(config, kube_version)]:
        try:
            validate_manifest(tools, doc, kube_version)
        except Exception as exc:  # noqa: BLE001 - report every document's failure at once
            path = ".".join(str(p) for p in getattr(exc, "path", []))
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {getattr(exc, 'message', exc)}")
    assert not failures, "\n".join(failures)


def test_kubernetes_schemas_are_there_offline() -> None:
    import kubernetes_validate.utils as kv

    versions = set(kv.all_versions())
    assert {"1.29.0", "1.33.0"} <= versions, sorted(versions)


@pytest.mark.parametrize(
    ("kind", "path", "key"),
    [
        ("Deployment", ["spec", "template", "spec", "containers", 0], "imagePullPolicyy"),
        ("NetworkPolicy", ["spec"], "egres"),
        ("ScaledObject", ["spec", "fallback"], "replica"),
        ("ScaledObject", ["spec"], "maxReplicas"),
        ("TriggerAuthentication", ["spec", "secretTargetRef", 0], "parametr"),
        ("ServiceMonitor", ["spec", "endpoints", 0], "intervall"),
    ],
)
def test_schema_validation_catches_a_misspelt_field(tools: Tools, rendered: dict[tuple[str, str], list[dict[str, Any]]],
                                                    kind: str, path: list[Any], key: str) -> None:
    """The validators are strict: a field the API does not know fails instead of being dropped."""
    doc = next(d for docs in rendered.values() for d in docs if d["kind"] == kind)
    broken = copy.deepcopy(doc)
    node = broken
    for step in path:
        node = node[step]
    node[key] = 1
    validate_manifest(tools, doc, KUBE_VERSIONS[-1])  # the real one passes
    with pytest.raises(Exception) as info:
        validate_manifest(tools, broken, KUBE_VERSIONS[-1])
    assert key in str(info.value) or "additional" in str(info.value).lower(), info.value


def test_keda_trigger_metadata_values_are_strings(tools: Tools) -> None:
    """KEDA reads trigger metadata as a map of strings; the CRD schema refuses a number there."""
    doc = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"},
           "spec": {"scaleTargetRef": {"name": "x"}, "triggers": [{"type": "kafka", "metadata": {"lagThreshold": 200}}]}}
    with pytest.raises(Exception, match="string"):
        validate_manifest(tools, doc, KUBE_VERSIONS[-1])


# -- values.schema.json ---------------------------------------------------------------------------------


def schema_json() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = {**schema["$defs"][node["$ref"].rsplit("/", 1)[1]], **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def test_values_schema_describes_every_key_and_refuses_others() -> None:
    schema = schema_json()
    assert schema["additionalProperties"] is False
    missing, open_objects = [], []

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        node = resolve(schema, node)
        if not isinstance(value, dict) or "properties" not in node:
            return
        if node.get("additionalProperties") is not False:
            open_objects.append(path or "<root>")
        for key, child in value.items():
            if key not in node["properties"]:
                missing.append(f"{path}{key}")
            else:
                walk(child, node["properties"][key], f"{path}{key}.")

    walk(values(), schema, "")
    assert not missing, f"values.yaml keys values.schema.json does not describe: {missing}"
    assert not open_objects, f"schema objects that accept unknown keys: {open_objects}"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("kafka.sasl.mechanizm=PLAIN", "mechanizm"),
        ("triton.server.modles[0]=univfd", "modles"),
        ("networkPolicy.worker.kafak.to=x", "kafak"),
        ("kafka.sasl.mechanism=GSSAPI", "mechanism"),
        ("kafka.securityProtocol=TLS", "securityProtocol"),
        ("detectors.backend=onnx", "backend"),
        ("image.tag=latest", "tag"),
        ("image.digest=sha256:1234", "digest"),
        ("kafka.bootstrapServers=kafka", "bootstrapServers"),
        ("triton.trunkModel=clip/detectors", "trunkModel"),
    ],
)
def test_values_schema_refuses_typos_and_bad_values(tools: Tools, setting: str, message: str) -> None:
    proc = template(tools, "default", KUBE_VERSIONS[-1], "--set", setting, check=False)
    assert proc.returncode != 0, f"--set {setting} rendered"
    assert "schema" in proc.stderr and message in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["replicaCount=13"], "exceeds worker.inputTopicPartitions"),
        (["replicaCount=5", "worker.processes=3"], "x worker.processes 3 exceeds worker.inputTopicPartitions 12"),
        (["worker.processes=13"], "worker.processes 13 exceeds"),
        (["keda.enabled=true", "keda.fallback.replicas=13"], "keda.fallback.replicas"),
        (["kafka.securityProtocol=SASL_SSL", "kafka.tls.existingSecret=ca"], "needs kafka.sasl.mechanism"),
        (["kafka.securityProtocol=SASL_SSL", "kafka.sasl.mechanism=PLAIN", "kafka.tls.existingSecret=ca"],
         "kafka.sasl.existingSecret is required"),
        (["kafka.sasl.mechanism=PLAIN", "kafka.sasl.existingSecret=s"], "is not SASL_PLAINTEXT or SASL_SSL"),
        (["kafka.securityProtocol=SSL"], "kafka.tls.existingSecret"),
        (["kafka.securityProtocol=SSL", "kafka.tls.existingSecret=ca", "kafka.tls.certKey=tls.crt"], "go together"),
        (["keda.enabled=true", "kafka.securityProtocol=SASL_SSL", "kafka.tls.existingSecret=ca",
          "kafka.sasl.mechanism=OAUTHBEARER", "kafka.sasl.existingSecret=t"], "keda.oauth"),
        (["triton.tls.enabled=true"], "triton.tls.clientSecret"),
        (["triton.tls.enabled=true", "triton.tls.clientSecret=c"], "triton.tls.serverSecret"),
        (["triton.server.modelRepository.source=pvc"], "pvc.claimName"),
        (["triton.server.enabled=false"], "triton.url is required"),
        (["triton.server.enabled=false", "triton.url=triton.example:8001"], "networkPolicy.worker.triton.to"),
        (["triton.server.models={univfd,mpft}"], 'triton.trunkModel "clip-detectors" is not among triton.server.models'),
    ],
)
def test_render_refuses_inconsistent_values(tools: Tools, settings: list[str], message: str) -> None:
    args = [arg for setting in settings for arg in ("--set", setting)]
    proc = template(tools, "default", KUBE_VERSIONS[-1], *args, check=False)
    assert proc.returncode != 0, f"{settings} rendered"
    assert message in proc.stderr, proc.stderr


# -- what the configurations render -----------------------------------------------------------------------


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_triton_deployment(rendered: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    docs = manifests(rendered, "default")
    deployment = triton(docs)
    pod = deployment["spec"]["template"]["spec"]
    server = container(deployment, "tritonserver")
    args = server["args"]
    defaults = values()["triton"]["server"]
    # Explicit model control, each model loaded by name, strict readiness, metrics on 8002.
    assert "--model-control-mode=explicit" in args and "--strict-readiness=true" in args
    assert [a.split("=", 1)[1] for a in args if a.startswith("--load-model=")] == defaults["models"]
    assert "--metrics-port=8002" in args and "--allow-gpu-metrics=true" in args
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    # Probes on Triton's HTTP health endpoints.
    probe_paths = {probe: server[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probe_paths == {"startupProbe": "/v2/health/ready", "livenessProbe": "/v2/health/live",
                           "readinessProbe": "/v2/health/ready"}
    assert all(server[p]["httpGet"]["port"] == "http" for p in probe_paths)
    # A GPU, tolerating the GPU nodes' taint.
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # The model repository copied by an init container from the Triton image into an emptyDir.
    (init,) = pod["initContainers"]
    assert init["image"] == server["image"]
    assert init["command"] == ["cp", "-R", defaults["modelRepository"]["image"]["path"] + "/.", "/models/"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["models"] and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert "--model-repository=/models" in args
    # Non-root, read-only, as the image's user.
    assert pod["securityContext"]["runAsUser"] == 10002 and pod["securityContext"]["runAsNonRoot"] is True
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    # Triton drains in-flight requests before the kubelet's SIGKILL.
    exit_timeout = int(next(a for a in args if a.startswith("--exit-timeout-secs=")).split("=")[1])
    assert pod["terminationGracePeriodSeconds"] > exit_timeout


def test_workers_reach_triton_through_the_headless_service(rendered: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    from streamguard.config import TritonSettings

    docs = manifests(rendered, "default")
    service = find(docs, "Service", "-triton-headless")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is False
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == 8001
    pod_labels = triton(docs)["spec"]["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], pod_labels)
    assert not selects(service["spec"]["selector"], worker(docs)["spec"]["template"]["metadata"]["labels"])
    url = worker_env(docs)["STREAMGUARD_TRITON__URL"]
    assert url == f"dns:///{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:8001"
    assert TritonSettings(url=url).grpc_target() == url  # the worker takes it as gRPC's dns resolver target
    pdb = find(docs, "PodDisruptionBudget", "-triton")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)


def load_models(deployment: dict[str, Any]) -> list[str]:
    return [a.split("=", 1)[1] for a in container(deployment, "tritonserver")["args"] if a.startswith("--load-model=")]


def test_workers_call_the_shared_trunk_triton_loads(tools: Tools,
                                                    rendered: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    """By default each batch goes once to the shared-trunk ensemble, and Triton loads it and its parts for the
    detectors the Triton image builds by default; trunkModel "" goes back to one whole model per detector."""
    from streamguard.triton.shared_trunk import ENSEMBLE_MODEL, models_of

    docs = manifests(rendered, "default")
    assert worker_env(docs)["STREAMGUARD_TRITON__TRUNK_MODEL"] == ENSEMBLE_MODEL
    assert load_models(triton(docs)) == models_of(dockerfile_arg("Dockerfile.triton", "MODELS").split())
    # ["*"] loads the ensemble with the rest of the repository: the render-time check lets it through.
    assert worker_env(manifests(rendered, "triton-gpu"))["STREAMGUARD_TRITON__TRUNK_MODEL"] == ENSEMBLE_MODEL
    whole = [d for d in yaml.safe_load_all(template(tools, "default", KUBE_VERSIONS[-1], "--set", "triton.trunkModel=",
                                                    "--set", "triton.server.models={univfd,mpft}").stdout) if d]
    assert not [name for name in worker_env(whole) if name.endswith("TRUNK_MODEL")]
    assert load_models(triton(whole)) == ["univfd", "mpft"]


def test_triton_on_gpu_nodes(rendered: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    docs = manifests(rendered, "triton-gpu")
    deployment = triton(docs)
    pod = deployment["spec"]["template"]["spec"]
    server = container(deployment, "tritonserver")
    assert deployment["spec"]["replicas"] == 2
    assert "--load-model=*" in server["args"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and pod["runtimeClassName"] == "nvidia"
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert "initContainers" not in pod  # the repository is on the PVC
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "streamguard-models", "readOnly": True}
    mount = next(m for m in server["volumeMounts"] if m["name"] == "models")
    assert mount == {"name": "models", "mountPath": "/models", "readOnly": True, "subPath": "onnx-gpu"}
    # Images by digest: repository@sha256:...
    assert server["image"] == "registry.example.com/streamguard-triton@sha256:" + "2" * 64
    assert container(worker(docs))["image"] == "registry.example.com/streamguard@sha256:" + "1" * 64
    # A private network allowed to the fetcher is allowed in its egress too.
    policy = find(docs, "NetworkPolicy", "-worker")
    assert any(peer.get("ipBlock", {}).get("cidr") == "10.20.0.0/16" for rule in policy["spec"]["egress"]
               for peer in rule.get("to", []))
    assert json.loads(worker_env(docs)["STREAMGUARD_FETCH__ALLOW_NETWORKS"]) == ["10.20.0.0/16"]


def test_default_images_are_tagged_with_the_app_version(rendered: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    docs = manifests(rendered, "default")
    assert container(worker(docs))["image"] == f"registry.example.com/streamguard:{streamguard.__version__}"
    assert container(triton(docs))["image"] == f"registry.example.com/streamguard-triton:{streamguard.__version__}"


def egress_ports(policy: dict[str, Any]) -> list[set[Any]]:
    return [{p["port"] for p in rule.get("ports", [])} for rule in policy["spec"]["egress"]]


def test_network_policies(rendered: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    docs = manifests(rendered, "default")
    worker_labels = worker(docs)["spec"]["template"]["metadata"]["labels"]
    triton_labels = triton(docs)["spec"]["template"]["metadata"]["labels"]
    worker_policy = find(docs, "NetworkPolicy", "-worker")
    triton_policy = find(docs, "NetworkPolicy", "-triton")
    assert selects(worker_policy["spec"]["podSelector"]["matchLabels"], worker_labels)
    assert selects(triton_policy["spec"]["podSelector"]["matchLabels"], triton_labels)
    assert not selects(worker_policy["spec"]["podSelector"]["matchLabels"], triton_labels)
    for policy in (worker_policy, triton_policy):
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    # Worker egress: DNS, brokers, Redis, Triton's pods on gRPC, fetch networks; every rule names its peers.
    egress = worker_policy["spec"]["egress"]
    assert egress_ports(worker_policy) == [{53}, {9092}, {6379}, {8001}, {443, 80}]
    assert all(rule["to"] for rule in egress)
    triton_rule = egress[3]
    assert selects(triton_rule["to"][0]["podSelector"]["matchLabels"], triton_labels)
    fetch = egress[4]["to"][0]["ipBlock"]
    assert fetch["cidr"] == "0.0.0.0/0" and "10.0.0.0/8" in fetch["except"] and "169.254.0.0/16" in fetch["except"]
    # Triton ingress: the workers on gRPC, the scraper on metrics; no egress at all.
    ingress = triton_policy["spec"]["ingress"]
    assert [[p["port"] for p in rule["ports"]] for rule in ingress] == [["grpc"], ["metrics"]]
    assert selects(ingress[0]["from"][0]["podSelector"]["matchLabels"], worker_labels)
    assert ingress[1]["from"] == values()["networkPolicy"]["metricsScraper"]
    assert triton_policy["spec"]["egress"] == []
    # Without Redis or Triton there is no rule for them.
    oauth = find(manifests(rendered, "oauthbearer"), "NetworkPolicy", "-worker")
    assert {6379} not in egress_ports(oauth)
    inprocess = find(manifests(rendered, "inprocess"), "NetworkPolicy", "-worker")
    assert {8001} not in egress_ports(inprocess)


def test_keda_and_service_monitors(rendered: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    docs = manifests(rendered, "keda-servicemonitor")
    scaled = find(docs, "ScaledObject")
    partitions = values()["worker"]["inputTopicPartitions"]
    assert scaled["spec"]["fallback"] == {"failureThreshold": 3, "replicas": 6}
    assert scaled["spec"]["maxReplicaCount"] == min(24, partitions)
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker(docs)["metadata"]["name"]
    assert "replicas" not in worker(docs)["spec"]  # the HPA owns it
    trigger = scaled["spec"]["triggers"][0]
    assert "authenticationRef" not in trigger  # plaintext Kafka: nothing to authenticate
    assert all(isinstance(v, str) for v in trigger["metadata"].values())
    # One ServiceMonitor per component, each matching its own Service's labels and port.
    for component, service_suffix, port in (("worker", "-metrics", "metrics"), ("triton", "-triton-headless", "metrics")):
        service = find(docs, "Service", service_suffix)
        monitor = next(m for m in docs if m["kind"] == "ServiceMonitor"
                       and m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == component)
        assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        assert monitor["spec"]["endpoints"][0]["port"] == port in {p["name"] for p in service["spec"]["ports"]}
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert {p["name"]: p["port"] for p in find(docs, "Service", "-triton-headless")["spec"]["ports"]}["metrics"] == 8002


def secret_files(docs: list[dict[str, Any]], deployment: dict[str, Any], container_name: str | None = None
                 ) -> dict[str, tuple[str, str]]:
    """Path -> (Secret, key) of every file a container gets from a Secret volume."""
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    files = {}
    for mount in container(deployment, container_name).get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret:
            assert mount.get("readOnly") is True, mount
            for item in secret["items"]:
                files[f"{mount['mountPath']}/{item['path']}"] = (secret["secretName"], item["key"])
    return files


def test_tls_and_sasl_from_secrets(rendered: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    docs = manifests(rendered, "tls-sasl")
    env = worker_env(docs)
    files = secret_files(docs, worker(docs))
    expected_files = {
        "STREAMGUARD_KAFKA__SSL_CAFILE": ("streamguard-kafka-tls", "ca.crt"),
        "STREAMGUARD_KAFKA__SSL_CERTFILE": ("streamguard-kafka-tls", "tls.crt"),
        "STREAMGUARD_KAFKA__SSL_KEYFILE": ("streamguard-kafka-tls", "tls.key"),
        "STREAMGUARD_REDIS__SSL_CA_CERTS": ("streamguard-redis-tls", "ca.crt"),
        "STREAMGUARD_REDIS__SSL_CERTFILE": ("streamguard-redis-tls", "tls.crt"),
        "STREAMGUARD_REDIS__SSL_KEYFILE": ("streamguard-redis-tls", "tls.key"),
        "STREAMGUARD_TRITON__ROOT_CERTIFICATES": ("streamguard-triton-client-tls", "ca.crt"),
        "STREAMGUARD_TRITON__CERTIFICATE_CHAIN": ("streamguard-triton-client-tls", "tls.crt"),
        "STREAMGUARD_TRITON__PRIVATE_KEY": ("streamguard-triton-client-tls", "tls.key"),
    }
    for name, source in expected_files.items():
        assert files[env[name]] == source, name
    secret_env = {
        "STREAMGUARD_KAFKA__SASL_USERNAME": ("streamguard-kafka-sasl", "username"),
        "STREAMGUARD_KAFKA__SASL_PASSWORD": ("streamguard-kafka-sasl", "password"),
        "STREAMGUARD_KAFKA__SSL_PASSWORD": ("streamguard-kafka-tls", "key-password"),
        "STREAMGUARD_REDIS__URL": ("streamguard-redis", "url"),
    }
    for name, (secret, key) in secret_env.items():
        assert env[name] == {"secretKeyRef": {"name": secret, "key": key}}, name
    assert env["STREAMGUARD_KAFKA__SASL_MECHANISM"] == "SCRAM-SHA-512" and env["STREAMGUARD_TRITON__SSL"] == "true"
    assert env["STREAMGUARD_KAFKA__CLIENT_ID"] == "streamguard-worker"
    # No secret value is ever rendered: the only Secret is KEDA's modes.
    (keda_secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert keda_secret["stringData"] == {"tls": "enable", "sasl": "scram_sha512"}
    # KEDA authenticates like the worker: the same Secrets, keys and modes.
    auth = find(docs, "TriggerAuthentication")
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {
        "tls": (keda_secret["metadata"]["name"], "tls"),
        "ca": ("streamguard-kafka-tls", "ca.crt"),
        "cert": ("streamguard-kafka-tls", "tls.crt"),
        "key": ("streamguard-kafka-tls", "tls.key"),
        "keyPassword": ("streamguard-kafka-tls", "key-password"),
        "sasl": (keda_secret["metadata"]["name"], "sasl"),
        "username": ("streamguard-kafka-sasl", "username"),
        "password": ("streamguard-kafka-sasl", "password"),
    }
    trigger = find(docs, "ScaledObject")["spec"]["triggers"][0]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert trigger["metadata"]["bootstrapServers"] == env["STREAMGUARD_KAFKA__BOOTSTRAP_SERVERS"]
    # Triton serves gRPC over mutual TLS with the server Secret's files.
    server = container(triton(docs), "tritonserver")
    triton_files = secret_files(docs, triton(docs), "tritonserver")
    flags = dict(a.split("=", 1) for a in server["args"] if a.startswith("--grpc-"))
    assert flags["--grpc-use-ssl"] == "true" and flags["--grpc-use-ssl-mutual"] == "true"
    for flag, key in (("--grpc-server-cert", "tls.crt"), ("--grpc-server-key", "tls.key"), ("--grpc-root-cert", "ca.crt")):
        assert triton_files[flags[flag]] == ("streamguard-triton-server-tls", key), flag
    # Secret files are readable by the pod's group only.
    for deployment in (worker(docs), triton(docs)):
        for volume in deployment["spec"]["template"]["spec"]["volumes"]:
            if "secret" in volume:
                assert volume["secret"]["defaultMode"] == 0o440, volume["name"]


def test_oauthbearer_token_file(rendered: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    docs = manifests(rendered, "oauthbearer")
    env = worker_env(docs)
    files = secret_files(docs, worker(docs))
    assert env["STREAMGUARD_KAFKA__SASL_MECHANISM"] == "OAUTHBEARER"
    assert files[env["STREAMGUARD_KAFKA__SASL_OAUTH_TOKEN_FILE"]] == ("streamguard-kafka-oauth", "token")
    assert files[env["STREAMGUARD_KAFKA__SSL_CAFILE"]] == ("streamguard-kafka-ca", "ca.crt")
    assert not {"STREAMGUARD_KAFKA__SASL_USERNAME", "STREAMGUARD_KAFKA__SASL_PASSWORD",
                "STREAMGUARD_KAFKA__SSL_CERTFILE", "STREAMGUARD_REDIS__URL"} & set(env)
    refs = {r["parameter"]: (r["name"], r["key"]) for r in find(docs, "TriggerAuthentication")["spec"]["secretTargetRef"]}
    assert refs["username"] == ("streamguard-keda-oauth", "clientId")
    assert refs["password"] == ("streamguard-keda-oauth", "clientSecret")
    assert {"tls", "ca", "sasl", "oauthTokenEndpointUri", "scopes"} <= set(refs) and "cert" not in refs
    keda_secret = find(docs, "Secret")
    assert keda_secret["stringData"] == {"tls": "enable", "sasl": "oauthbearer", "scopes": "kafka",
                                         "oauthTokenEndpointUri": "https://idp.example.com/oauth2/token"}


def test_inprocess_backend(rendered: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    docs = manifests(rendered, "inprocess")
    assert not [d for d in docs if "triton" in d["metadata"]["name"]]
    env = worker_env(docs)
    assert env["STREAMGUARD_DETECTORS__BACKEND"] == "inprocess"
    assert not [name for name in env if name.startswith("STREAMGUARD_TRITON__")]
    main = container(worker(docs))
    assert main["image"] == "registry.example.com/streamguard-inprocess:0.1.0-cpu"
    assert main["resources"] == values()["inprocess"]["resources"]
    assert env["OMP_NUM_THREADS"] == str(values()["inprocess"]["ompNumThreads"])


@pytest.mark.parametrize("config", CONFIGS)
def test_the_worker_accepts_the_rendered_environment(rendered: dict[tuple[str, str], list[dict[str, Any]]],
                                                     config: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's own Settings load the environment the chart gives it: every name a real setting, every
    combination one it accepts. Secret values are stand-ins; files from Secrets exist under tmp_path."""
    docs = manifests(rendered, config)
    files = {path: tmp_path / path.removeprefix("/") for path in secret_files(docs, worker(docs))}
    for local in files.values():
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text("stand-in\n")
    for name in [n for n in os.environ if n.startswith("STREAMGUARD_")]:
        monkeypatch.delenv(name)
    env = worker_env(docs)
    for name, value in env.items():
        if isinstance(value, dict):  # from a Secret
            value = "redis://:pw@redis.example:6379/0" if name == "STREAMGUARD_REDIS__URL" else "stand-in"
            if name == "STREAMGUARD_REDIS__URL" and "STREAMGUARD_REDIS__SSL_CA_CERTS" in env:
                value = "rediss://:pw@redis.example:6380/0"
        elif value in files:
            value = str(files[value])
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.worker.health_port == int(env["STREAMGUARD_WORKER__HEALTH_PORT"])
    assert settings.detectors.backend == env["STREAMGUARD_DETECTORS__BACKEND"]
    assert settings.kafka.security_protocol == env["STREAMGUARD_KAFKA__SECURITY_PROTOCOL"]
    if settings.detectors.backend == "triton":
        assert settings.triton.ssl == ("STREAMGUARD_TRITON__ROOT_CERTIFICATES" in env)


# -- checkov and hadolint --------------------------------------------------------------------------------


def test_checkov_finds_nothing(tools: Tools, rendered: dict[tuple[str, str], list[dict[str, Any]]],
                               tmp_path: Path) -> None:
    """One checkov run over every configuration's manifests and every Dockerfile; deploy/checkov.yaml lists
    the checks skipped, each with its reason."""
    resources = 0
    for config in CONFIGS:
        docs = manifests(rendered, config)
        (tmp_path / f"{config}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        resources += len(docs)
    for name in DOCKERFILES:  # checkov's Dockerfile detection wants *Dockerfile names
        shutil.copy(DEPLOY / name, tmp_path / (name if name == "Dockerfile" else f"{name.split('.')[1]}.Dockerfile"))
    proc = subprocess.run(
        [str(tools.checkov), "--config-file", str(DEPLOY / "checkov.yaml"), "-d", str(tmp_path), "-o", "json"],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, BC_SKIP_MAPPING="TRUE", CHECKOV_RUN_SCA_PACKAGE_SCAN_V2="false"),
    )
    try:
        reports = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov exited {proc.returncode} without a report:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {r["check_type"]: r for r in reports}
    assert set(by_type) == {"kubernetes", "dockerfile"}, list(by_type)
    # checkov counts a Deployment's containers as resources of their own, so at least one per document.
    assert by_type["kubernetes"]["summary"]["resource_count"] >= resources
    assert by_type["dockerfile"]["summary"]["resource_count"] == len(DOCKERFILES)
    failed = [f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
              for r in reports for c in r["results"]["failed_checks"]]
    assert not failed, "\n".join(failed)
    assert all(r["summary"]["parsing_errors"] == 0 and r["summary"]["passed"] > 0 for r in reports)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_checkov_skips_have_reasons() -> None:
    config = yaml.safe_load((DEPLOY / "checkov.yaml").read_text())
    text = (DEPLOY / "checkov.yaml").read_text()
    for check in config["skip-check"]:
        reason = re.search(rf"#\s*{re.escape(check)}\s+\"[^\"]+\":\s*\S.*\n", text)
        assert reason, f"{check} is skipped without a reason in deploy/checkov.yaml"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(tools: Tools, name: str) -> None:
    proc = subprocess.run([str(tools.hadolint), "--config", str(DEPLOY / "hadolint.yaml"), "--format", "json",
                           str(DEPLOY / name)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout or "[]") == [], proc.stdout + proc.stderr


# -- the images ---------------------------------------------------------------------------------------------


def dockerfile(name: str) -> str:
    return (DEPLOY / name).read_text()


def dockerfile_arg(name: str, arg: str) -> str:
    """The default of build argument ARG in Dockerfile NAME."""
    found = re.findall(rf'^ARG {arg}=(?:"([^"]*)"|(\S*))\s*$', dockerfile(name), re.M)
    assert len(found) == 1, f"ARG {arg} in {name}: {found}"
    return found[0][0] or found[0][1]


def instructions(name: str) -> str:
    """The Dockerfile without its comments."""
    return "\n".join(line for line in dockerfile(name).splitlines() if not line.lstrip().startswith("#"))


def run_requirements_helper(*args: str) -> list[str]:
    proc = subprocess.run([sys.executable, str(DEPLOY / "docker" / "requirements_from_pyproject.py"),
                           "--pyproject", str(ROOT / "pyproject.toml"), *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_are_pinned_non_root_and_cache_friendly(name: str) -> None:
    text = dockerfile(name)
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert bases and all(re.fullmatch(r"[\w./-]+:\d[\w.-]*(@sha256:[0-9a-f]{64})?", b) for b in bases), bases
    assert len(set(bases)) == 1, "build and final stage on different bases"
    users = re.findall(r"^USER\s+(\d+):(\d+)\s*$", text, re.M)
    assert len(users) == 1 and users[0][0] != "0", users
    # Dependencies are installed from pyproject.toml before the code is copied.
    lines = text.splitlines()
    deps = next(i for i, line in enumerate(lines) if "requirements_from_pyproject.py" in line and "RUN" in line)
    code = next(i for i, line in enumerate(lines) if re.match(r"COPY streamguard\b", line))
    assert deps < code
    # Every file the image copies from the context is let through by its .dockerignore.
    ignore = (DEPLOY / f"{name}.dockerignore").read_text()
    for source in re.findall(r"^COPY\s+(?!--from)(.+?)\s+\S+\s*$", text, re.M):
        for path in source.split():
            assert f"!{path}" in ignore.splitlines(), f"{name} copies {path}, which its .dockerignore keeps out"
    # The chart runs each image as the user it was built with.
    uid = int(users[0][0])
    chart_uid = {"Dockerfile": values()["podSecurityContext"]["runAsUser"],
                 "Dockerfile.inprocess": values()["podSecurityContext"]["runAsUser"],
                 "Dockerfile.triton": values()["triton"]["server"]["podSecurityContext"]["runAsUser"]}[name]
    assert uid == chart_uid


def test_lean_worker_image_has_no_torch() -> None:
    text = instructions("Dockerfile")
    assert "requirements_from_pyproject.py triton-client " in text and "torch" not in text.lower()
    names = requirement_names(run_requirements_helper("triton-client"))
    assert "tritonclient" in names
    assert not names & {"torch", "transformers", "safetensors", "onnx", "scikit-learn", "matplotlib"}, names


def test_inprocess_and_triton_images_carry_the_backbone() -> None:
    for name in ("Dockerfile.inprocess", "Dockerfile.triton"):
        text = instructions(name)
        cache = re.findall(r"STREAMGUARD_BACKBONE__CACHE_DIR=(\S+)", text)
        assert cache and set(cache) == {"/opt/streamguard/backbone"}, (name, cache)
        fetch = text.index("streamguard backbone fetch")
        assert text.index("STREAMGUARD_BACKBONE__CACHE_DIR=") < fetch, name
        names = requirement_names(run_requirements_helper("inprocess"))
        assert {"torch", "transformers", "safetensors"} <= names
        assert run_requirements_helper("inprocess", "--only", "torch") == [
            r for r in run_requirements_helper("inprocess") if requirement_names([r]) == {"torch"}]
    triton_text = instructions("Dockerfile.triton")
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3\b", triton_text, re.M)
    # The repository is built where the chart's init container copies it from.
    out = re.search(r"streamguard triton build .* (\S+)\s*$", triton_text, re.M)
    assert out and out.group(1) == values()["triton"]["server"]["modelRepository"]["image"]["path"]


def test_the_triton_image_builds_what_the_chart_loads(tmp_path: Path) -> None:
    """Dockerfile.triton's `triton build` with its default arguments, run here in the python format with the
    shipped weights: the ensemble serves exactly the CLIP detectors a worker loads by default (Triton runs
    every head it holds on every request; the worker sends every CLIP detector it loads to it), the chart's
    default models are all in the repository, and so are the whole models triton.trunkModel "" loads."""
    from click.testing import CliRunner

    from streamguard.builtin.cliphead.detector import builtin_detectors
    from streamguard.cli import cli
    from streamguard.config import PluginSettings
    from streamguard.triton.build import default_models
    from streamguard.triton.shared_trunk import ENSEMBLE_MODEL, models_of

    command = re.search(r"^.*streamguard triton build (.*)$", instructions("Dockerfile.triton"), re.M)
    assert command and "--shared-trunk" in command.group(1).split(), command
    detectors = dockerfile_arg("Dockerfile.triton", "MODELS").split()
    loaded = builtin_detectors(PluginSettings())  # the defaults, not the tests' denials (conftest.py)
    assert detectors == [name for name in default_models() if name in loaded]
    whole_models = dockerfile_arg("Dockerfile.triton", "WHOLE_MODELS")
    assert whole_models in ("true", "false")
    args = ["triton", "build", "--shared-trunk", *(a for name in detectors for a in ("--model", name)),
            *(["--trunk-only"] if whole_models == "false" else []), str(tmp_path)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["shared_trunk"]["model"] == ENSEMBLE_MODEL == values()["triton"]["trunkModel"]
    assert list(summary["shared_trunk"]["detectors"]) == detectors
    ensemble = (tmp_path / ENSEMBLE_MODEL / "config.pbtxt").read_text()
    assert re.findall(r'model_name: "([^"]+)"', ensemble) == models_of(detectors)[:-1]  # the trunk, the heads
    assert set(values()["triton"]["server"]["models"]) <= set(summary["load"])
    assert list(summary["models"]) == (detectors if whole_models == "true" else [])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(summary["load"])


def test_triton_build_trunk_only(tmp_path: Path) -> None:
    """--trunk-only writes the CLIP detectors on the trunk alone, and only with --shared-trunk."""
    from click.testing import CliRunner

    from streamguard.cli import cli
    from streamguard.triton.shared_trunk import models_of

    result = CliRunner().invoke(cli, ["triton", "build", "--trunk-only", str(tmp_path / "none")])
    assert result.exit_code == 2 and "--trunk-only needs --shared-trunk" in result.output, result.output
    assert not (tmp_path / "none").exists()
    result = CliRunner().invoke(cli, ["triton", "build", "--shared-trunk", "--trunk-only", "--model", "univfd",
                                      str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["models"] == {} and summary["load"] == models_of(["univfd"])
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(models_of(["univfd"]))


def test_requirements_helper_refuses_an_unknown_extra() -> None:
    proc = subprocess.run([sys.executable, str(DEPLOY / "docker" / "requirements_from_pyproject.py"),
                           "--pyproject", str(ROOT / "pyproject.toml"), "no-such-extra"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "no extra 'no-such-extra'" in proc.stderr


def test_worker_processes_reach_the_command_and_divide_keda_max(tools: Tools) -> None:
    """`worker.processes` runs `streamguard worker --processes N`; KEDA's cap counts consumers, not pods."""
    import yaml

    one = list(yaml.safe_load_all(template(tools, "default").stdout))
    assert container(worker([d for d in one if d]))["args"] == ["worker"]
    docs = [d for d in yaml.safe_load_all(template(tools, "default", KUBE_VERSIONS[-1], "--set", "worker.processes=3",
                                                   "--set", "keda.enabled=true", "--set",
                                                   "keda.fallback.replicas=2").stdout) if d]
    assert container(worker(docs))["args"] == ["worker", "--processes", "3"]
    partitions = values()["worker"]["inputTopicPartitions"]
    assert find(docs, "ScaledObject")["spec"]["maxReplicaCount"] == min(values()["keda"]["maxReplicaCount"],
                                                                        partitions // 3)
