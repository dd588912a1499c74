"""Worker benchmark: `streamguard worker --processes N` against raw kafka-python loops, same broker, same
messages, same run.

    .venv/bin/python bench/bench_worker.py [--messages 2000] [--partitions 4] [--processes 1,2]
        [--encoding binary|json] [--compression none|gzip|snappy|lz4|zstd] [--repeat 3] [--profile DIR]
        [--out bench/results/worker.json]

One Tansu broker (in memory, loopback) is started for the run and stopped at the end, also on error. M seeded,
distinct 64x64 noise PNGs (~12 KB each) are pre-produced as `ImageEvent`s to an input topic with P
partitions (produced, like the outcomes read back, with `streamguard.streamio`, the harness the stream tests
and `streamguard produce` use), then read by a fresh consumer group from the beginning for each of:

- raw: kafka-python in this process with its default settings (but short group timeouts, as every group
  here); poll, `send` a small JSON value per record to an output topic (acks=all, linger 5 ms, as the
  worker's producer), flush, check every acknowledgement, commit; no processing. What any Python worker on
  kafka-python starts from.
- raw + image work: the same loop doing, inline, the work every verdict needs with streamguard's own
  functions (parse the event, sha256, decode, prepare for a 32-px contract). The reference of the aim:
  a worker with a trivial detector should reach at least 0.9 of it (`ratio_vs_raw_decode`).
- worker, N processes (each N of --processes): the real `streamguard worker --processes N`, as deployed,
  in its own process(es): its default worker settings, the built-in fusion and policy plugins and one
  trivial detector (logit 0.0 per image, input contract 32 px, loaded through a real entry point), dedupe
  off (no Redis). N = 1 is one worker process; N > 1 is the supervisor and N children in one group.

Every run is timed from its consumer's first partition assignment (group join and, for the worker, the
start of Python excluded; the worker's comes from its `worker.partitions_assigned` log line) to the M-th
outcome: for raw, the last acknowledged flush; for the worker, the M-th distinct verdict or dead letter
read back from its output topics by this process (Tansu's end offsets are not exact, see
`_OutcomeWatcher`). CPU seconds per event are measured over the same interval (this process's CPU time for
raw; /proc of the worker's processes): a rate on shared cores moves with the neighbours' load, the CPU an
event costs much less. The worker's time per stage comes from its own `streamguard_stage_seconds`
histogram (one observation per stage per batch, summed over its processes), read from its /metrics;
publishing and batch assembly are outside every stage and show as "untimed".

A worker that stops producing outcomes for --stall seconds is reported as stalled (with its committed
offsets) and the script exits 1.

--repeat rounds (each: raw, raw + image work, then the worker with each N) run on the same broker and
messages; for each N the round with the median worker / (raw + image work) ratio is reported, and every
round's rates are listed. Prints events/s, the ratios and the time per stage; writes it all as JSON.
--profile DIR: the last round's worker processes write cProfile stats of their processing and poll
threads to DIR (the profiler slows them: those rates are not comparable). For a sampling profile of every
thread, attach py-spy to the worker while it runs (`py-spy record --idle -t --pid PID`, the PID of
`streamguard worker --processes 1`; its --subprocesses did not follow the worker here). --env NAME=VALUE
passes settings to the worker (e.g. STREAMGUARD_WORKER__BATCH_SIZE=64) for experiments. --baseline-env
NAME=VALUE runs, in every round, one more worker (the first N) with those settings on top: a change and
what it replaced, measured seconds apart against the same raw loop (this machine's rates move by a third
between rounds, a ratio between neighbours much less).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaConsumer, KafkaProducer
from kafka import __version__ as kafka_version
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from PIL import Image

from streamguard.config import IntakeSettings
from streamguard.detectors.spec import DetectorInput, DetectorSpec, LoadContext
from streamguard.devstack import Service, create_topics, free_port, start_kafka
from streamguard.hookspecs import hookimpl
from streamguard.intake import InputContract, decode_image, prepare
from streamguard.schemas import ImageEvent
from streamguard.streamio import Message, TopicReader, committed_offsets, event_message, partition_ends, produce
from streamguard.wire import Encoding, decode_event

AIM_VS_RAW_DECODE = 0.9  # the target: worker / (raw + image work)
AIM_VS_RAW = 0.8  # an earlier target, against raw kafka-python doing no work at all
IMAGE_SIDE = 64
END_POLL_S = 0.02
CODECS = ("gzip", "snappy", "lz4", "zstd")
METADATA_WAIT_S = 30.0  # for topics created just before they are read
# Short group timeouts (as the stream tests use) for every group here: Tansu holds a first JoinGroup for
# about half the session timeout, 23 s with kafka-python's default of 45 s. No effect on the steady state.
GROUP_TIMEOUTS_MS = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}
EPOCH = datetime(2024, 1, 1, tzinfo=UTC)  # fixed created_at: the message bytes do not depend on the clock
PLUGIN_NAME = "bench-trivial"
PROFILE_ENV = "SG_BENCH_PROFILE_DIR"
BENCH_DIR = Path(__file__).resolve().parent


# -- messages -------------------------------------------------------------------------------------------


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _messages(n: int, encoding: Encoding, seed: int) -> list[Message]:
    out = []
    for i in range(n):
        event = ImageEvent(event_id=f"bench-{seed}-{i:06d}", image=_png(seed * 1_000_003 + i), source="bench",
                           created_at=EPOCH + timedelta(seconds=i))
        out.append(event_message(event, encoding))
    return out


def _produce(bootstrap: str, topic: str, messages: Sequence[Message], compression: str | None) -> dict[int, int]:
    """Send every message; returns each partition's end offset (from the acknowledgements)."""
    config = {"bootstrap_servers": bootstrap, "acks": "all", "linger_ms": 5, "max_request_size": 30 * 1024 * 1024,
              "compression_type": compression}
    return partition_ends(produce(config, topic, messages))


