"""`streamguard rescore` against the real broker and Redis: a worker judges images under the default policy,
then the policy changes and the re-score must publish exactly the verdicts whose label changed, refresh the
dedupe cache, and carry on after a stop or a SIGKILL without skipping anything."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from images import encode, noise, solid
from stack import Topics, WorkerProcess, image_events, produce, wait_for_outcomes, worker_env
from streamguard.cli import cli
from streamguard.config import load_settings
from streamguard.dedupe import RedisDedupe, versions_key
from streamguard.devstack import Service, create_topics
from streamguard.plugins import build_plugin_manager
from streamguard.scoring import Scorer
from streamguard.streamio import TopicReader

# The re-score's policy: between these and the default (0.99 / 0.5) some labels move, most stay.
AI, REAL = 0.8, 0.3
NEW_POLICY = {"STREAMGUARD_POLICY__AI_THRESHOLD": str(AI), "STREAMGUARD_POLICY__REAL_THRESHOLD": str(REAL)}


@dataclass
class Judged:
    topics: Topics
    redis_url: str
    images: dict[str, bytes]  # event id -> bytes
    verdicts: dict[str, dict]  # event id -> the worker's verdict
    started_ms: int  # before the first event was sent

    def env(self, **extra: str) -> dict[str, str]:
        return worker_env(self.topics, self.redis_url, **{**NEW_POLICY, **extra})

    def expected_changes(self, ai: float = AI, real: float = REAL) -> dict[str, str]:
        """Event id -> its label under the new policy, for the events whose label changes."""
        out = {}
        for event_id, verdict in self.verdicts.items():
            p = verdict["probability"]
            label = "ai_generated" if p >= ai else "real" if p <= real else "uncertain"
            if label != verdict["label"]:
                out[event_id] = label
        return out


@pytest.fixture(scope="module")
def judged(kafka: Service, redis_service: Service, tmp_path_factory: pytest.TempPathFactory) -> Judged:
    topics = Topics(kafka.address).create()
    redis_url = f"redis://{redis_service.address}/0"
    grays = {f"g{level:03d}": encode(solid(level), "PNG") for level in range(0, 256, 6)}
    # A second copy of one content: the worker answers it from the cache; the re-score judges it once.
    images = {**grays, "copy": grays["g174"]}
    worker = WorkerProcess(worker_env(topics, redis_url), tmp_path_factory.mktemp("rescore-worker"))
    started_ms = int(time.time() * 1000)
    try:
        sent = produce(topics, [event for event_id, data in images.items()
                                for event in image_events([data], prefix=event_id)])
        outcomes = wait_for_outcomes(topics, sent)
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    verdicts = {v["event_id"].rsplit("-", 1)[0]: v for v in outcomes.verdicts}
    assert verdicts["copy"]["duplicate_of"] == "g174-0"
    judged = Judged(topics, redis_url, {f"{k}-0": v for k, v in images.items()},
                    {f"{k}-0": v for k, v in verdicts.items()}, started_ms)
    changes = judged.expected_changes()
    assert 3 <= len(changes) < len(verdicts) - 10, changes  # the policy change moves some labels, not all
    assert "copy-0" in changes  # and the copy's with them
    return judged


def _output_topic(judged: Judged, name: str) -> str:
    topic = f"{judged.topics.prefix}.{name}"
    create_topics(judged.topics.bootstrap, {topic: 2})
    return topic


def _published(judged: Judged, topic: str) -> list[tuple[dict, dict[str, bytes]]]:
    with TopicReader({"bootstrap_servers": judged.topics.bootstrap}, [topic], wait_s=10) as reader:
        return [(json.loads(r.value), dict(r.headers)) for r in reader.records(idle_s=1.0)]


def _invoke(judged: Judged, monkeypatch: pytest.MonkeyPatch, *args: str, **extra: str) -> tuple[int, dict, str]:
    """The command in this process (no second torch start-up); returns its exit code, its summary line and
    everything it printed."""
    for name, value in judged.env(**extra).items():
        if name.startswith("STREAMGUARD_"):
            monkeypatch.setenv(name, value)
    result = CliRunner().invoke(cli, ["rescore", "--no-progress", *args])
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return result.exit_code, summary, result.output if result.exit_code else result.stdout


def _new_versions_key() -> str:
    settings = load_settings()
    scorer = Scorer(settings, build_plugin_manager(settings.plugins))  # not started: no model is loaded
    return versions_key(scorer.model_versions, scorer.policy_version)


def test_rescore_of_a_topic_publishes_only_changed_verdicts_and_refreshes_the_cache(
        judged: Judged, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    out = _output_topic(judged, "rescored-topic")
    args = ["--topic", judged.topics.output, "--events-topic", judged.topics.input, "--output-topic", out,
            "--state-dir", str(tmp_path), "--chunk-size", "8"]

    code, first, log = _invoke(judged, monkeypatch, *args, "--max-records", "10")
    assert code == 0, log
    assert first["this_run"]["read"] == 10 and not first["done"]
    code, second, log = _invoke(judged, monkeypatch, *args)
    assert code == 0, log
    assert second["done"] and second["all_runs"]["read"] == len(judged.verdicts)
    assert second["all_runs"]["judged"] == len(judged.verdicts)

    expected = judged.expected_changes()
    published = _published(judged, out)
    # Stopped cleanly in between: every change exactly once, nothing unchanged.
    assert sorted(v["event_id"] for v, _ in published) == sorted(expected)
    for verdict, headers in published:
        old = judged.verdicts[verdict["event_id"]]
        assert verdict["label"] == expected[verdict["event_id"]]
        assert verdict["rescored_from"]["label"] == old["label"] == headers["sg-rescored-from"].decode()
        assert verdict["rescored_from"]["policy_version"] == old["policy_version"] != verdict["policy_version"]
        assert verdict["content_sha256"] == old["content_sha256"] and verdict["duplicate_of"] is None

    # The cache answers the next copy of each content with its new label, under the new policy's key.
    settings = load_settings()
    store, key = RedisDedupe(settings.dedupe, settings.redis), _new_versions_key()
    try:
        for event_id, old in judged.verdicts.items():
            cached = store.get(old["content_sha256"], key)
            assert cached is not None, event_id
            assert json.loads(cached.verdict_json)["label"] == expected.get(event_id, old["label"])
            assert "rescored_from" not in json.loads(cached.verdict_json) or \
                json.loads(cached.verdict_json)["rescored_from"] is None
    finally:
        store.close()

    code, third, log = _invoke(judged, monkeypatch, *args)
    assert code == 0 and third["done"] and third["this_run"] == {}, log
    # Other models or another policy under the same progress file: refused, not mixed in.
    code, _, log = _invoke(judged, monkeypatch, *args, STREAMGUARD_POLICY__AI_THRESHOLD="0.7")
    assert code == 1 and "changed since this re-score started" in log
    assert len(_published(judged, out)) == len(expected)


def test_offset_and_time_bounds_select_the_range(judged: Judged, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    with TopicReader({"bootstrap_servers": judged.topics.bootstrap}, [judged.topics.output]) as reader:
        per_partition = Counter(r.partition for r in reader.records(idle_s=1.0))
    base = ["--topic", judged.topics.output, "--events-topic", judged.topics.input, "--dry-run",
            "--state-dir", str(tmp_path)]

    def read(*args: str) -> int:
        code, summary, log = _invoke(judged, monkeypatch, *base, *args)
        assert code == 0 and summary["done"], log
        return summary["this_run"].get("read", 0)

    assert read("--from-offset", "1", "--to-offset", "0:3") == sum(
        max(0, min(n, 3 if p == 0 else n) - 1) for p, n in per_partition.items())
    assert read("--since", str(judged.started_ms)) == len(judged.verdicts)
    assert read("--until", str(judged.started_ms)) == 0


def _checkpointed(state: Path) -> int:
    """Records the progress file says are done (0 before it exists)."""
    if not state.exists():
        return 0
    saved = json.loads(state.read_text())
    return sum(next_ - saved["start_cursors"][name][0] for name, (next_, _) in saved["cursors"].items())


def test_rescore_killed_mid_range_carries_on_without_skipping(judged: Judged, tmp_path: Path) -> None:
    out = _output_topic(judged, "rescored-kill")
    state = tmp_path / "state.json"
    chunk = 4
    env = judged.env(STREAMGUARD_DETECTORS__OPTIONS='{"brightness": {"delay_s": 0.25}}')
    command = [sys.executable, "-m", "streamguard", "rescore", "--no-progress", "--topic", judged.topics.output,
               "--events-topic", judged.topics.input, "--output-topic", out, "--state", str(state),
               "--chunk-size", str(chunk)]
    log = tmp_path / "doomed.log"
    with open(log, "wb") as sink:  # a file, not a pipe: a full pipe would stall the process under test
        doomed = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while _checkpointed(state) < chunk:  # killed after its first chunk, with more to go
            assert doomed.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
    finally:
        doomed.kill()
        doomed.wait(10)
    killed_at = json.loads(state.read_text())
    assert not killed_at["done"], "the re-score finished before it was killed"

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["done"] and summary["this_run"]["read"] < len(judged.verdicts)  # it carried on
    assert summary["all_runs"]["read"] == len(judged.verdicts)  # checkpointed chunks count once

    expected = judged.expected_changes()
    ids = [v["event_id"] for v, _ in _published(judged, out)]
    assert set(ids) == set(expected)  # every change published at least once, nothing unchanged
    assert len(ids) - len(expected) <= chunk  # at most the chunk the kill interrupted, again


def test_rescore_of_files_compares_with_the_cached_verdicts(judged: Judged, monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    out = _output_topic(judged, "rescored-files")
    data = tmp_path / "data"
    data.mkdir()
    for event_id, image in judged.images.items():
        (data / f"{event_id}.png").write_bytes(image)
    (data / "never-judged.png").write_bytes(encode(noise((40, 32), seed=99), "PNG"))
    # Compared with the worker's own cache entries, and a policy of its own: another test's re-score may
    # have cached newer judgements under its policy.
    original = _new_versions_key()  # the environment still has the default policy here
    policy = {"STREAMGUARD_POLICY__AI_THRESHOLD": "0.75"}
    args = ["--data", str(data), "--output-topic", out, "--state-dir", str(tmp_path / "state"),
            "--previous-versions", original, "--chunk-size", "16"]

    code, _, log = _invoke(judged, monkeypatch, *args, "--dry-run", **policy)
    assert code == 0, log
    # Each content is answered for by the event first judged on it, which the cache names.
    expected = {e: label for e, label in judged.expected_changes(ai=0.75).items() if e != "copy-0"}
    changes = [row for row in map(json.loads, log.splitlines()[:-1])]
    assert {c["event_id"]: c["to"] for c in changes} == expected
    assert _published(judged, out) == []

    code, summary, log = _invoke(judged, monkeypatch, *args, **policy)
    assert code == 0 and summary["done"], log
    counts = summary["all_runs"]
    assert counts["not_judged"] == 1 and counts["changed"] == len(expected)
    published = _published(judged, out)
    # "copy-0.png" sorts first, in another chunk than the g174 it copies: judged twice, published once.
    assert sorted(v["event_id"] for v, _ in published) == sorted(expected)
    assert {v["event_id"]: v["label"] for v, _ in published} == expected
    assert all(v["rescored_from"]["label"] == judged.verdicts[v["event_id"]]["label"] for v, _ in published)


def test_rescore_of_datasets_reads_tar_archives_and_manifests(judged: Judged, monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    # The layouts `eval` reads: a tar of label folders, and a manifest naming files beside it. Their labels
    # are not what is compared: the cached verdicts are.
    ids = sorted(e for e in judged.images if e != "copy-0")
    in_tar, in_manifest = ids[::2], ids[1::2]
    archive = tmp_path / "judged.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i, event_id in enumerate(in_tar):
            info = tarfile.TarInfo(f"{'ai' if i % 2 else 'real'}/{event_id}.png")
            info.size = len(judged.images[event_id])
            tar.addfile(info, io.BytesIO(judged.images[event_id]))
    listed = tmp_path / "listed"
    (listed / "images").mkdir(parents=True)
    rows = ["path,label"]
    for event_id in in_manifest:
        (listed / "images" / f"{event_id}.png").write_bytes(judged.images[event_id])
        rows.append(f"images/{event_id}.png,real")
    rows.append("images/gone.png,ai")  # listed, not there
    (listed / "manifest.csv").write_text("\n".join(rows) + "\n")

    original = _new_versions_key()
    # A policy no other test caches under: the newest cached verdict of each content is the worker's.
    policy = {"STREAMGUARD_POLICY__AI_THRESHOLD": "0.7"}
    code, summary, log = _invoke(judged, monkeypatch, "--data", str(archive), "--data", str(listed), "--dry-run",
                                 "--previous-versions", original, "--state-dir", str(tmp_path / "state"),
                                 "--chunk-size", "16", **policy)
    assert code == 0 and summary["done"], log
    expected = {e: label for e, label in judged.expected_changes(ai=0.7).items() if e != "copy-0"}
    assert expected and set(expected) & set(in_tar) and set(expected) & set(in_manifest)
    changes = [json.loads(line) for line in log.splitlines()[:-1]]
    assert {c["event_id"]: c["to"] for c in changes} == expected
    counts = summary["this_run"]
    assert counts["read"] == len(ids) + 1 and counts["unreadable_file"] == 1 and counts["judged"] == len(ids)
