"""The lean worker: ``pip install 'streamguard[triton-client]'`` has no torch, and judges on Triton.

- In the main venv (fast): a subprocess whose import system refuses torch, transformers, safetensors, onnx,
  scikit-learn, scipy and matplotlib imports the CLI, the worker loop and the Triton backend, loads every
  built-in plugin and builds the worker's Scorer on Triton; every refused import is recorded, so one
  that a plugin loader or hook caller swallowed still fails the test.
- In a separate venv made with ``python -m venv`` and only ``.[triton-client]`` installed (cached under
  .cache/lean-venv/, keyed by pyproject.toml): torch cannot be imported; commands that need an extra fail
  with one line naming it; and ``python -m streamguard worker`` there judges events from the real broker
  on a real tritonserver (started from the main venv: the server side has torch), each verdict carrying
  the Triton-served univfd score, equal to what the full install's Triton path gives for the same bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from images import encode, noise, solid
from stack import Topics, WorkerProcess, image_events, produce, wait_for_outcomes, worker_env

from streamguard.builtin.mpft.plugin import DETECTOR as MPFT
from streamguard.builtin.pinclip.plugin import DETECTOR as PinClip
from streamguard.builtin.univfd.plugin import DETECTOR as UNIVFD
from streamguard.config import load_settings
from streamguard.detectors.spec import VIEW_SEPARATOR
from streamguard.devstack import Service, TritonService, start_triton
from streamguard.plugins import build_plugin_manager
from streamguard.scoring import ImageJob, Scorer
from streamguard.intake.contract import view_tag
from streamguard.triton.build import build_repository

ROOT = Path(__file__).resolve().parent.parent
LEAN_CACHE = ROOT / ".cache" / "lean-venv"
# The in-process and evaluation extras' modules: none may be imported on the worker's Triton path.
HEAVY = ("torch", "transformers", "safetensors", "onnx", "sklearn", "scipy", "matplotlib")
MODEL = "univfd"

BLOCKER = f"""
import sys
BLOCKED = {HEAVY!r}
refused = []

class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            refused.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}} (refused on the lean path)", name=name)
        return None

sys.meta_path.insert(0, _Refuse())
"""

STATIC_CHECK = BLOCKER + """
import json
import streamguard.backends.triton_grpc
import streamguard.backends.triton_trunk
import streamguard.cli
import streamguard.plugins
import streamguard.registry
import streamguard.scoring
import streamguard.worker.loop
from streamguard.builtin.mpft.plugin import DETECTOR as MPFT
from streamguard.builtin.pinclip.plugin import DETECTOR as PinClip
from streamguard.config import load_settings
from streamguard.plugins import build_plugin_manager
from streamguard.scoring import Scorer

from streamguard.detectors.spec import LoadContext

# mpft is opt-in: enabled, so that a fine-tuned CLIP detector registers on the lean path too.
settings = load_settings(detectors={"backend": "triton"}, plugins={"enable": ["builtin-mpft"]})
scorer = Scorer(settings, build_plugin_manager(settings.plugins))
result = {
    "detectors": {runner.spec.name: runner.backend_kind for runner in scorer.runners},
    "refused": list(refused),
    "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED),
}
# The same spec loaded in-process, where torch is missing: one line that says what to install.
try:
    next(spec for spec in scorer.specs if spec.name == "univfd").load(LoadContext())
except Exception as exc:
    result["inprocess_load"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(result))
"""


def _env(**extra: str) -> dict[str, str]:
    """This environment without streamguard settings or PYTHONPATH (the test plugin site imports torch)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMGUARD_") and k != "PYTHONPATH"}
    env.update(extra)
    return env


def test_the_triton_path_imports_no_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", STATIC_CHECK], capture_output=True, text=True, timeout=120,
                          env=_env(STREAMGUARD_LOG__LEVEL="warning"), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["refused"] == [] and result["loaded"] == [], result
    # Registration went through (a swallowed ImportError would have dropped a detector): every built-in
    # CLIP detector with weights that the check loads (univfd and pin-clip by default, mpft enabled), each set to
    # run on Triton.
    builtin = {"univfd": True, "pin-clip": PinClip.has_weights(PinClip.default_weights),
               "mpft": MPFT.has_weights(MPFT.default_weights)}
    assert {k: v for k, v in result["detectors"].items() if k in builtin} == {
        name: "triton" for name, shipped in builtin.items() if shipped}, result
    assert result["inprocess_load"] == ("MissingExtra: the in-process detector backend needs torch, which is not "
                                        "installed: pip install 'streamguard[inprocess]'")


def _venv_key() -> str:
    h = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    h.update(f"{sys.version}\0{ROOT}".encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def lean_python() -> Path:
    """A venv with only ``.[triton-client]`` (editable, so it runs this tree's code), made once per
    pyproject.toml: later sessions reuse it."""
    venv = LEAN_CACHE / _venv_key()
    python = venv / "bin" / "python"
    done = venv / ".installed"
    LEAN_CACHE.parent.mkdir(parents=True, exist_ok=True)
    with open(LEAN_CACHE.parent / "lean-venv.lock", "w") as lock:  # sessions running side by side build once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            shutil.rmtree(LEAN_CACHE, ignore_errors=True)  # a partial build, and older keys: one lean venv
            started = time.monotonic()
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
            find_links = ["--find-links", "/opt/wheels"] if Path("/opt/wheels").is_dir() else []
            proc = subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *find_links,
                 "-e", f"{ROOT}[triton-client]"],
                capture_output=True, text=True, timeout=900, env=_env(),
            )
            assert proc.returncode == 0, f"pip install .[triton-client] failed:\n{proc.stdout}\n{proc.stderr}"
            done.write_text(f"{time.monotonic() - started:.1f}s\n")
    return python


