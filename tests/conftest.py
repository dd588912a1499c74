from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamguard.config import Settings, load_settings
from streamguard.devstack import Service, start_kafka, start_redis
from streamguard.plugins import build_plugin_manager
from stack import TEST_POLICY

# In the process environment too, not only per test: module- and session-scoped fixtures (a serving app, a
# worker) are built before a test's own environment is set.
os.environ.update(TEST_POLICY)

ROOT = Path(__file__).resolve().parent.parent
TEST_PLUGINS = [ROOT / "tests" / "plugins" / "streamguard-testdetector"]


@pytest.fixture(scope="session", autouse=True)
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Install the test-only plugin packages with pip into a private directory on sys.path.

    They are discovered through their real entry points, yet never land in the .venv that `make run` uses,
    so the product path never sees a test detector.
    """
    site = tmp_path_factory.mktemp("plugin-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(site), *map(str, TEST_PLUGINS)],
        check=True,
    )
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), old]))
    yield site
    sys.path.remove(str(site))
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


# The CLIP detectors cost ~0.7 s an image on this CPU: tests judge with the test detector unless they
# are about univfd itself (tests/test_univfd.py), which clear this.
WITHOUT_UNIVFD = '["builtin-univfd", "builtin-pinclip", "builtin-mpft"]'


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("STREAMGUARD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("STREAMGUARD_PLUGINS__DENY", WITHOUT_UNIVFD)
    for name, value in TEST_POLICY.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def settings() -> Settings:
    return load_settings()


@pytest.fixture
def pm(settings: Settings):  # type: ignore[no-untyped-def]
    return build_plugin_manager(settings.plugins)


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def kafka(services_dir: Path) -> Iterator[Service]:
    """A real Kafka-protocol broker (Tansu) on loopback, shared by the session; tests use their own topics."""
    service = start_kafka(services_dir)
    yield service
    service.stop()


@pytest.fixture(scope="session")
def redis_service(services_dir: Path) -> Iterator[Service]:
    service = start_redis(services_dir)
    yield service
    service.stop()
