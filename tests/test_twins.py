"""How twins join univfd's training (`streamguard.training.twins`): the images chosen are the same in every
fold, a twin keeps its image's label and leaves with its group, and a held-out group's images never reach
training as twins; with the renders, the one end-to-end training run of univfd's extra rows. The fine-tuned
detectors take renders and feed twins as files (`twin_files`, `Recipe.extra_training`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from images import drawn_face, tiny_root
from streamguard.config import load_settings
from streamguard.evaluation.datasets import FAKE, REAL, Sample, load_samples
from streamguard.training.data import is_held_out
from streamguard.training.loso import LosoConfig, run_settings
from streamguard.training.memes import MEME_VERSION, Meme
from streamguard.training.night import NIGHT_VERSION, NightMode
from streamguard.training.portraits import PORTRAIT_VERSION, PortraitCrop
from streamguard.training.renders import FEED_VERSION, RENDER_VERSION, SOURCE as RENDERS, FeedPost
from streamguard.training.recipe import Recipe
from streamguard.training.twins import asked_twins, twin_files, twin_of, twin_photos, twin_settings
from streamguard.training.univfd import TrainConfig, train_univfd


def sample(sid: str, source: str, label: int = REAL) -> Sample:
    return Sample(id=sid, path=f"{sid}.png", member=None, label=label, generator="real" if label == REAL else "g",
                  family="real" if label == REAL else "diffusion", source=source, split="train")


def test_the_chosen_photos_are_seeded_and_do_not_depend_on_order() -> None:
    photos = [sample(f"p{i:02d}", f"src{i % 3}") for i in range(20)]
    chosen = twin_photos(photos, 5, seed=0)
    assert len(chosen) == 5 and chosen == twin_photos(list(reversed(photos)), 5, seed=0)
    assert chosen != twin_photos(photos, 5, seed=1)
    assert twin_photos(photos, 50, seed=0) == sorted(photos, key=lambda s: s.id)  # all, when asked for more
    with pytest.raises(ValueError, match="one class's images at a time"):
        twin_photos(photos + [sample("f", "gen", FAKE)], 5, seed=0)
    fakes = [sample(f"f{i:02d}", "gen", FAKE) for i in range(8)]
    assert len(twin_photos(fakes, 3, seed=0)) == 3


@pytest.mark.parametrize("maker", [NightMode(), FeedPost()], ids=["night", "feed"])
def test_a_twin_is_real_and_leaves_with_its_photos_source(maker: NightMode | FeedPost) -> None:
    twin = twin_of(sample("root/p1", "phones"), maker)
    assert twin.id == "root/p1" + maker.suffix and twin.label == REAL and twin.source == "phones"
    assert is_held_out(twin, (), ("phones",)) and not is_held_out(twin, (), ("other",))


def test_a_generated_images_feed_post_stays_generated_and_leaves_with_its_generator() -> None:
    twin = twin_of(sample("root/g1", "gen", FAKE), FeedPost())
    assert twin.label == FAKE and twin.generator == "g"
    assert is_held_out(twin, ("g",), ()) and not is_held_out(twin, ("other",), ())


def test_the_twins_asked_for_are_recorded_with_their_recipes() -> None:
    asked = asked_twins(night=4, feed=2, feed_fake=1)
    assert [(kind.name, kind.count, kind.label) for kind in asked] == [
        ("night", 4, REAL), ("feed", 2, REAL), ("feed_fake", 1, FAKE)]
    assert twin_settings(asked) == {"night_twins": [4, NIGHT_VERSION], "feed_twins": [2, FEED_VERSION],
                                    "feed_fake_twins": [1, FEED_VERSION]}
    assert twin_settings(asked_twins(feed=3)) == {"feed_twins": [3, FEED_VERSION]}  # none asked, none recorded
    # Memes come in both classes at once: a caption must be a cue to neither.
    memes = asked_twins(meme=5)
    assert [(kind.name, kind.count, kind.label) for kind in memes] == [("meme", 5, REAL), ("meme_fake", 5, FAKE)]
    assert twin_settings(memes) == {"meme_twins": [5, MEME_VERSION], "meme_fake_twins": [5, MEME_VERSION]}
    with pytest.raises(ValueError, match="feed_twins must be 0 or more"):
        asked_twins(feed=-1)
    with pytest.raises(ValueError, match="feed_fake_twins must be 0 or more"):
        asked_twins(feed_fake=-1)
    with pytest.raises(ValueError, match="meme_twins must be 0 or more"):
        asked_twins(meme=-1)


def test_train_univfd_with_renders_and_twins_end_to_end(tmp_path: Path) -> None:
    """Real training code and backbone on a tiny root: renders, night, feed and portrait twins join the real
    class together, generated feed posts the generated class and memes each class, none of the twins is made of
    a held-out group's images, all are recorded in the weights' meta, and the held-out scores hold none of them."""
    tiny_root(tmp_path / "d")
    for source in ("real0", "real1"):  # one train photo of each real source shows a face: the portraits' only
        drawn_face().save(tmp_path / "d" / source / "1.png")
    out = tmp_path / "weights"
    report = train_univfd(load_settings(), TrainConfig(
        data=(str(tmp_path / "d"),), out=out, holdout_sources=("real0",), holdout_generators=("ai0",),
        rendered_screens=3, night_twins=6, feed_twins=6, feed_fake_twins=6, portrait_twins=2, meme_twins=6,
        augment_draws=1, cache_dir=tmp_path / "cache"))
    counts = report["counts"]
    assert counts["rendered"] == 3  # type: ignore[index]
    # All six train images of a class chosen; the held-out group's three left, with their twins of every kind.
    assert counts["night"] == 3 and counts["feed"] == 3 and counts["feed_fake"] == 3  # type: ignore[index]
    assert counts["portrait"] == 1  # type: ignore[index]  # both faces chosen (no other photo), real0's left
    assert counts["meme"] == 3 and counts["meme_fake"] == 3  # type: ignore[index]
    assert counts["train"] == 6  # type: ignore[index]  # real1's and ai1's three
    assert report["train_rows"] == 6 + 3 + 3 + 3 + 3 + 1 + 3 + 3  # fitted on, one row each
    meta = json.loads((out / "meta.json").read_text())
    assert meta["rendered_screens"] == [3, RENDER_VERSION]
    assert meta["night_twins"] == [6, NIGHT_VERSION] and meta["feed_twins"] == [6, FEED_VERSION]
    assert meta["feed_fake_twins"] == [6, FEED_VERSION] and meta["portrait_twins"] == [2, PORTRAIT_VERSION]
    assert meta["meme_twins"] == [6, MEME_VERSION] and meta["meme_fake_twins"] == [6, MEME_VERSION]
    held = json.loads((out / "held_out.json").read_text())
    twins = (NightMode.suffix, FeedPost.suffix, PortraitCrop.suffix, Meme.suffix, RENDERS)
    assert held["scores"] and not any(mark in str(s) for s in held["scores"] for mark in twins)


@pytest.mark.parametrize(("field", "version", "refusal"), [
    ("night_twins", NIGHT_VERSION, "night-mode twins are for the probe methods"),
    ("feed_fake_twins", FEED_VERSION, "generated feed twins are for the probe methods"),
    ("portrait_twins", PORTRAIT_VERSION, "portrait twins are for the probe methods"),
    ("meme_twins", MEME_VERSION, "meme twins are for the probe methods"),
])
def test_loso_folds_record_extra_rows_and_only_probes_take_them(tmp_path: Path, field: str, version: int,
                                                                     refusal: str) -> None:
    base = {"data": ("d",), "loso_data": ("d",), "out": tmp_path}
    plain = LosoConfig(**base, methods=("univfd-blocks",))  # type: ignore[arg-type]
    extra = LosoConfig(**base, methods=("univfd-blocks", "pin-clip"), **{field: 50})  # type: ignore[arg-type]
    assert field not in run_settings(plain, "univfd-blocks")
    assert run_settings(extra, "univfd-blocks")[field] == [50, version]  # a changed recipe trains again
    assert field not in run_settings(extra, "pin-clip")
    with pytest.raises(ValueError, match=refusal):
        LosoConfig(**base, methods=("pin-clip",), **{field: 5})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be 0 or more"):
        LosoConfig(**base, methods=("univfd-blocks",), **{field: -1})  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "version"), [("rendered_screens", RENDER_VERSION), ("feed_twins", FEED_VERSION)])
def test_loso_folds_of_the_fine_tuned_methods_take_renders_and_feed_twins(tmp_path: Path, field: str,
                                                                          version: int) -> None:
    base = {"data": ("d",), "loso_data": ("d",), "out": tmp_path}
    for method in ("pin-clip", "mpft", "univfd-blocks"):
        assert field not in run_settings(LosoConfig(**base, methods=(method,)), method)  # type: ignore[arg-type]
        extra = LosoConfig(**base, methods=(method,), **{field: 50})  # type: ignore[arg-type]
        assert run_settings(extra, method)[field] == [50, version]  # a changed recipe trains again
    with pytest.raises(ValueError, match="for the probe and fine-tuned methods"):
        LosoConfig(**base, methods=("nirnet",), **{field: 5})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be 0 or more"):
        LosoConfig(**base, methods=("pin-clip",), **{field: -1})  # type: ignore[arg-type]


def test_twin_files_are_written_once_and_leave_training_with_their_photo(tmp_path: Path) -> None:
    """The fine-tuned detectors read twins from disk: each a file of its photo's label and group, made once,
    drawn as a probe draws them (whatever is held out), and never held out itself."""
    root = tiny_root(tmp_path / "d")
    (root / "real1" / "2.png").write_bytes(b"not an image")  # no twin can be made of it: left out, logged
    samples = load_samples([str(root)], seed=0)
    cache = tmp_path / "cache"
    twins = twin_files(asked_twins(feed=6), samples, seed=0, cache_dir=cache)
    photos = {s.id: s for s in samples}
    assert len(twins) == 5  # the six real train photos, less the unreadable one
    assert [t.id.removesuffix(FeedPost.suffix) for t in twins] == [
        s.id for s in twin_photos([s for s in samples if s.split == "train" and s.label == REAL], 6, 0)
        if not s.id.endswith("real1/2.png")]
    for twin in twins:
        photo = photos[twin.id.removesuffix(FeedPost.suffix)]
        assert (twin.label, twin.source, twin.split, twin.member) == (REAL, photo.source, "train", None)
        assert Path(twin.path).parent == cache / f"twins-{FeedPost.version}"
        assert Path(twin.path).read_bytes() == FeedPost()(Path(photo.path).read_bytes())
    stamps = {t.path: Path(t.path).stat().st_mtime_ns for t in twins}
    assert twin_files(asked_twins(feed=6), samples, seed=0, cache_dir=cache) == twins
    assert {t.path: Path(t.path).stat().st_mtime_ns for t in twins} == stamps  # read back, not made again
    recipe = Recipe(method="pin-clip", data=(str(root),), out=tmp_path / "w", cache_dir=cache, feed_twins=6,
                    rendered_screens=2, holdout_sources=("real0",))
    extra = recipe.extra_training(samples)
    assert sorted(s.source for s in extra) == sorted([RENDERS] * 2 + ["real1"] * 2)  # real0's twins left with it
    splits = recipe.splits(samples)
    assert set(splits.train) >= set(extra)
    data_ids = {s.id for s in samples}
    assert {s.source for s in splits.held_out} == {"real0"} and {s.id for s in splits.held_out} <= data_ids
    assert {s.id for s in splits.test} <= data_ids and {s.id for s in splits.val} <= data_ids
    assert recipe.fingerprint()["feed_twins"] == [6, FEED_VERSION]
    assert recipe.fingerprint()["rendered_screens"] == [2, RENDER_VERSION]
    assert "--rendered-screens 2 --feed-twins 6" in recipe.command()
    plain = Recipe(method="pin-clip", data=(str(root),), out=tmp_path / "w")
    assert "feed_twins" not in plain.fingerprint() and "rendered_screens" not in plain.fingerprint()
    assert plain.extra_training(samples) == []
    with pytest.raises(ValueError, match="rendered_screens must be 0 or more"):
        Recipe(method="pin-clip", data=(str(root),), out=tmp_path / "w", rendered_screens=-1)
    with pytest.raises(ValueError, match="feed_twins must be 0 or more"):
        Recipe(method="pin-clip", data=(str(root),), out=tmp_path / "w", feed_twins=-1)