# -- baseline: raw kafka-python -------------------------------------------------------------------------


class _FirstAssignment(ConsumerRebalanceListener):
    def __init__(self) -> None:
        self.at: float | None = None
        self.cpu_at: float | None = None

    def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    def on_partitions_assigned(self, assigned: Any) -> None:
        if self.at is None and assigned:
            self.at = time.perf_counter()
            self.cpu_at = time.process_time()


def _image_work() -> Callable[[Any], dict[str, Any]]:
    """What a record costs before any detector runs, with streamguard's own functions and none of its
    plumbing: parse the event, sha256 the bytes, decode, prepare for the 32-px contract."""
    limits = IntakeSettings()
    contract = InputContract(size=32)

    def work(record: Any) -> dict[str, Any]:
        event = decode_event(record.value, [(k, v or b"") for k, v in (record.headers or ())])
        data = event.image or b""
        prepare(decode_image(data, limits, min_side=contract.size), contract)
        return {"event_id": event.event_id, "content_sha256": hashlib.sha256(data).hexdigest()}

    return work


def run_raw(bootstrap: str, topic: str, out_topic: str, group: str, m: int, timeout_s: float,
            work: Callable[[Any], dict[str, Any]] | None = None, compression: str | None = None) -> dict[str, Any]:
    listener = _FirstAssignment()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                             auto_offset_reset="earliest", **GROUP_TIMEOUTS_MS)
    # Same durability and codec as the worker's producer (see worker/publish.py): acks from all replicas.
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, compression_type=compression)
    try:
        consumer.subscribe([topic], listener=listener)
        started = time.perf_counter()
        first_record: float | None = None
        done = polls = commits = 0
        deadline = started + timeout_s
        while done < m:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"raw loop: {done} of {m} records in {timeout_s:g}s")
            batch = consumer.poll(timeout_ms=100)
            polls += 1
            futures = []
            for records in batch.values():
                for record in records:
                    fields = work(record) if work is not None else {}
                    value = json.dumps({"key": record.key.decode() if record.key else None,
                                        "partition": record.partition, "offset": record.offset,
                                        **fields}).encode()
                    futures.append(producer.send(out_topic, key=record.key, value=value))
            if not futures:
                continue
            if first_record is None:
                first_record = time.perf_counter()
            producer.flush()
            for future in futures:
                future.get(timeout=30)  # raises if the broker refused it
            consumer.commit()
            commits += 1
            done += len(futures)
        finished = time.perf_counter()
        cpu = time.process_time() - (listener.cpu_at if listener.cpu_at is not None else 0.0)
    finally:
        producer.close()
        consumer.close(autocommit=False)
    assigned = listener.at if listener.at is not None else started
    seconds = finished - assigned
    return {
        "events": done,
        "seconds": round(seconds, 4),
        "events_per_s": round(done / seconds, 2),
        "cpu_ms_per_event": round(1000.0 * cpu / done, 4),
        "startup_s": round(assigned - started, 4),
        "first_record_after_assignment_s": round((first_record or assigned) - assigned, 4),
        "polls": polls,
        "commits": commits,
    }


# -- the trivial detector, loaded by the worker through an entry point -----------------------------------


