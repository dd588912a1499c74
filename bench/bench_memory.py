"""Memory benchmark: peak RSS of decode -> prepare -> detect for one batch of worst-case legitimate images,
the whole batch decoded at once against the batch split into chunks under `intake.batch_pixel_budget`
(what the worker does: decode a chunk, judge it, drop its images, next chunk), same images, same run.

    .venv/bin/python bench/bench_memory.py [--images 16] [--side 7000] [--sets png,jpeg] [--variants LIST]
        [--backends inprocess,triton] [--quick] [--triton-url HOST:PORT] [--floor] [--out bench/results/memory.json]

Images: `--images` per set, `--side` square (7000x7000 = 49 Mpx, just under `intake.max_pixels`), each under
`intake.max_bytes`: PNGs of 4x4-block RGB noise (the most pixels that still encode under 20 MB) and
photo-like JPEGs (gradients plus noise, quality 90). `--distinct` different images per set are written and
read back as `--images` separate payloads (decoding works on separate copies either way).

Every variant runs in a fresh subprocess with the shipped detectors in process (univfd, pin-clip, mpft; the
built-in plugins only), warmed up on one small image; then the kernel's peak-RSS mark is reset
(`/proc/self/clear_refs`) and the batch's bytes are read and judged, so the peak reported (VmHWM) is the
decode/prepare/detect path's, detectors' weights included, not the model loading's. Variants:

- whole: the batch decoded at once at the scorer's decode side (reduced, all contracts resize);
- split: the same, in chunks whose `estimate_decoded_pixels` fit `intake.batch_pixel_budget`;
- whole-native / split-native: decoded at native size, as when a detector with a crop contract is
  configured (and as every PNG was held before the intake held images reduced);
- floor (`--floor`): the batch as small PNGs (256x256): the detectors' own share, whatever the images.

Triton variants (`triton-whole`, `triton-split`): the same batch through the same path with
`detectors.backend = "triton"`, as the worker runs in production, where the models live in Triton's pod
and the worker's pod holds only the client. The bench builds the shipped detectors' repository
(`streamguard triton build`, CPU, Python backend), starts one tritonserver from the nvidia-pytriton wheel
for all Triton variants (after the in-process ones, so the two never share the cores), points each child's
`triton.url` at it with timeouts generous enough for three ViT-B/16 on a few CPU cores, and measures the
client child's peak exactly as above (warm-up through Triton, mark reset, batch). The server's process
tree (tritonserver and its Python-backend stubs, the other pod) is measured apart, for information only:
its RSS and PSS summed over the tree when ready and, during each Triton variant, sampled every
`SAMPLE_S`, plus the sum of each process's own peak (VmHWM, reset before the variant). The server is
stopped at the end, on failure, Ctrl-C or SIGTERM too. `--triton-url` uses a running server instead
(serving the shipped detectors' models; its memory is then not measured). `--backends` picks which kind of
variant runs.

By default the PNG set runs all four in-process variants and the JPEG set whole and split (its native
variants behave as the PNG's), and both sets run both Triton variants: about nine minutes on 2 cores
(`--backends inprocess` alone: about five; `--quick`, the baseline and the split variants only: about
half), longer on a loaded machine. The ratios are split against whole (a), and against the
whole batch decoded natively (the baseline: a ratio under 1 is memory saved). Every row also carries its
ratio against the baseline of the same run (the set's in-process whole-native, or the PNG set's where the
set ran none; named in the row) and whether it meets the aim: a peak under 1.5 GiB. Prints a table and
writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

AIM_BYTES = int(1.5 * 2**30)
VARIANTS = ("whole-native", "whole", "split", "split-native")
TRITON_VARIANTS = ("triton-whole", "triton-split")  # the batch as `whole` / `split`, detectors on Triton
DEFAULT_VARIANTS = {"png": VARIANTS + TRITON_VARIANTS, "jpeg": ("whole", "split") + TRITON_VARIANTS}
# --quick: the baseline and what the worker runs (split), in process and on Triton.
QUICK_VARIANTS = {"png": ("whole-native", "split", "triton-split"), "jpeg": ("split", "triton-split")}
BASELINE = "whole-native"
# Three ViT-B/16 sharing a few CPU cores take tens of seconds on a 16-image batch: the worker's defaults
# (10 s per request) would turn that into error scores. And a request may not raise the shipped configs' 30 s
# queue timeout (Triton lets a request only shorten it): one queued longer behind its batch-mates is rejected
# ("Request timeout expired") and retried, so the retry budget must be generous too. detectors.timeout_s must
# exceed the other two summed (the Settings validator).
TRITON_REQUEST_TIMEOUT_S = 180.0
TRITON_RETRY_BUDGET_S = 240.0
TRITON_DETECTOR_TIMEOUT_S = 450.0
TRITON_START_TIMEOUT_S = 300.0
SAMPLE_S = 0.2
# (numerator, denominator) peaks reported as ratios; whole-native is the baseline.
RATIOS = (("split", "whole"), ("split", "whole-native"), ("whole", "whole-native"), ("split-native", "whole-native"))
FLOOR_SIDE = 256
HUGE_BUDGET = 2**62


def _noise_png(side: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    # Noise in 4x4 blocks: full-entropy content that still fits the 20 MB byte limit at 49 Mpx.
    cells = rng.integers(0, 256, (side // 4 + 1, side // 4 + 1, 3), dtype=np.uint8)
    arr = np.repeat(np.repeat(cells, 4, axis=0), 4, axis=1)[:side, :side]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _photo_jpeg(side: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    base = np.stack([np.sin(x / 90.0 + seed), np.cos(y / 70.0), np.sin((x + y) / 150.0)], axis=-1) * 100 + 128
    del x, y
    base += rng.normal(0, 8, base.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _small_png(side: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


MAKERS = {"png": _noise_png, "jpeg": _photo_jpeg, "floor": _small_png}


def _write_set(folder: Path, name: str, side: int, distinct: int, images: int) -> list[str]:
    """``images`` paths over ``distinct`` files of the set."""
    paths = []
    for seed in range(distinct):
        path = folder / f"{name}-{seed}.bin"
        path.write_bytes(MAKERS[name](side, seed))
        paths.append(str(path))
    return [paths[i % distinct] for i in range(images)]


# -- the child: one variant in a fresh process ---------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak read later is the batch's alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _chunks(payloads: Sequence[bytes], intake: Any, side: int | None, budget: int) -> Iterator[list[bytes]]:
    """Consecutive chunks whose estimated decoded pixels fit ``budget``; a lone image over it goes alone."""
    from streamguard.intake import estimate_decoded_pixels

    chunk: list[bytes] = []
    used = 0
    for data in payloads:
        pixels = estimate_decoded_pixels(data, intake, side)
        if chunk and used + pixels > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append(data)
        used += pixels
    if chunk:
        yield chunk


def _judge_chunk(scorer: Any, chunk: list[bytes], intake: Any, side: int | None) -> tuple[int, int]:
    """Decode and judge one chunk as `Scorer.score` does (at the given decode side); verdicts made, and how
    many of them are degraded (some detector failed)."""
    from streamguard.intake import decode_image
    from streamguard.scoring import Outcome

    outcomes = [
        Outcome(key=str(i), sha256=hashlib.sha256(data).hexdigest(), image=decode_image(data, intake, side))
        for i, data in enumerate(chunk)
    ]
    scorer.judge(outcomes)
    return (sum(o.verdict is not None for o in outcomes),
            sum(o.verdict is not None and o.verdict.degraded for o in outcomes))


def _triton_overrides(url: str) -> dict[str, Any]:
    """Settings overrides that put every detector on the Triton server at ``url``."""
    return {
        "detectors": {"backend": "triton", "timeout_s": TRITON_DETECTOR_TIMEOUT_S},
        "triton": {"url": url, "request_timeout_s": TRITON_REQUEST_TIMEOUT_S,
                   "retry_budget_s": TRITON_RETRY_BUDGET_S},
    }


def child(variant: str, paths: list[str], triton_url: str | None = None) -> dict[str, Any]:
    from streamguard.config import load_settings
    from streamguard.intake import decode_side
    from streamguard.plugins import DEFAULT_PLUGINS, build_plugin_manager
    from streamguard.scoring import ImageJob, Scorer

    on_triton = variant.startswith("triton-")
    if on_triton and not triton_url:
        raise ValueError(f"variant {variant} needs a Triton URL")
    overrides = _triton_overrides(triton_url) if on_triton and triton_url else {}
    batch = variant.removeprefix("triton-")  # the Triton variants decode and chunk as their in-process twins
    settings = load_settings(plugins={"allow": list(DEFAULT_PLUGINS)}, **overrides)
    with Scorer(settings, build_plugin_manager(settings.plugins)) as scorer:
        backends = {runner.spec.name: runner.backend_kind for runner in scorer.runners}
        if on_triton:
            # A detector left in process, or one whose client failed to connect, would make the number wrong.
            wrong = {n: k for n, k in backends.items() if k != "triton"}
            failed = {r.spec.name: r.load_error for r in scorer.runners if r.load_error}
            if wrong or failed or not backends:
                raise RuntimeError(f"not every detector is on Triton: backends {backends}, load errors {failed}")
        warm = scorer.score([ImageJob("warm-up", _small_png(FLOOR_SIDE, 99))])  # lazy weights, first-call buffers
        if on_triton and any(o.verdict is None or o.verdict.degraded for o in warm):
            raise RuntimeError(f"warm-up through Triton failed: {[o.verdict or o.error for o in warm]}")
        reset = _reset_peak()
        ready_kib = _status_kib("VmRSS")
        started = time.perf_counter()
        payloads = [Path(p).read_bytes() for p in paths]  # a worker's batch holds every record's bytes
        native = batch.endswith("-native")
        side = None if native else decode_side(spec.contract for spec in scorer.specs)
        budget = settings.intake.batch_pixel_budget if batch.startswith("split") else HUGE_BUDGET
        chunks = list(_chunks(payloads, settings.intake, side, budget))
        sizes, verdicts, degraded = [len(c) for c in chunks], 0, 0
        while chunks:
            made, worse = _judge_chunk(scorer, chunks.pop(0), settings.intake, side)  # judged images dropped
            verdicts, degraded = verdicts + made, degraded + worse
        seconds = time.perf_counter() - started
        peak_kib = _status_kib("VmHWM")
        if on_triton and (degraded or verdicts != len(paths)):
            raise RuntimeError(f"{variant}: {verdicts} verdicts for {len(paths)} images, {degraded} degraded "
                               "(a detector failed or timed out on Triton): the peak would not be the full path's")
        return {
            "backend": "triton" if on_triton else "inprocess",
            "detector_backends": backends,
            "detectors": [spec.name for spec in scorer.specs],
            "decode_side": side,
            "budget_pixels": None if budget == HUGE_BUDGET else budget,
            "chunks": sizes,
            "verdicts": verdicts,
            "degraded_verdicts": degraded,
            "seconds": round(seconds, 2),
            "ready_rss_bytes": ready_kib * 1024,
            "peak_rss_bytes": peak_kib * 1024,
            "peak_is_batch_only": reset,
        }


# -- the parent ------------------------------------------------------------------------------------------------


def _run_child(variant: str, paths: list[str], triton_url: str | None = None,
               timeout_s: float | None = None) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json") as spec:
        json.dump({"variant": variant, "paths": paths, "triton_url": triton_url}, spec)
        spec.flush()
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", spec.name], capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"variant {variant} did not finish within {timeout_s:g}s") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the Triton server: started once, measured apart, always stopped --------------------------------------------


def _tree_pids(root: int) -> list[int]:
    """``root`` and its descendants (tritonserver and its Python-backend stubs), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def _proc_kib(pid: int, path: str, fields: Sequence[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in fields:
                found[key] = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return found


def _tree_memory(root: int) -> dict[str, Any]:
    """RSS and PSS summed over the tree (RSS counts shared pages once per process; PSS shares them out), and
    the sum of each process's own peak (VmHWM: peaks of different moments, an upper bound)."""
    rss = pss = hwm = 0
    pids = _tree_pids(root)
    for pid in pids:
        status = _proc_kib(pid, "status", ("VmRSS", "VmHWM"))
        rss += status.get("VmRSS", 0)
        hwm += status.get("VmHWM", 0)
        pss += _proc_kib(pid, "smaps_rollup", ("Pss",)).get("Pss", 0)
    return {"processes": len(pids), "rss_bytes": rss * 1024, "pss_bytes": pss * 1024, "hwm_sum_bytes": hwm * 1024}


def _reset_tree_peaks(root: int) -> bool:
    ok = True
    for pid in _tree_pids(root):
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


class _TreeSampler:
    """Samples the server tree's memory in a thread while a Triton variant runs; keeps the largest sums."""

    def __init__(self, root: int) -> None:
        self._root = root
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.peak_rss = self.peak_pss = 0
        self.samples = 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = _tree_memory(self._root)
            self.peak_rss = max(self.peak_rss, now["rss_bytes"])
            self.peak_pss = max(self.peak_pss, now["pss_bytes"])
            self.samples += 1
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> _TreeSampler:
        self.peaks_reset = _reset_tree_peaks(self._root)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict[str, Any]:
        return {"sampled_peak_rss_bytes": self.peak_rss, "sampled_peak_pss_bytes": self.peak_pss,
                "samples": self.samples, "hwm_sum_bytes": _tree_memory(self._root)["hwm_sum_bytes"],
                "hwm_reset_before": self.peaks_reset}


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _own_tritonservers() -> list[int]:
    """tritonserver processes this process spawned: what an interrupted `start_triton` leaves unreturned."""
    own = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0]
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and argv0.endswith(b"/tritonserver"):
            own.append(int(entry.name))
    return own


@contextmanager
def _triton_server(folder: Path) -> Iterator[Any]:
    """The shipped detectors' repository (as `streamguard triton build` writes it, CPU, Python backend) served by
    tritonserver from the nvidia-pytriton wheel; stopped on the way out whatever happens (SIGTERM included)."""
    from streamguard.config import load_settings
    from streamguard.devstack import Service, start_triton
    from streamguard.triton.build import build_repository

    built = build_repository(folder / "models", device="cpu", backbone=load_settings().backbone)
    started = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    server = None
    try:
        server = start_triton(folder / "work", built.repository, list(built.models), timeout_s=TRITON_START_TIMEOUT_S)
        print(f"tritonserver ready in {time.perf_counter() - started:.1f} s, models {sorted(built.models)},"
              f" grpc {server.grpc_address}", flush=True)
        yield server, built, round(time.perf_counter() - started, 1)
    finally:
        # Interrupted inside start_triton, the server has no handle yet: it is a child of this process.
        leftovers = [server] if server is not None else [
            Service(name="triton", pid=pid, port=0, log_path="") for pid in _own_tritonservers()]
        for service in leftovers:
            service.stop()  # its process group: the server and its Python-backend stubs
            if service.alive():
                print(f"warning: tritonserver (pid {service.pid}) still running", file=sys.stderr)
        signal.signal(signal.SIGTERM, previous)


def _gib(n: int) -> float:
    return round(n / 2**30, 3)


def _print_row(label: str, row: dict[str, Any]) -> None:
    print(f"{label:<24} peak {_gib(row['peak_rss_bytes']):6.3f} GiB  (ready {_gib(row['ready_rss_bytes']):5.3f},"
          f" +{_gib(row['peak_rss_bytes'] - row['ready_rss_bytes']):5.3f})  chunks {row['chunks']}"
          f"  {row['seconds']:6.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory.json"))
    parser.add_argument("--images", type=int, default=16, help="Images in the batch.")
    parser.add_argument("--side", type=int, default=7000, help="Side of the square images.")
    parser.add_argument("--distinct", type=int, default=4, help="Different images written per set.")
    parser.add_argument("--sets", default="png,jpeg", help="Comma-separated: png, jpeg.")
    parser.add_argument("--variants", help=f"Comma-separated of {', '.join(VARIANTS + TRITON_VARIANTS)},"
                        " for every set.")
    parser.add_argument("--quick", action="store_true", help="Only the baseline (PNG whole-native) and the split"
                        " variants, in process and on Triton: about half the time.")
    parser.add_argument("--backends", default="inprocess,triton",
                        help="Comma-separated: inprocess, triton; keeps only those variants.")
    parser.add_argument("--triton-url", help="gRPC address of a running Triton serving the shipped detectors"
                        " (default: start one for the bench; only then is the server's memory measured).")
    parser.add_argument("--floor", action="store_true", help="Also measure the detectors on small images.")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        spec = json.loads(args.child.read_text())
        print(json.dumps(child(spec["variant"], spec["paths"], spec.get("triton_url"))))
        return

    started = time.perf_counter()
    sets = [s for s in args.sets.split(",") if s]
    backends = {b for b in args.backends.split(",") if b}
    if backends - {"inprocess", "triton"}:
        parser.error(f"unknown backends: {sorted(backends - {'inprocess', 'triton'})}")
    chosen = [v for v in args.variants.split(",") if v] if args.variants else None
    if chosen and set(chosen) - set(VARIANTS + TRITON_VARIANTS):
        parser.error(f"unknown variants: {sorted(set(chosen) - set(VARIANTS + TRITON_VARIANTS))}")
    defaults = QUICK_VARIANTS if args.quick else DEFAULT_VARIANTS
    plan = {name: [v for v in chosen or defaults[name]
                   if ("triton" if v in TRITON_VARIANTS else "inprocess") in backends] for name in sets}
    results: dict[str, dict[str, Any]] = {}
    server_info: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        folder = Path(tmp)
        if args.floor:
            floor_paths = _write_set(folder, "floor", FLOOR_SIDE, args.distinct, args.images)
            results["floor"] = {"whole": _run_child("whole", floor_paths)}
            _print_row("floor (256px) whole", results["floor"]["whole"])
        set_paths: dict[str, list[str]] = {}
        for name in sets:
            set_paths[name] = paths = _write_set(folder, name, args.side, args.distinct, args.images)
            results[name] = {"payload_bytes": sum(Path(p).stat().st_size for p in paths)}
            for variant in plan[name]:
                if variant not in TRITON_VARIANTS:
                    results[name][variant] = _run_child(variant, paths)
                    _print_row(f"{name} {variant}", results[name][variant])
        # The Triton variants last, against one server started for them all, so it never shares the cores
        # with an in-process variant.
        if any(v in TRITON_VARIANTS for name in sets for v in plan[name]):
            server_info = _run_triton_variants(folder, sets, plan, set_paths, results, args.triton_url)

    summary = _summary(results, sets)
    result = {
        "benchmark": "memory_decode_prepare_detect",
        "images": args.images,
        "image_side": args.side,
        "distinct_images_per_set": args.distinct,
        "aim_peak_rss_bytes": AIM_BYTES,
        "results": results,
        "summary": summary,
        "triton_server": server_info,
        "triton_client_settings": _triton_overrides("<server>") if server_info is not None else None,
        "seconds": round(time.perf_counter() - started, 1),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, row in summary.items():
        ratios = "  ".join(f"{key.removeprefix('ratio_')} {value:.2f}x" for key, value in row.items()
                           if key.startswith("ratio_"))
        aim = (f"split peak {_gib(row['split_peak_rss_bytes'])} GiB (detectors ready at "
               f"{_gib(row['ready_rss_bytes'])}), aim < 1.5 GiB met: {row['aim_met']}") if "aim_met" in row else ""
        print(f"{name}: {ratios}  {aim}")
    _print_table(results, sets, server_info)
    print(f"whole bench {result['seconds']:.0f} s -> {args.out}")


def _run_triton_variants(folder: Path, sets: list[str], plan: dict[str, list[str]], set_paths: dict[str, list[str]],
                         results: dict[str, dict[str, Any]], url: str | None) -> dict[str, Any]:
    """Every planned Triton variant against one server (started here unless ``url``); the server's memory."""
    timeout_s = TRITON_DETECTOR_TIMEOUT_S + 300  # client start, decoding, and a slow detector call

    def run_all(root: int | None, server_url: str) -> dict[str, Any]:
        per_variant: dict[str, Any] = {}
        for name in sets:
            for variant in (v for v in plan[name] if v in TRITON_VARIANTS):
                if root is None:
                    results[name][variant] = _run_child(variant, set_paths[name], server_url, timeout_s)
                else:
                    with _TreeSampler(root) as sampler:
                        results[name][variant] = _run_child(variant, set_paths[name], server_url, timeout_s)
                    per_variant[f"{name} {variant}"] = sampler.result()
                _print_row(f"{name} {variant}", results[name][variant])
        return per_variant

    if url is not None:
        return {"url": url, "started_by_bench": False, "variants": run_all(None, url)}
    with _triton_server(folder / "triton") as (server, built, start_s):
        ready = _tree_memory(server.pid)
        print(f"tritonserver tree ready: {ready['processes']} processes, RSS {_gib(ready['rss_bytes']):.3f} GiB,"
              f" PSS {_gib(ready['pss_bytes']):.3f} GiB", flush=True)
        per_variant = run_all(server.pid, server.grpc_address)
        return {"started_by_bench": True, "models": built.models, "start_seconds": start_s, "ready": ready,
                "variants": per_variant}


def _print_table(results: dict[str, dict[str, Any]], sets: list[str], server: dict[str, Any] | None) -> None:
    print()
    print(f"{'set':<6}{'backend':<11}{'variant':<14}{'peak GiB':>9}{'ready GiB':>10}{'vs baseline':>13}"
          f"{'aim <1.5 GiB':>14}  baseline")
    for name in sets:
        for variant, row in results[name].items():
            if not isinstance(row, dict):
                continue
            ratio = row.get("ratio_vs_baseline")
            print(f"{name:<6}{row.get('backend', 'inprocess'):<11}{variant:<14}{_gib(row['peak_rss_bytes']):>9.3f}"
                  f"{_gib(row['ready_rss_bytes']):>10.3f}{'-' if ratio is None else f'{ratio:.3f}x':>13}"
                  f"{'yes' if row['aim_met'] else 'NO':>14}  {row.get('baseline') or '-'}")
    if server and server.get("started_by_bench"):
        ready = server["ready"]
        print(f"\ntritonserver tree (the other pod, informative): {ready['processes']} processes; ready RSS "
              f"{_gib(ready['rss_bytes']):.3f} GiB, PSS {_gib(ready['pss_bytes']):.3f} GiB")
        for label, row in server["variants"].items():
            print(f"  during {label:<20} sampled peak RSS {_gib(row['sampled_peak_rss_bytes']):.3f} GiB,"
                  f" PSS {_gib(row['sampled_peak_pss_bytes']):.3f} GiB; sum of per-process peaks"
                  f" {_gib(row['hwm_sum_bytes']):.3f} GiB")


def _annotate(results: dict[str, dict[str, Any]], sets: list[str]) -> None:
    """Each row's ratio against the run's baseline (the set's in-process whole-native, else the PNG set's),
    and whether it meets the aim."""
    fallback = results.get("png", {}).get(BASELINE)
    for name in sets:
        own = results[name].get(BASELINE)
        base, label = (own, f"{name} {BASELINE}") if own else (fallback, f"png {BASELINE}")
        label = label if base else None
        for row in results[name].values():
            if not isinstance(row, dict):
                continue
            row["baseline"] = label
            row["ratio_vs_baseline"] = round(row["peak_rss_bytes"] / base["peak_rss_bytes"], 3) if base else None
            row["aim_met"] = row["peak_rss_bytes"] < AIM_BYTES


def _summary(results: dict[str, dict[str, Any]], sets: list[str]) -> dict[str, dict[str, Any]]:
    _annotate(results, sets)
    summary: dict[str, dict[str, Any]] = {}
    for name in sets:
        row: dict[str, Any] = {}
        # The in-process rows, as before; the Triton rows get their own keys below.
        peaks = {v: r["peak_rss_bytes"] for v, r in results[name].items() if isinstance(r, dict) and v in VARIANTS}
        for num, den in RATIOS:
            if num in peaks and den in peaks:
                row[f"ratio_{num}_vs_{den}".replace("-", "_")] = round(peaks[num] / peaks[den], 3)
        if "split" in peaks:
            row["split_peak_rss_bytes"] = peaks["split"]
            row["aim_met"] = peaks["split"] < AIM_BYTES
        # What the detectors hold before any image arrives: the part of the peak no intake change can touch.
        ready = [r["ready_rss_bytes"] for v, r in results[name].items() if isinstance(r, dict) and v in VARIANTS]
        if ready:
            row["ready_rss_bytes"] = min(ready)
        for variant in TRITON_VARIANTS:
            remote = results[name].get(variant)
            if not isinstance(remote, dict):
                continue
            key = variant.replace("-", "_")
            row[f"{key}_peak_rss_bytes"] = remote["peak_rss_bytes"]
            row[f"{key}_ready_rss_bytes"] = remote["ready_rss_bytes"]
            row[f"{key}_ratio_vs_baseline"] = remote["ratio_vs_baseline"]
            row[f"{key}_aim_met"] = remote["aim_met"]
            twin = results[name].get(variant.removeprefix("triton-"))
            if isinstance(twin, dict):  # the same batch with the detectors in process
                row[f"ratio_{key}_vs_inprocess"] = round(remote["peak_rss_bytes"] / twin["peak_rss_bytes"], 3)
        summary[name] = row
    return summary


if __name__ == "__main__":
    main()
