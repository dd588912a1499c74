"""Every labelled-image layout of the field, read into one normalized manifest of `Sample`.

A data argument is a directory, a tar archive (read in place, members on demand), or a manifest file
(CSV or JSONL). Directories and archives are classified path by path with the same rules, so a tar of a
CNNDetection tree reads exactly like the tree itself.

Per-layout rules (``label folder`` = the first folder from the top whose name is a label):

- manifest: ``<dir>/manifest.csv|manifest.jsonl`` or the file itself. Columns ``path`` (relative to the
  manifest), ``label`` (ai/fake/1 or real/0), ``generator``, optional ``split``, ``source``, ``family``.
  A real row's source is its ``generator`` value when set, else the folder holding the file, else its
  ``source`` value: wild-train's ``source`` column names the upstream repository, too coarse to group by.
- cifake: a root whose top folders are exactly ``REAL`` and ``FAKE`` (upper case). Fakes are
  ``stable-diffusion-1.4`` (source ``cifake``), reals come from ``cifar10``.
- genimage: label folders ``ai`` / ``nature`` below ``<Generator>/.../{train,val}``. The generator is
  the top folder; every GenImage real image is an ImageNet photo, so reals get source ``imagenet``.
- aigibench / cnndetection: label folders ``1_fake`` / ``0_real``. Above them an optional split folder
  (``train``/``val``/``test``, AIGIBench's first level), then the generator (or AIGIBench subset), then
  an optional object class. Reals take the generator folder's name as their source.
- simple: label folders ``fake``/``ai`` and ``real``. The generator (or a real image's source) is the
  folder above the label folder, else the first folder below it (``ai/<generator>/...``), else the
  root's own name.

Files outside any label folder, non-image files and hidden files (``.*``, e.g. macOS ``._x.png``) are
skipped and counted. A sample with no split from its data gets one from a seeded hash of its id
(80/10/10 train/val/test), so every run and every training script that passes the same seed sees the
same split.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import tarfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import structlog

from streamguard.scan_inputs import IMAGE_SUFFIXES

log = structlog.get_logger(__name__)

REAL, FAKE = 0, 1
MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
DEFAULT_SPLIT_FRACTIONS: tuple[tuple[str, float], ...] = (("train", 0.8), ("val", 0.1), ("test", 0.1))

_FAKE_DIRS = frozenset({"1_fake", "fake", "ai"})
_REAL_DIRS = frozenset({"0_real", "real", "nature"})
_SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_LABEL_WORDS = {
    "ai": FAKE, "fake": FAKE, "1": FAKE, "generated": FAKE, "synthetic": FAKE, "true": FAKE,
    "real": REAL, "0": REAL, "nature": REAL, "authentic": REAL, "false": REAL,
}
# Checked in order: "dalle-mini" is autoregressive although "dall" also names diffusion models.
_FAMILIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("autoregressive", re.compile(r"dalle[-_ ]?mini|craiyon|\bparti\b|cogview|\bvar\b|llamagen")),
    ("gan", re.compile(r"gan|deepfake|whichfaceisreal|\bcrn\b|\bimle\b|seeingdark")),
    ("diffusion", re.compile(
        r"diffusion|stable|\bsd|sdxl|sdv|ldm|latent|glide|glid|\badm\b|dall|midjourney|wukong|vqdm|imagen|"
        r"firefly|flux|pixart|kandinsky|playground|ideogram|deepfloyd|dit\b|hunyuan|kolors|aurora"
    )),
)


@dataclass(frozen=True)
class Sample:
    """One labelled image. ``member`` is set for an image inside a tar archive at ``path``."""

    id: str
    path: str
    member: str | None
    label: int  # 0 real, 1 fake
    generator: str  # "real" for real images
    family: str  # gan / diffusion / autoregressive / unknown; "real" for real images
    source: str  # where a real image comes from (photo collection); the dataset for a fake one
    split: str

    @property
    def group(self) -> str:
        """What per-group subsampling and reports group by: the generator of a fake, the source of a real."""
        return self.generator if self.label == FAKE else self.source


@dataclass(frozen=True)
class _Labelled:
    """A path's meaning before it becomes a Sample: what the layout rules say about it."""

    label: int
    name: str  # generator for a fake, source for a real
    split: str | None
    layout: str
    source: str | None = None  # for fakes: the dataset, when the layout says