class _ZeroBackend:
    """A detector that costs nothing: logit 0.0 for every image."""

    def predict(self, batch: Sequence[DetectorInput]) -> list[float]:
        return [0.0] * len(batch)

    def close(self) -> None:
        pass


class TrivialDetectorPlugin:
    @hookimpl
    def register_detectors(self, register: Callable[[DetectorSpec], None]) -> None:
        register(DetectorSpec(name="bench-zero", version="1", load=self._load, contract=InputContract(size=32),
                              description="benchmark detector: logit 0.0 for every image"))

    @staticmethod
    def _load(ctx: LoadContext) -> _ZeroBackend:
        return _ZeroBackend()


PLUGIN = TrivialDetectorPlugin()  # the entry point's object: `bench-trivial = bench_worker:PLUGIN`


def _plugin_path(workdir: Path) -> str:
    """A directory that makes `bench_worker:PLUGIN` a `streamguard.plugins` entry point, for PYTHONPATH."""
    dist = workdir / "plugin" / "streamguard_bench_trivial-1.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: streamguard-bench-trivial\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[streamguard.plugins]\n{PLUGIN_NAME} = bench_worker:PLUGIN\n")
    return os.pathsep.join([str(workdir / "plugin"), str(BENCH_DIR)])


def _profile_in_worker(out_dir: Path) -> None:
    """In a worker process (the plugin module imported there with PROFILE_ENV set): cProfile its processing
    thread and its poll loop, each to its own file (cProfile is per thread), written when they return."""
    import cProfile
    import functools

    from streamguard.worker.loop import Worker

    out_dir.mkdir(parents=True, exist_ok=True)

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def profiled(*args: Any, **kwargs: Any) -> Any:
            prof = cProfile.Profile()
            try:
                return prof.runcall(fn, *args, **kwargs)
            finally:
                prof.dump_stats(out_dir / f"{os.getpid()}-{name}.pstats")
        return profiled

    Worker._process_forever = wrap("processing", Worker._process_forever)  # type: ignore[method-assign]
    Worker._poll_until_stopped = wrap("poll", Worker._poll_until_stopped)  # type: ignore[method-assign]


if __name__ != "__main__" and os.environ.get(PROFILE_ENV):
    _profile_in_worker(Path(os.environ[PROFILE_ENV]))


# -- the worker, as deployed ----------------------------------------------------------------------------


class _OutcomeWatcher:
    """Counts the distinct records on the worker's output and dead-letter topics by reading them.

    Reads rather than asks for end offsets: Tansu's ListOffsets answers below the true end of a partition
    whose last batch holds several records (seen: 485 for a partition with offsets 0..489), while the
    verdicts, published with linger, come in such batches. Distinct: a record redelivered by a rebalance
    is judged twice (at-least-once) but counts once."""

    def __init__(self, bootstrap: str, topics: Sequence[str]) -> None:
        self._reader = TopicReader({"bootstrap_servers": bootstrap}, topics, wait_s=METADATA_WAIT_S,
                                   fetch_max_wait_ms=20)
        self.counts: dict[str, int] = dict.fromkeys(topics, 0)
        self._seen: set[Any] = set()
        self.duplicates = 0

    def poll(self, timeout_ms: int) -> int:
        for record in self._reader.poll(timeout_ms=timeout_ms):
            key = (record.topic, record.key) if record.key is not None else (record.topic, record.partition,
                                                                             record.offset)
            if key in self._seen:
                self.duplicates += 1
                continue
            self._seen.add(key)
            self.counts[record.topic] += 1
        return sum(self.counts.values())

    def close(self) -> None:
        self._reader.close()


class _PodLog:
    """The worker's JSON log lines, read as they are written."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._partial = b""

    def new(self) -> list[dict[str, Any]]:
        data = self._partial + self._file.read()
        lines = data.split(b"\n")
        self._partial = lines.pop()
        out = []
        for line in lines:
            if line.startswith(b"{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def close(self) -> None:
        self._file.close()


def _cpu_s(pids: Sequence[int]) -> float | None:
    """User + system CPU seconds of these processes so far (Linux /proc), None elsewhere."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15)
    return total


