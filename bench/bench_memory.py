"""Memory benchmark: peak RSS of decode -> prepare -> detect for one batch of worst-case legitimate images,
the whole batch decoded at once against the batch split into chunks under `intake.batch_pixel_budget`
(what the worker does: decode a chunk, judge it, drop its images, next chunk), same images, same run.

    .venv/bin/python bench/bench_memory.py [--images 16] [--side 7000] [--sets png,jpeg] [--variants LIST]
        [--floor] [--out bench/results/memory.json]

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

By default the PNG set runs all four variants and the JPEG set whole and split (its native variants
behave as the PNG's), which keeps a run at about five minutes on 2 cores. The ratios are split against
whole (a), and against the whole batch decoded natively (the baseline: a ratio under 1 is memory saved);
the aim is a split peak under 1.5 GiB. Prints a table and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

AIM_BYTES = int(1.5 * 2**30)
VARIANTS = ("whole-native", "whole", "split", "split-native")
DEFAULT_VARIANTS = {"png": VARIANTS, "jpeg": ("whole", "split")}
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


def _judge_chunk(scorer: Any, chunk: list[bytes], intake: Any, side: int | None) -> int:
    """Decode and judge one chunk as `Scorer.score` does (at the given decode side); verdicts made."""
    from streamguard.intake import decode_image
    from streamguard.scoring import Outcome

    outcomes = [
        Outcome(key=str(i), sha256=hashlib.sha256(data).hexdigest(), image=decode_image(data, intake, side))
        for i, data in enumerate(chunk)
    ]
    scorer.judge(outcomes)
    return sum(o.verdict is not None for o in outcomes)


def child(variant: str, paths: list[str]) -> dict[str, Any]:
    from streamguard.config import load_settings
    from streamguard.intake import decode_side
    from streamguard.plugins import DEFAULT_PLUGINS, build_plugin_manager
    from streamguard.scoring import ImageJob, Scorer

    settings = load_settings(plugins={"allow": list(DEFAULT_PLUGINS)})
    with Scorer(settings, build_plugin_manager(settings.plugins)) as scorer:
        scorer.score([ImageJob("warm-up", _small_png(FLOOR_SIDE, 99))])  # lazy weights, first-call buffers
        reset = _reset_peak()
        ready_kib = _status_kib("VmRSS")
        started = time.perf_counter()
        payloads = [Path(p).read_bytes() for p in paths]  # a worker's batch holds every record's bytes
        native = variant.endswith("-native")
        side = None if native else decode_side(spec.contract for spec in scorer.specs)
        budget = settings.intake.batch_pixel_budget if variant.startswith("split") else HUGE_BUDGET
        chunks = list(_chunks(payloads, settings.intake, side, budget))
        sizes, verdicts = [len(c) for c in chunks], 0
        while chunks:
            verdicts += _judge_chunk(scorer, chunks.pop(0), settings.intake, side)  # judged images dropped
        seconds = time.perf_counter() - started
        return {
            "detectors": [spec.name for spec in scorer.specs],
            "decode_side": side,
            "budget_pixels": None if budget == HUGE_BUDGET else budget,
            "chunks": sizes,
            "verdicts": verdicts,
            "seconds": round(seconds, 2),
            "ready_rss_bytes": ready_kib * 1024,
            "peak_rss_bytes": _status_kib("VmHWM") * 1024,
            "peak_is_batch_only": reset,
        }


# -- the parent ------------------------------------------------------------------------------------------------


def _run_child(variant: str, paths: list[str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json") as spec:
        json.dump({"variant": variant, "paths": paths}, spec)
        spec.flush()
        proc = subprocess.run([sys.executable, __file__, "--child", spec.name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gib(n: int) -> float:
    return round(n / 2**30, 3)


def _print_row(label: str, row: dict[str, Any]) -> None:
    print(f"{label:<20} peak {_gib(row['peak_rss_bytes']):6.3f} GiB  (ready {_gib(row['ready_rss_bytes']):5.3f},"
          f" +{_gib(row['peak_rss_bytes'] - row['ready_rss_bytes']):5.3f})  chunks {row['chunks']}"
          f"  {row['seconds']:6.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory.json"))
    parser.add_argument("--images", type=int, default=16, help="Images in the batch.")
    parser.add_argument("--side", type=int, default=7000, help="Side of the square images.")
    parser.add_argument("--distinct", type=int, default=4, help="Different images written per set.")
    parser.add_argument("--sets", default="png,jpeg", help="Comma-separated: png, jpeg.")
    parser.add_argument("--variants", help=f"Comma-separated of {', '.join(VARIANTS)}, for every set.")
    parser.add_argument("--floor", action="store_true", help="Also measure the detectors on small images.")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        spec = json.loads(args.child.read_text())
        print(json.dumps(child(spec["variant"], spec["paths"])))
        return

    sets = [s for s in args.sets.split(",") if s]
    chosen = [v for v in args.variants.split(",") if v] if args.variants else None
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        folder = Path(tmp)
        if args.floor:
            floor_paths = _write_set(folder, "floor", FLOOR_SIDE, args.distinct, args.images)
            results["floor"] = {"whole": _run_child("whole", floor_paths)}
            _print_row("floor (256px) whole", results["floor"]["whole"])
        for name in sets:
            paths = _write_set(folder, name, args.side, args.distinct, args.images)
            results[name] = {"payload_bytes": sum(Path(p).stat().st_size for p in paths)}
            for variant in chosen or DEFAULT_VARIANTS[name]:
                results[name][variant] = _run_child(variant, paths)
                _print_row(f"{name} {variant}", results[name][variant])

    summary = _summary(results, sets)
    result = {
        "benchmark": "memory_decode_prepare_detect",
        "images": args.images,
        "image_side": args.side,
        "distinct_images_per_set": args.distinct,
        "aim_peak_rss_bytes": AIM_BYTES,
        "results": results,
        "summary": summary,
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
               f"{_gib(row['ready_rss_bytes'])}), aim < 1.5 GiB met: {row['aim_met']}")
        print(f"{name}: {ratios}  {aim if 'aim_met' in row else ''}")
    print(f"-> {args.out}")


def _summary(results: dict[str, dict[str, Any]], sets: list[str]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for name in sets:
        row: dict[str, Any] = {}
        peaks = {v: r["peak_rss_bytes"] for v, r in results[name].items() if isinstance(r, dict)}
        for num, den in RATIOS:
            if num in peaks and den in peaks:
                row[f"ratio_{num}_vs_{den}".replace("-", "_")] = round(peaks[num] / peaks[den], 3)
        if "split" in peaks:
            row["split_peak_rss_bytes"] = peaks["split"]
            row["aim_met"] = peaks["split"] < AIM_BYTES
        # What the detectors hold before any image arrives: the part of the peak no intake change can touch.
        row["ready_rss_bytes"] = min(r["ready_rss_bytes"] for r in results[name].values() if isinstance(r, dict))
        summary[name] = row
    return summary


if __name__ == "__main__":
    main()