@dataclass
class LoadSummary:
    """What loading found, per root: the layouts seen and what was skipped."""

    roots: dict[str, Counter[str]] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)


def family_of(generator: str) -> str:
    name = generator.lower()
    if name == "real":
        return "real"
    for family, pattern in _FAMILIES:
        if pattern.search(name):
            return family
    return "unknown"


def parse_label(value: object) -> int | None:
    """0 or 1 from a manifest's label cell; None when it is not a label."""
    return _LABEL_WORDS.get(str(value).strip().lower())


def assign_split(sample_id: str, seed: int, fractions: Sequence[tuple[str, float]] = DEFAULT_SPLIT_FRACTIONS) -> str:
    point = _unit_hash(f"split:{seed}:{sample_id}")
    total = sum(weight for _, weight in fractions)
    edge = 0.0
    for name, weight in fractions:
        edge += weight / total
        if point < edge:
            return name
    return fractions[-1][0]


def _unit_hash(text: str) -> float:
    """A float in [0, 1) from text: stable across runs, machines and Python's hash randomisation."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _is_hidden(parts: Sequence[str]) -> bool:
    # macOS archives carry "._x.png" resource forks beside every image; they are not images.
    return any(part.startswith(".") for part in parts)


def _is_tar(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(TAR_SUFFIXES)


def classify(parts: Sequence[str], root_name: str, top_folders: frozenset[str]) -> _Labelled | None:
    """Apply the layout rules to one file's folders (relative to the root, file name excluded)."""
    if top_folders == {"REAL", "FAKE"} and parts and parts[0] in top_folders:
        if parts[0] == "FAKE":
            return _Labelled(FAKE, "stable-diffusion-1.4", None, "cifake", source="cifake")
        return _Labelled(REAL, "cifar10", None, "cifake")
    for index, part in enumerate(parts):
        lowered = part.lower()
        if lowered in _FAKE_DIRS or lowered in _REAL_DIRS:
            return _classify_at(parts, index, root_name)
    return None


def _classify_at(parts: Sequence[str], index: int, root_name: str) -> _Labelled:
    folder = parts[index].lower()
    label = FAKE if folder in _FAKE_DIRS else REAL
    above = list(parts[:index])
    below = parts[index + 1 :]
    split = None
    for position in range(len(above) - 1, -1, -1):
        if above[position].lower() in _SPLIT_DIRS:
            split = _SPLIT_DIRS[above.pop(position).lower()]
            break
    genimage = folder in ("ai", "nature") and split is not None
    if folder in ("1_fake", "0_real"):
        layout = "aigibench" if parts[0].lower() in _SPLIT_DIRS else "cnndetection"
    else:
        layout = "genimage" if genimage else "simple"
    if above:
        name = above[0]
    elif below:
        name = below[0]
    else:
        name = root_name
    if label == REAL and layout == "genimage":
        name = "imagenet"
    return _Labelled(label, name, split, layout)


def _sample(
    sample_id: str, path: str, member: str | None, labelled: _Labelled, root_name: str, seed: int,
    family: str | None = None,
) -> Sample:
    if labelled.label == FAKE:
        generator, source = labelled.name, labelled.source or root_name
    else:
        generator, source = "real", labelled.name
    return Sample(
        id=sample_id,
        path=path,
        member=member,
        label=labelled.label,
        generator=generator,
        family=family or family_of(generator),
        source=source,
        split=labelled.split or assign_split(sample_id, seed),
    )