def _log_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def _http_get(port: int, path: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.read().decode()
    except (OSError, urllib.error.URLError):
        return None


def _pod_env(bootstrap: str, topic: str, out_topic: str, dlq: str, group: str, health_port: int,
             batch_size: int | None, compression: str | None, plugin_path: str,
             profile: Path | None, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMGUARD_") and k != PROFILE_ENV}
    env |= {
        "STREAMGUARD_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "STREAMGUARD_WORKER__INPUT_TOPIC": topic,
        "STREAMGUARD_WORKER__OUTPUT_TOPIC": out_topic,
        "STREAMGUARD_WORKER__DEAD_LETTER_TOPIC": dlq,
        "STREAMGUARD_WORKER__GROUP_ID": group,
        "STREAMGUARD_WORKER__HEALTH_HOST": "127.0.0.1",
        "STREAMGUARD_WORKER__HEALTH_PORT": str(health_port),
        "STREAMGUARD_WORKER__SESSION_TIMEOUT_MS": str(GROUP_TIMEOUTS_MS["session_timeout_ms"]),
        "STREAMGUARD_WORKER__HEARTBEAT_INTERVAL_MS": str(GROUP_TIMEOUTS_MS["heartbeat_interval_ms"]),
        "STREAMGUARD_DEDUPE__ENABLED": "false",
        "STREAMGUARD_PLUGINS__ALLOW": json.dumps(["builtin-fusion", "builtin-policy", PLUGIN_NAME]),
        "STREAMGUARD_LOG__FORMAT": "json",
        "PYTHONPATH": os.pathsep.join(filter(None, [plugin_path, os.environ.get("PYTHONPATH")])),
    }
    if batch_size is not None:
        env["STREAMGUARD_WORKER__BATCH_SIZE"] = str(batch_size)
    if compression is not None:
        env["STREAMGUARD_KAFKA__COMPRESSION_TYPE"] = compression
    if profile is not None:
        env[PROFILE_ENV] = str(profile)
    return env | extra


def run_pod(bootstrap: str, topic: str, out_topic: str, dlq: str, group: str, processes: int, m: int,
            input_ends: dict[int, int], args: argparse.Namespace, workdir: Path, plugin_path: str,
            profile: Path | None = None, extra_env: Sequence[str] = ()) -> dict[str, Any]:
    """`streamguard worker --processes N` until its M-th outcome, then SIGTERM. ``extra_env``: NAME=VALUE
    settings over --env's (the baseline's)."""
    health_port = free_port()
    env = _pod_env(bootstrap, topic, out_topic, dlq, group, health_port, args.batch_size, args.compression,
                   plugin_path, profile, dict(item.split("=", 1) for item in [*args.env, *extra_env]))
    log_path = workdir / f"worker-{processes}-{group}.log"
    watcher = _OutcomeWatcher(bootstrap, [out_topic, dlq])
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "streamguard", "worker", "--processes", str(processes)],
                                env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    pod_log = _PodLog(log_path)
    pids = [proc.pid]  # N > 1: the supervisor and its children (from its log)
    assignments: list[float] = []
    cpu_at_assignment: float | None = None
    stalled = False
    seen = 0
    started = time.time()
    first_outcome: float | None = None
    progress_at = started
    metrics_text = None
    reader_cpu_at_assignment: float | None = None
    try:
        deadline = started + args.timeout
        while seen < m:
            total = watcher.poll(timeout_ms=int(END_POLL_S * 1000))
            now = time.time()
            for event in pod_log.new():
                name = event.get("event")
                if name == "supervisor.child_started":
                    pids.append(int(event["pid"]))
                elif name == "worker.partitions_assigned" and event.get("partitions"):
                    assignments.append(_log_time(event))
                    if cpu_at_assignment is None:
                        cpu_at_assignment = _cpu_s(pids)
                        reader_cpu_at_assignment = time.process_time()
            if total > seen:
                seen, progress_at = total, now
                if first_outcome is None:
                    first_outcome = now
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited early ({proc.returncode}); see {log_path}")
            if first_outcome is not None and now - progress_at > args.stall:
                stalled = True  # started, then no new outcome for the stall time: it will not finish
                break
            if now > deadline:
                raise TimeoutError(f"worker: {seen} of {m} outcomes in {args.timeout:g}s; see {log_path}")
        finished = progress_at
        cpu_at_done = _cpu_s(pids)
        reader_cpu = time.process_time() - (reader_cpu_at_assignment or 0.0)
        metrics_text = _http_get(health_port, "/metrics")
    finally:
        watcher.close()
        proc.send_signal(signal.SIGTERM)
        try:
            exit_code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            exit_code = proc.wait()
        pod_log.close()
    assigned = assignments[0] if assignments else started
    seconds = finished - assigned
    after_first = finished - (first_outcome or assigned)
    cpu = (cpu_at_done - cpu_at_assignment) if cpu_at_done is not None and cpu_at_assignment is not None else None
    result: dict[str, Any] = {
        "processes": processes,
        "events": seen,
        "verdicts": watcher.counts[out_topic],
        "dead_letters": watcher.counts[dlq],
        "redelivered_duplicates": watcher.duplicates,
        "stalled": stalled,
        "seconds": round(seconds, 4),
        "events_per_s": round(seen / seconds, 2),
        "cpu_ms_per_event": round(1000.0 * cpu / seen, 4) if cpu is not None and seen else None,
        "cores_busy": round(cpu / seconds, 3) if cpu is not None and seconds > 0 else None,
        # This process reading the outcomes back meanwhile, on the same cores (raw pays no such reader).
        "reader_cores_busy": round(reader_cpu / seconds, 3) if seconds > 0 else None,
        "startup_s": round(assigned - started, 4),
        "first_verdict_after_assignment_s": round((first_outcome or assigned) - assigned, 4),
        # The first verdict's own record is not in this interval, hence - 1.
        "events_per_s_from_first_verdict": round((seen - 1) / after_first, 2) if after_first > 0 else None,
        # More than N: the group rebalanced during the run (a child joining late), which the rate includes.
        "assignments": len(assignments),
        "last_assignment_after_first_s": round(assignments[-1] - assigned, 4) if assignments else None,
        "exit_code": exit_code,
        **_stage_metrics(metrics_text, seen, seconds, processes),
    }
    if stalled:
        committed = committed_offsets({"bootstrap_servers": bootstrap}, group, topic, wait_s=METADATA_WAIT_S)
        result["stall"] = {
            "no_new_outcome_for_s": args.stall,
            "committed_vs_end": {str(p): [committed.get(p), end] for p, end in sorted(input_ends.items())},
        }
    return result


def _stage_metrics(text: str | None, m: int, wall_s: float, processes: int) -> dict[str, Any]:
    """Time per stage from the worker's /metrics, summed over its processes."""
    if text is None:
        return {"stages": {}, "metrics": "unavailable"}
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    labels: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "streamguard_stage_seconds":
            for sample in family.samples:
                stage = sample.labels["stage"]
                if sample.name.endswith("_sum"):
                    sums[stage] = sums.get(stage, 0.0) + sample.value
                elif sample.name.endswith("_count"):
                    counts[stage] = counts.get(stage, 0.0) + sample.value
        elif family.name == "streamguard_verdicts":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    label = sample.labels["label"]
                    labels[label] = labels.get(label, 0.0) + sample.value
    stages = {}
    batches = 0.0
    for stage, total in sums.items():
        count = counts.get(stage, 0.0)
        batches = max(batches, count)
        stages[stage] = {
            "batches": int(count),
            "total_s": round(total, 4),
            "ms_per_batch": round(1000.0 * total / count, 3) if count else 0.0,
            "ms_per_record": round(1000.0 * total / m, 4) if m else None,
            # Of the processing threads' time: wall time times the number of processes.
            "fraction_of_wall": round(total / (wall_s * processes), 4),
        }
    timed = sum(s["total_s"] for s in stages.values())
    return {
        "batches": int(batches),
        "records_per_batch": round(m / batches, 2) if batches else None,
        "stages": stages,
        "stages_total_s": round(timed, 4),
        # The processing threads outside the timed stages: publishing (serialise + send), batch assembly,
        # and idle time.
        "untimed_fraction_of_wall": round(1.0 - timed / (wall_s * processes), 4),
        "verdict_labels": labels,
    }


# -- main -----------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/worker.json"))
    parser.add_argument("--messages", type=int, default=2000, help="M: events produced and consumed")
    parser.add_argument("--partitions", type=int, default=4, help="P: partitions of the input topic")
    parser.add_argument("--processes", default="1,2",
                        help="comma-separated N: the worker is measured with --processes N for each")
    parser.add_argument("--encoding", choices=["binary", "json"], default="binary", help="ImageEvent wire format")
    parser.add_argument("--compression", choices=["none", *CODECS], default="none",
                        help="codec of every producer here: the input's, raw's and the worker's (kafka.compression_type)")
    parser.add_argument("--batch-size", type=int, default=None, help="worker.batch_size (default: the setting's)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment of the worker (e.g. STREAMGUARD_WORKER__MAX_IN_FLIGHT=512); repeatable")
    parser.add_argument("--baseline-env", action="append", default=[], metavar="NAME=VALUE",
                        help="also run, in every round, a baseline worker (the first N) with these settings over "
                             "--env's (e.g. an earlier default), reported beside the worker; repeatable")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds allowed per measured run")
    parser.add_argument("--stall", type=float, default=10.0,
                        help="seconds without a new worker outcome after which the worker counts as stalled")
    parser.add_argument("--profile", type=Path, default=None,
                        help="write cProfile stats of the worker processes' processing and poll threads (last "
                             "round) to this folder; the profiler slows them, so their rates are not comparable")
    args = parser.parse_args()
    for name in [n for n in os.environ if n.startswith("STREAMGUARD_")]:
        del os.environ[name]  # the benchmark's settings are its own, whatever the shell exports
    args.processes = [int(n) for n in str(args.processes).split(",") if n.strip()]

    messages = _messages(args.messages, args.encoding, args.seed)
    args.compression = None if args.compression == "none" else args.compression
    value_bytes = [len(value) for _, value, _ in messages]
    with tempfile.TemporaryDirectory(prefix="sg-bench-worker-") as tmp:
        workdir = Path(tmp)
        broker: Service | None = None
        try:
            broker = start_kafka(workdir)
            result = _measure(broker.address, messages, args, workdir)
        except BaseException:
            for path in sorted(workdir.glob("*.log")):
                print(f"--- {path.name} (tail)", file=sys.stderr)
                print(path.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            if broker is not None:
                broker.stop()

    summary = []
    for n, chosen in result["workers"].items():
        worker = chosen["worker"]
        summary.append({
            "processes": n,
            "worker_events_per_s": worker["events_per_s"],
            "raw_decode_events_per_s": chosen["raw_decode"]["events_per_s"],
            "raw_events_per_s": chosen["raw"]["events_per_s"],
            "ratio_vs_raw_decode": chosen["ratio_vs_raw_decode"],
            "ratio_vs_raw": chosen["ratio_vs_raw"],
            "worker_cpu_ms_per_event": worker["cpu_ms_per_event"],
            "raw_decode_cpu_ms_per_event": chosen["raw_decode"]["cpu_ms_per_event"],
            "meets_aim": chosen["ratio_vs_raw_decode"] >= AIM_VS_RAW_DECODE and not worker["stalled"],
            "stalled": worker["stalled"],
        })
    output = {
        "benchmark": "worker_vs_raw_kafka_python",
        "messages": args.messages,
        "partitions": args.partitions,
        "processes": args.processes,
        "worker_env": args.env,
        "encoding": args.encoding,
        "compression": args.compression,
        "image": f"{IMAGE_SIDE}x{IMAGE_SIDE} noise PNG",
        "record_value_bytes_mean": round(statistics.fmean(value_bytes), 1),
        "seed": args.seed,
        "repeat": args.repeat,
        "timing": ("from the consumer's first partition assignment (group join excluded) to the M-th output "
                   "record acknowledged (raw: last flush) or read back from the output topics (worker)"),
        "kafka_python": kafka_version,
        "aim_ratio_vs_raw_decode": AIM_VS_RAW_DECODE,
        "aim_ratio_vs_raw": AIM_VS_RAW,
        "summary": summary,
        "workers": {str(n): chosen for n, chosen in result["workers"].items()},
        "worker_settings": result["settings"],
        "baseline": result["baseline"],
        "rounds": result["rounds"],
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output, indent=2) + "\n")
    _print(output)
    print(f"-> {args.out}")
    runs = [run for r in result["rounds"] for run in [*r["workers"].values(), r.get("baseline") or {}]]
    return 1 if any(run.get("stalled") for run in runs) else 0


def _measure(bootstrap: str, messages: list[Message], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    topic = f"{prefix}.images"
    topics = {topic: args.partitions}
    for i in range(args.repeat):  # fresh output topics per round and run, so a run counts only its own outcomes
        topics |= {f"{prefix}.raw-out-{i}": args.partitions, f"{prefix}.raw-decode-out-{i}": args.partitions}
        for n in args.processes:
            topics |= {f"{prefix}.verdicts-{i}-{n}": args.partitions, f"{prefix}.dlq-{i}-{n}": 1}
        topics |= {f"{prefix}.verdicts-{i}-baseline": args.partitions, f"{prefix}.dlq-{i}-baseline": 1}
    create_topics(bootstrap, topics)
    t0 = time.perf_counter()
    ends = _produce(bootstrap, topic, messages, args.compression)
    print(f"produced {len(messages)} {args.encoding} events to {topic} ({args.partitions} partitions) "
          f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    plugin_path = _plugin_path(workdir)
    rounds = []
    for i in range(args.repeat):
        raw = run_raw(bootstrap, topic, f"{prefix}.raw-out-{i}", f"{prefix}.raw-{i}", len(messages), args.timeout,
                      compression=args.compression)
        print(f"round {i + 1}: raw              {raw['events_per_s']:9.1f} events/s", file=sys.stderr)
        raw_decode = run_raw(bootstrap, topic, f"{prefix}.raw-decode-out-{i}", f"{prefix}.raw-decode-{i}",
                             len(messages), args.timeout, work=_image_work(), compression=args.compression)
        print(f"round {i + 1}: raw + image work {raw_decode['events_per_s']:9.1f} events/s", file=sys.stderr)
        def run_baseline(i: int = i) -> dict[str, Any]:
            return run_pod(bootstrap, topic, f"{prefix}.verdicts-{i}-baseline", f"{prefix}.dlq-{i}-baseline",
                           f"{prefix}.baseline-{i}", args.processes[0], len(messages), ends, args, workdir,
                           plugin_path, extra_env=args.baseline_env)

        # The baseline goes first in every other round, so neither side always runs on the broker the
        # other has just worked.
        baseline = run_baseline() if args.baseline_env and i % 2 == 1 else None
        workers = {}
        for n in args.processes:
            profile = args.profile if (args.profile is not None and i == args.repeat - 1) else None
            worker = run_pod(bootstrap, topic, f"{prefix}.verdicts-{i}-{n}", f"{prefix}.dlq-{i}-{n}",
                             f"{prefix}.worker-{i}-{n}", n, len(messages), ends, args, workdir, plugin_path,
                             profile)
            state = f"STALLED after {worker['events']} of {len(messages)}" if worker["stalled"] else "done"
            print(f"round {i + 1}: worker, {n} proc.  {worker['events_per_s']:9.1f} events/s "
                  f"({worker['events_per_s'] / raw_decode['events_per_s']:.3f} of raw + image work; {state})",
                  file=sys.stderr)
            workers[n] = worker
        if args.baseline_env:
            baseline = baseline or run_baseline()
            first = "first" if i % 2 == 1 else "after the worker"
            print(f"round {i + 1}: baseline, {args.processes[0]} proc. {baseline['events_per_s']:9.1f} events/s "
                  f"({baseline['events_per_s'] / raw_decode['events_per_s']:.3f} of raw + image work; worker / "
                  f"baseline {workers[args.processes[0]]['events_per_s'] / baseline['events_per_s']:.3f}; "
                  f"run {first})", file=sys.stderr)
        rounds.append({"raw": raw, "raw_decode": raw_decode, "workers": workers, "baseline": baseline})
    chosen = {}
    for n in args.processes:
        # For each N, the round with the median worker / (raw + image work) ratio stands for the run.
        ordered = sorted(rounds, key=lambda r: r["workers"][n]["events_per_s"] / r["raw_decode"]["events_per_s"])
        r = ordered[(len(ordered) - 1) // 2]
        worker = r["workers"][n]
        chosen[n] = {
            "ratio_vs_raw_decode": round(worker["events_per_s"] / r["raw_decode"]["events_per_s"], 3),
            "ratio_vs_raw": round(worker["events_per_s"] / r["raw"]["events_per_s"], 3),
            "round": rounds.index(r) + 1,
            "raw": r["raw"],
            "raw_decode": r["raw_decode"],
            "worker": worker,
        }
    from streamguard.config import WorkerSettings, DetectorSettings

    w, d = WorkerSettings(), DetectorSettings()
    return {
        "workers": chosen,
        "baseline": _baseline_summary(rounds, args) if args.baseline_env else None,
        "rounds": [{"raw_events_per_s": r["raw"]["events_per_s"],
                    "raw_decode_events_per_s": r["raw_decode"]["events_per_s"],
                    "workers": {str(n): {"events_per_s": wr["events_per_s"], "stalled": wr["stalled"],
                                         "cpu_ms_per_event": wr["cpu_ms_per_event"],
                                         "ratio_vs_raw_decode": round(wr["events_per_s"]
                                                                      / r["raw_decode"]["events_per_s"], 3)}
                                for n, wr in r["workers"].items()},
                    **({"baseline": {"events_per_s": r["baseline"]["events_per_s"],
                                     "stalled": r["baseline"]["stalled"], "ran_first": i % 2 == 1,
                                     "cpu_ms_per_event": r["baseline"]["cpu_ms_per_event"],
                                     "ratio_vs_raw_decode": round(r["baseline"]["events_per_s"]
                                                                  / r["raw_decode"]["events_per_s"], 3)}}
                       if r["baseline"] is not None else {})} for i, r in enumerate(rounds)],
        "settings": {
            "batch_size": args.batch_size or w.batch_size, "batch_wait_ms": w.batch_wait_ms,
            "max_in_flight": w.max_in_flight, "max_in_flight_per_partition": w.max_in_flight_per_partition,
            "commit_interval_s": w.commit_interval_s, "poll_timeout_ms": w.poll_timeout_ms,
            "detector_batch_size": d.batch_size, "dedupe": False,
        },
    }


def _baseline_summary(rounds: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The baseline beside the worker with the same N: medians over the rounds of its ratio to the raw loop
    and of worker / baseline in the same round (the two ran seconds apart, on the same broker)."""
    n = args.processes[0]
    ratios = [r["baseline"]["events_per_s"] / r["raw_decode"]["events_per_s"] for r in rounds]
    speedups = [r["workers"][n]["events_per_s"] / r["baseline"]["events_per_s"] for r in rounds]
    cpu = [r["baseline"]["cpu_ms_per_event"] for r in rounds if r["baseline"]["cpu_ms_per_event"] is not None]
    return {
        "env": args.baseline_env,
        "processes": n,
        "median_ratio_vs_raw_decode": round(statistics.median(ratios), 3),
        "median_worker_ratio_vs_raw_decode": round(statistics.median(
            r["workers"][n]["events_per_s"] / r["raw_decode"]["events_per_s"] for r in rounds), 3),
        "median_worker_vs_baseline": round(statistics.median(speedups), 3),
        "median_cpu_ms_per_event": round(statistics.median(cpu), 4) if cpu else None,
        "worker_vs_baseline_per_round": [round(x, 3) for x in speedups],
    }


def _print(out: dict[str, Any]) -> None:
    print(f"{out['messages']} {out['encoding']} events ({out['compression'] or 'uncompressed'}), "
          f"{out['partitions']} partitions, {out['record_value_bytes_mean']:.0f} B/record, {out['cpus']} CPUs; "
          "timed from partition assignment to the last outcome; median round per N")
    print(f"{'':<24} {'events/s':>9} {'CPU ms/ev':>9} {'vs raw+image':>12} {'vs raw':>7}")
    for s in out["summary"]:
        chosen = out["workers"][str(s["processes"])]
        raw, raw_decode = chosen["raw"], chosen["raw_decode"]
        print(f"{'raw kafka-python':<24} {raw['events_per_s']:9.1f} {raw['cpu_ms_per_event']:9.3f}   (round {chosen['round']})")
        print(f"{'raw + image work':<24} {raw_decode['events_per_s']:9.1f} {raw_decode['cpu_ms_per_event']:9.3f}")
        cpu = s["worker_cpu_ms_per_event"]
        state = " STALLED" if s["stalled"] else ""
        print(f"{'worker --processes ' + str(s['processes']):<24} {s['worker_events_per_s']:9.1f} "
              f"{cpu if cpu is not None else float('nan'):9.3f} {s['ratio_vs_raw_decode']:12.3f} "
              f"{s['ratio_vs_raw']:7.3f}{state}  (aim >= {out['aim_ratio_vs_raw_decode']} of raw + image work)")
    base = out.get("baseline")
    if base is not None:
        print(f"baseline ({' '.join(base['env'])}), {base['processes']} proc.: median "
              f"{base['median_ratio_vs_raw_decode']} of raw + image work (the worker "
              f"{base['median_worker_ratio_vs_raw_decode']} over the same rounds); "
              f"worker / baseline per round {base['worker_vs_baseline_per_round']}, median "
              f"{base['median_worker_vs_baseline']}")
    for s in out["summary"]:
        worker = out["workers"][str(s["processes"])]["worker"]
        print(f"worker --processes {s['processes']}: {worker['batches']} batches "
              f"({worker['records_per_batch']} records/batch), {worker['verdicts']} verdicts, "
              f"{worker['dead_letters']} dead letters, {worker['assignments']} assignments")
        print(f"  {'stage':<12} {'ms/batch':>9} {'ms/record':>10} {'% of wall':>10}")
        for stage, st in worker["stages"].items():
            print(f"  {stage:<12} {st['ms_per_batch']:9.3f} {st['ms_per_record']:10.4f} "
                  f"{100 * st['fraction_of_wall']:9.1f}%")
        if "untimed_fraction_of_wall" in worker:
            print(f"  {'(untimed)':<12} {'':>9} {'':>10} {100 * worker['untimed_fraction_of_wall']:9.1f}%")


if __name__ == "__main__":
    sys.exit(main())
