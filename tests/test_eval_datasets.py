"""Every dataset layout the evaluation harness reads, built small in tmp dirs; and the helpers other
evaluation tests use to build data (brightness encodes the label, so the test detector separates them)."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamguard.evaluation.datasets import (
    LoadSummary,
    Sample,
    SampleReader,
    assign_split,
    family_of,
    load_samples,
    read_samples,
)

DARK, BRIGHT = 0.2, 0.8  # mean brightness of real and fake test images


def picture(brightness: float, size: tuple[int, int] = (40, 32), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.normal(brightness * 255, 12, (size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encoded(
    brightness: float, fmt: str = "PNG", seed: int = 0, size: tuple[int, int] = (40, 32), **options: object
) -> bytes:
    buf = io.BytesIO()
    picture(brightness, size, seed).save(buf, format=fmt, **options)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def labelled_dirs(base: Path, real: str, fake: str, n: int, seed: int = 0) -> None:
    """``n`` dark JPEGs in ``base/real`` and ``n`` bright PNGs in ``base/fake``."""
    for i in range(n):
        write(base / real / f"r{i}.jpg", encoded(DARK, "JPEG", seed + i))
        write(base / fake / f"f{i}.png", encoded(BRIGHT, "PNG", seed + 100 + i))


def cifake_tar(path: Path, n: int) -> Path:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for folder, brightness in (("REAL", DARK), ("FAKE", BRIGHT)):
                data = encoded(brightness, "JPEG", seed=i + (50 if folder == "FAKE" else 0), size=(32, 32))
                info = tarfile.TarInfo(f"{folder}/{1000 + i} ({i % 10 + 1}).jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def manifest_dir(root: Path, n: int, split: str | None = None) -> Path:
    """A wild-train-like folder: manifest.csv with path,label,generator,source,license."""
    rows = ["path,label,generator,source,license"]
    for i in range(n):
        write(root / "ai" / "dalle-mini" / f"a{i}.png", encoded(BRIGHT, "PNG", i))
        write(root / "real" / "imagenet-photos" / f"p{i}.jpg", encoded(DARK, "JPEG", 200 + i))
        rows.append(f"ai/dalle-mini/a{i}.png,ai,dalle-mini,github:x/imagen,none stated")
        rows.append(f"real/imagenet-photos/p{i}.jpg,real,,github:y/imagenet-sample,ImageNet terms")
    if split is not None:
        rows = [rows[0] + ",split"] + [r + f",{split}" for r in rows[1:]]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def by_id(samples: list[Sample]) -> dict[str, Sample]:
    return {s.id: s for s in samples}


def test_cnndetection_layout_with_and_without_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "cnn"
    labelled_dirs(root / "progan" / "airplane", "0_real", "1_fake", 2)
    labelled_dirs(root / "progan" / "cat", "0_real", "1_fake", 1)
    labelled_dirs(root / "stylegan", "0_real", "1_fake", 2)
    summary = LoadSummary()
    samples = load_samples([root], summary=summary)
    assert len(samples) == 10
    assert summary.roots == {"cnn": Counter({"cnndetection": 10})}
    fakes = Counter(s.generator for s in samples if s.label == 1)
    assert fakes == {"progan": 3, "stylegan": 2}
    assert Counter(s.source for s in samples if s.label == 0) == {"progan": 3, "stylegan": 2}
    assert {s.generator for s in samples if s.label == 0} == {"real"}
    assert {s.family for s in samples if s.label == 1} == {"gan"}
    s = by_id(samples)["cnn/progan/airplane/1_fake/f0.png"]
    assert s.path == str(root / "progan/airplane/1_fake/f0.png") and s.member is None
    assert s.split in ("train", "val", "test")


def test_genimage_layout_takes_split_and_imagenet_reals(tmp_path: Path) -> None:
    root = tmp_path / "genimage"
    sub = root / "stable_diffusion_v_1_4" / "imagenet_ai_0419_sdv4"
    labelled_dirs(sub / "train", "nature", "ai", 2)
    labelled_dirs(sub / "val", "nature", "ai", 1)
    labelled_dirs(root / "BigGAN" / "imagenet_ai_0419_biggan" / "val", "nature", "ai", 1)
    samples = load_samples([root])
    assert Counter((s.label, s.generator, s.split) for s in samples) == {
        (0, "real", "train"): 2, (1, "stable_diffusion_v_1_4", "train"): 2,
        (0, "real", "val"): 2, (1, "stable_diffusion_v_1_4", "val"): 1, (1, "BigGAN", "val"): 1,
    }
    assert {s.source for s in samples if s.label == 0} == {"imagenet"}
    assert {s.generator: s.family for s in samples if s.label == 1} == {
        "stable_diffusion_v_1_4": "diffusion", "BigGAN": "gan"}


def test_aigibench_layout_split_then_subset(tmp_path: Path) -> None:
    root = tmp_path / "aigibench"
    labelled_dirs(root / "train" / "SDXL", "0_real", "1_fake", 2)
    labelled_dirs(root / "test" / "FLUX", "0_real", "1_fake", 1)
    summary = LoadSummary()
    samples = load_samples([root], summary=summary)
    assert summary.roots["aigibench"] == {"aigibench": 6}
    assert Counter((s.label, s.generator, s.source, s.split) for s in samples) == {
        (0, "real", "SDXL", "train"): 2, (1, "SDXL", "aigibench", "train"): 2,
        (0, "real", "FLUX", "test"): 1, (1, "FLUX", "aigibench", "test"): 1,
    }
    assert load_samples([root], split="test") == [s for s in samples if s.split == "test"]


def test_simple_layouts(tmp_path: Path) -> None:
    flat = tmp_path / "mydata"
    labelled_dirs(flat, "real", "fake", 2)
    nested = tmp_path / "nested"
    labelled_dirs(nested, "real/flickr", "ai/midjourney", 1)
    write(flat / "notes.txt", b"not an image")
    write(flat / "fake" / "._f0.png", b"resource fork")
    write(flat / "unlabelled" / "x.png", encoded(0.5))
    summary = LoadSummary()
    samples = load_samples([flat, nested], summary=summary)
    assert Counter((s.label, s.generator, s.source) for s in samples) == {
        (0, "real", "mydata"): 2, (1, "mydata", "mydata"): 2,
        (0, "real", "flickr"): 1, (1, "midjourney", "nested"): 1,
    }
    assert summary.skipped == {"not an image": 1, "outside a label folder": 1, "hidden": 1}
    assert {s.family for s in samples if s.generator == "midjourney"} == {"diffusion"}


def test_cifake_tar_read_in_place(tmp_path: Path) -> None:
    tar = cifake_tar(tmp_path / "cifake-train.tar", 4)
    samples = load_samples([tar])
    assert len(samples) == 8
    assert Counter((s.label, s.generator, s.source, s.family) for s in samples) == {
        (0, "real", "cifar10", "real"): 4, (1, "stable-diffusion-1.4", "cifake", "diffusion"): 4,
    }
    s = by_id(samples)["cifake-train.tar/FAKE/1002 (3).jpg"]
    assert s.path == str(tar) and s.member == "FAKE/1002 (3).jpg"
    with tarfile.open(tar) as handle:
        expected = handle.extractfile("FAKE/1002 (3).jpg").read()  # type: ignore[union-attr]
    with SampleReader() as reader:
        assert reader.read(s) == expected
    assert [smp for smp, _ in read_samples(samples)] == samples
    assert not list(tmp_path.glob("REAL")), "the archive must not be unpacked"


def test_tar_of_a_directory_layout_reads_like_the_directory(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    labelled_dirs(root / "progan", "0_real", "1_fake", 2)
    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "progan", arcname="progan")
    from_dir = load_samples([root])
    from_tar = load_samples([archive])
    assert [(s.label, s.generator, s.source, s.family) for s in from_tar] == [
        (s.label, s.generator, s.source, s.family) for s in from_dir]
    assert [s.member for s in from_tar] == [s.id.removeprefix("tree/") for s in from_dir]


def test_manifest_csv_directory_and_file(tmp_path: Path) -> None:
    root = manifest_dir(tmp_path / "wild", 3)
    labelled_dirs(root / "extra", "0_real", "1_fake", 1)  # not in the manifest: the manifest wins
    summary = LoadSummary()
    samples = load_samples([root], summary=summary)
    assert summary.roots == {"wild": Counter({"manifest": 6})}
    assert Counter((s.label, s.generator, s.source) for s in samples) == {
        (1, "dalle-mini", "github:x/imagen"): 3, (0, "real", "imagenet-photos"): 3,
    }
    assert {s.family for s in samples if s.label == 1} == {"autoregressive"}
    assert load_samples([root / "manifest.csv"]) == samples
    assert by_id(samples)["wild/ai/dalle-mini/a0.png"].path == str(root / "ai/dalle-mini/a0.png")


def test_manifest_jsonl_labels_splits_and_families(tmp_path: Path) -> None:
    write(tmp_path / "img" / "a.png", encoded(BRIGHT))
    write(tmp_path / "img" / "b.png", encoded(DARK))
    rows = [
        {"path": "img/a.png", "label": 1, "generator": "my-gen", "split": "validation", "family": "flow"},
        {"path": "img/b.png", "label": "real", "generator": "", "source": "phone-photos"},
        {"path": "img/c.png", "label": "maybe", "generator": "x"},
    ]
    manifest = tmp_path / "list.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = LoadSummary()
    a, b = load_samples([manifest], summary=summary)
    assert (a.label, a.generator, a.family, a.split) == (1, "my-gen", "flow", "val")
    assert (b.label, b.generator, b.source) == (0, "real", "img")  # the folder names it before the repo column
    assert summary.skipped == {"manifest row without path or label": 1}


def test_split_assignment_is_seeded_and_stable() -> None:
    ids = [f"root/x/{i}.png" for i in range(2000)]
    splits = [assign_split(i, seed=0) for i in ids]
    assert splits == [assign_split(i, seed=0) for i in ids]
    counts = Counter(splits)
    assert 1500 < counts["train"] < 1700 and 140 < counts["val"] < 260 and 140 < counts["test"] < 260
    assert splits != [assign_split(i, seed=1) for i in ids]


def test_limit_per_group_is_seeded_per_label_and_generator(tmp_path: Path) -> None:
    root = tmp_path / "cnn"
    labelled_dirs(root / "progan", "0_real", "1_fake", 6)
    labelled_dirs(root / "stylegan", "0_real", "1_fake", 2)
    picked = load_samples([root], limit_per_group=3, seed=7)
    assert Counter((s.label, s.group) for s in picked) == {
        (0, "progan"): 3, (1, "progan"): 3, (0, "stylegan"): 2, (1, "stylegan"): 2}
    assert picked == load_samples([root], limit_per_group=3, seed=7)
    everything = load_samples([root], seed=7)
    assert [s for s in everything if s in picked] == picked  # input order kept
    choices = {tuple(s.id for s in load_samples([root], limit_per_group=3, seed=seed)) for seed in range(6)}
    assert len(choices) > 1


def test_unreadable_and_missing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        load_samples([tmp_path / "nope"])
    bogus = write(tmp_path / "data.bin", b"xx")
    with pytest.raises(ValueError, match="not a directory, a tar archive"):
        load_samples([bogus])
    root = tmp_path / "d"
    labelled_dirs(root, "real", "fake", 1)
    samples = load_samples([root])
    (root / "real" / "r0.jpg").unlink()
    assert [s.label for s, _ in read_samples(samples)] == [1]


def test_family_rules() -> None:
    assert family_of("real") == "real"
    assert family_of("dalle-mini") == "autoregressive"
    assert family_of("DALLE-3") == "diffusion"
    assert family_of("stylegan2") == "gan"
    assert family_of("vqgan-clip") == "gan"
    assert family_of("glid-3-xl") == "diffusion"
    assert family_of("stable-diffusion-1.4") == "diffusion"
    assert family_of("whatever") == "unknown"