def _read_tree(root: Path, root_id: str, seed: int, summary: LoadSummary) -> Iterator[Sample]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    top = frozenset(p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1)
    for path in files:
        rel = path.relative_to(root)
        if _is_hidden(rel.parts):
            summary.skipped["hidden"] += 1
            continue
        if not _is_image(rel.name):
            summary.skipped["not an image"] += 1
            continue
        labelled = classify(rel.parts[:-1], root.name, top)
        if labelled is None:
            summary.skipped["outside a label folder"] += 1
            continue
        summary.roots[root_id][labelled.layout] += 1
        yield _sample(f"{root_id}/{rel.as_posix()}", str(path), None, labelled, root.name, seed)


def _read_tar(path: Path, root_id: str, seed: int, summary: LoadSummary) -> Iterator[Sample]:
    with tarfile.open(path, "r:*") as tar:
        names = [info.name for info in tar.getmembers() if info.isfile()]
    stem = path.name.split(".")[0]
    top = frozenset(PurePosixPath(n).parts[0] for n in names if len(PurePosixPath(n).parts) > 1)
    for name in names:
        member = PurePosixPath(name)
        if _is_hidden(member.parts):
            summary.skipped["hidden"] += 1
            continue
        if not _is_image(member.name):
            summary.skipped["not an image"] += 1
            continue
        labelled = classify(member.parts[:-1], stem, top)
        if labelled is None:
            summary.skipped["outside a label folder"] += 1
            continue
        summary.roots[root_id][labelled.layout] += 1
        yield _sample(f"{root_id}/{name}", str(path), name, labelled, stem, seed)


def _manifest_rows(path: Path) -> Iterator[dict[str, str]]:
    if path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield {str(k): "" if v is None else str(v) for k, v in json.loads(line).items()}
        return
    with path.open(newline="", encoding="utf-8") as handle:
        yield from csv.DictReader(handle)


def _read_manifest(path: Path, root_id: str, seed: int, summary: LoadSummary) -> Iterator[Sample]:
    base = path.parent
    for row in _manifest_rows(path):
        rel = (row.get("path") or "").strip()
        label = parse_label(row.get("label", ""))
        if not rel or label is None:
            summary.skipped["manifest row without path or label"] += 1
            continue
        generator = (row.get("generator") or "").strip()
        given_source = (row.get("source") or "").strip()
        folders = PurePosixPath(rel).parts[:-1]
        if label == FAKE:
            name = generator or (folders[-1] if folders else base.name)
            labelled = _Labelled(FAKE, name, None, "manifest", source=given_source or base.name)
        else:
            real_name = generator if generator and generator.lower() != "real" else ""
            name = real_name or (folders[-1] if folders else "") or given_source or base.name
            labelled = _Labelled(REAL, name, None, "manifest")
        split = _SPLIT_DIRS.get((row.get("split") or "").strip().lower()) or (row.get("split") or "").strip()
        if split:
            labelled = _Labelled(labelled.label, labelled.name, split, "manifest", labelled.source)
        summary.roots[root_id]["manifest"] += 1
        file = Path(rel) if Path(rel).is_absolute() else base / rel
        family = (row.get("family") or "").strip() or None
        yield _sample(f"{root_id}/{rel}", str(file), None, labelled, base.name, seed, family)


_Reader = Callable[[Path, str, int, LoadSummary], Iterator[Sample]]


def _root_reader(path: Path) -> tuple[Path, _Reader]:
    if path.is_dir():
        for name in MANIFEST_NAMES:
            if (path / name).is_file():
                return path / name, _read_manifest
        return path, _read_tree
    if _is_tar(path):
        return path, _read_tar
    if path.is_file() and path.suffix.lower() in (".csv", ".jsonl"):
        return path, _read_manifest
    raise ValueError(f"{path}: not a directory, a tar archive or a .csv/.jsonl manifest")


def _root_ids(paths: Sequence[Path]) -> list[str]:
    """A short, stable name per root for sample ids; a later root that shares a name gets ``~2``, ..."""
    ids: list[str] = []
    seen: Counter[str] = Counter()
    for path in paths:
        name = path.name if path.name not in MANIFEST_NAMES else path.parent.name
        seen[name] += 1
        ids.append(name if seen[name] == 1 else f"{name}~{seen[name]}")
    return ids