def _lean(python: Path, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=120, env=_env(),
                          cwd=ROOT, **kwargs)  # type: ignore[call-overload]


def test_the_lean_venv_has_no_torch(lean_python: Path) -> None:
    proc = _lean(lean_python, "-c", "import torch")
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr, proc.stderr
    code = ("import importlib.util, json, streamguard; "
            f"print(json.dumps([m for m in {HEAVY!r} if importlib.util.find_spec(m)]), streamguard.__file__)")
    installed, origin = _lean(lean_python, "-c", code).stdout.split()
    assert json.loads(installed) == []
    assert Path(origin).resolve().is_relative_to(ROOT)  # this tree's code, not a stale copy


@pytest.mark.parametrize(("command", "args", "extras"), [
    ("train univfd", ("--data", "x"), "inprocess,eval"),
    ("backbone info", (), "inprocess"),
    ("triton build", ("out",), "inprocess"),
    ("eval", (".", "--detector", "univfd"), "eval"),
])
def test_commands_that_need_an_extra_say_which(lean_python: Path, command: str, args: tuple[str, ...],
                                               extras: str) -> None:
    proc = _lean(lean_python, "-m", "streamguard", *command.split(), *args)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"Error: `streamguard {command}` needs {'scikit-learn' if extras == 'eval' else 'torch'}, which is not "
        f"installed: pip install 'streamguard[{extras}]'"
    ], proc.stderr


def test_the_lean_cli_lists_the_builtin_detectors(lean_python: Path) -> None:
    proc = _lean(lean_python, "-m", "streamguard", "plugins")
    assert proc.returncode == 0, proc.stderr
    assert MODEL in {d["name"] for d in json.loads(proc.stdout)["detectors"]}


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TritonService, str]]:
    root = tmp_path_factory.mktemp("lean-triton")
    result = build_repository(root / "models", device="cpu", models=[MODEL])
    service = start_triton(root / "work", result.repository, [MODEL], timeout_s=180)
    try:
        yield service, result.models[MODEL]
    finally:
        service.stop()


def test_the_lean_worker_judges_on_triton(lean_python: Path, kafka: Service, triton: tuple[TritonService, str],
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    service, version = triton
    triton_env = {
        # univfd alone: the Triton this test starts serves univfd only (pin-clip's head would add CPU time).
        "STREAMGUARD_PLUGINS__DENY": '["builtin-pinclip", "builtin-mpft"]',
        "STREAMGUARD_DETECTORS__BACKEND": "triton",
        "STREAMGUARD_TRITON__URL": service.grpc_address,
        # Room for a slow first inference on a busy CPU: this test is about the result, not the timeouts.
        "STREAMGUARD_TRITON__REQUEST_TIMEOUT_S": "60",
        "STREAMGUARD_TRITON__RETRY_BUDGET_S": "60",
        "STREAMGUARD_DETECTORS__TIMEOUT_S": "180",
    }
    images = [encode(noise((320, 240), seed=1), "JPEG"), encode(noise((200, 300), seed=2), "PNG"),
              encode(solid(90, (224, 224)), "PNG"), encode(noise((640, 480), seed=3), "JPEG", quality=70),
              encode(solid(200, (96, 64)), "WEBP")]
    topics = Topics(kafka.address).create()
    env = {k: v for k, v in worker_env(topics, None, **triton_env).items() if k != "PYTHONPATH"}
    worker = WorkerProcess(env, tmp_path, name="lean-worker", python=str(lean_python))
    try:
        sent = produce(topics, image_events(images, prefix="lean"))
        outcomes = wait_for_outcomes(topics, sent, timeout=180)
        loaded = worker.wait_for_event("detector.loaded", timeout=10)
    finally:
        worker.signal(signal.SIGTERM)
        code = worker.wait(60)
    assert code == 0, worker.log_path.read_text()[-3000:]
    assert loaded["detector"] == MODEL and loaded["backend"] == "triton"
    assert not outcomes.dead_letters, outcomes.dead_letters
    by_id = {v["event_id"]: v for v in outcomes.verdicts}
    assert len(by_id) == len(outcomes.verdicts) == len(images)

    # The same bytes through the full install's Triton path: the lean worker's preparation (numpy only)
    # sends the same pixels, so the scores agree (up to the server batching them differently).
    for name, value in triton_env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    with Scorer(settings, build_plugin_manager(settings.plugins)) as scorer:
        expected = scorer.score([ImageJob(key=f"x{i}", data=data) for i, data in enumerate(images)])
    # The served model's version, and after it the views the worker cut (the photo a screenshot shows).
    judged = f"{version}{VIEW_SEPARATOR}{view_tag(UNIVFD.default_view)}"
    for i, outcome in enumerate(expected):
        verdict = by_id[f"lean-{i}"]
        assert verdict["model_versions"] == {MODEL: judged}
        (score,) = verdict["scores"]
        assert score["detector"] == MODEL and score["version"] == judged
        assert score["error"] is None and score["logit"] is not None, score
        want = next(s for s in outcome.verdict.scores if s.detector == MODEL)  # type: ignore[union-attr]
        assert score["logit"] == pytest.approx(want.logit, abs=1e-4)
        assert score["probability"] == pytest.approx(want.probability, abs=1e-5)