def subsample(samples: Sequence[Sample], limit_per_group: int, seed: int) -> list[Sample]:
    """At most ``limit_per_group`` samples per (label, generator or source), chosen by a seeded hash.

    Ranking by hash (not shuffling) keeps the choice stable when unrelated samples are added; the result
    keeps the input order.
    """
    groups: dict[tuple[int, str], list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[(sample.label, sample.group)].append(sample)
    keep: set[str] = set()
    for members in groups.values():
        ranked = sorted(members, key=lambda s: _unit_hash(f"subsample:{seed}:{s.id}"))
        keep.update(s.id for s in ranked[:limit_per_group])
    return [s for s in samples if s.id in keep]


def load_samples(
    paths: Iterable[str | Path],
    *,
    seed: int = 0,
    split: str | None = None,
    limit_per_group: int | None = None,
    summary: LoadSummary | None = None,
) -> list[Sample]:
    """Read every data root into one list of samples, in a stable order.

    ``split`` keeps one split (after the seeded assignment for data without splits); ``limit_per_group``
    then subsamples each (label, generator/source) group. Raises ValueError for a path that is not data.
    """
    summary = summary if summary is not None else LoadSummary()
    unique: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ValueError(f"{path}: no such file or directory")
        if path.resolve() not in {p.resolve() for p in unique}:
            unique.append(path)
    samples: list[Sample] = []
    for path, root_id in zip(unique, _root_ids(unique), strict=True):
        source, reader = _root_reader(path)
        summary.roots[root_id] = Counter()
        found = list(reader(source, root_id, seed, summary))
        log.info("eval.data_read", root=str(path), samples=len(found), layouts=dict(summary.roots[root_id]))
        samples.extend(found)
    if summary.skipped:
        log.info("eval.files_skipped", **{k.replace(" ", "_"): v for k, v in summary.skipped.items()})
    if split is not None:
        samples = [s for s in samples if s.split == split]
    if limit_per_group is not None:
        samples = subsample(samples, limit_per_group, seed)
    return samples


class SampleReadError(Exception):
    """A sample's bytes could not be read (missing file, damaged archive, member not found)."""


class SampleReader:
    """Reads samples' bytes; keeps each tar archive open and indexed so members are read on demand."""

    def __init__(self) -> None:
        self._tars: dict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}

    def read(self, sample: Sample) -> bytes:
        try:
            if sample.member is None:
                return Path(sample.path).read_bytes()
            tar, members = self._archive(sample.path)
            handle = tar.extractfile(members[sample.member])
            if handle is None:
                raise SampleReadError(f"{sample.member} is not a regular file")
            return handle.read()
        except SampleReadError:
            raise
        except KeyError:
            raise SampleReadError(f"{sample.path}: no member {sample.member!r}") from None
        except (OSError, tarfile.TarError) as exc:
            raise SampleReadError(f"{sample.path}: {exc}") from None

    def pairs(self, samples: Iterable[Sample]) -> Iterator[tuple[Sample, bytes]]:
        """``(sample, bytes)`` for each readable sample, in order; unreadable ones are logged and left out."""
        for sample in samples:
            try:
                yield sample, self.read(sample)
            except SampleReadError as exc:
                log.warning("eval.read_failed", sample=sample.id, error=str(exc))

    def _archive(self, path: str) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
        if path not in self._tars:
            tar = tarfile.open(path, "r:*")  # noqa: SIM115 - open across reads, closed by close()
            # TarFile.getmember scans the member list on every call; a dict keeps a 15k-member tar linear.
            self._tars[path] = (tar, {info.name: info for info in tar.getmembers()})
        return self._tars[path]

    def close(self) -> None:
        for tar, _ in self._tars.values():
            tar.close()
        self._tars.clear()

    def __enter__(self) -> SampleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_samples(samples: Iterable[Sample]) -> Iterator[tuple[Sample, bytes]]:
    """``(sample, bytes)`` pairs for training code: opens and closes its own reader."""
    with SampleReader() as reader:
        yield from reader.pairs(samples)
