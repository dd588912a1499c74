"""Procedural screenshots in univfd's real class (`streamguard.training.renders`): what a render is, that it
is reproducible from its seed, and that no fold, outer or inner, ever holds one out."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from streamguard.evaluation.datasets import REAL
from streamguard.training.loso import Fold
from streamguard.training.probe_choice import Candidate, Embedded, choose_by_groups
from streamguard.training.renders import SCREENS, SOURCE, render_screen, rendered_samples


def test_a_render_is_a_lossless_screen_reproducible_from_its_seed() -> None:
    first, again, other = render_screen(7), render_screen(7), render_screen(8)
    assert first == again and first != other
    image = Image.open(io.BytesIO(first))
    assert image.format == "PNG" and image.size in SCREENS
    pixels = np.asarray(image.convert("RGB"))
    # Flat fills, as a UI is drawn: most of the screen is a handful of colours...
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    assert np.sort(counts)[::-1][:8].sum() > 0.8 * counts.sum()
    # ...and edges anti-aliased by the 2x supersampling: intermediate shades exist beside the fills.
    assert len(colours) > 30


def test_rendered_samples_are_real_training_images_written_once(tmp_path: Path) -> None:
    samples = rendered_samples(3, seed=5, cache_dir=tmp_path)
    assert [s.label for s in samples] == [REAL] * 3
    assert {s.source for s in samples} == {SOURCE} and {s.split for s in samples} == {"train"}
    assert len({s.id for s in samples}) == 3
    written = Path(samples[0].path)
    stamp = written.stat().st_mtime_ns
    assert rendered_samples(3, seed=5, cache_dir=tmp_path)[0].path == str(written)
    assert written.stat().st_mtime_ns == stamp  # not drawn again
    assert rendered_samples(1, seed=6, cache_dir=tmp_path)[0].id != samples[0].id


def test_renders_stay_in_every_inner_fold() -> None:
    """Extra rows of no data group are fitted on by every inner fold, and never scored as a left-out group."""
    from streamguard.evaluation.datasets import FAKE, Sample

    def sample(name: str, i: int, label: int, split: str = "train") -> Sample:
        return Sample(id=f"r/{name}/{i}{split}", path="x", member=None, label=label,
                      generator="real" if label == REAL else name, family="x",
                      source=name if label == REAL else "r", split=split)

    rng = np.random.default_rng(0)
    train_samples = [sample(f"src{k}", i, REAL) for k in range(3) for i in range(5)] + [
        sample(f"gen{k}", i, FAKE) for k in range(3) for i in range(5)]
    val_samples = [sample(s.group, 0, s.label, "val") for s in train_samples[::5]]
    renders = [sample(SOURCE, i, REAL) for i in range(4)]

    def embedded(samples: list[Sample], mark: float) -> Embedded:
        x = np.concatenate([rng.normal(0, 1, (len(samples), 3)), np.full((len(samples), 1), mark)], axis=1)
        return Embedded(x, np.arange(len(samples)), samples)

    fitted: list[int] = []

    def fit(cand: object, x: np.ndarray, y: np.ndarray) -> object:
        from sklearn.linear_model import LogisticRegression

        fitted.append(int((x[:, -1] == 1.0).sum()))
        return LogisticRegression().fit(x, y)

    folds = [Fold("a", generators=("gen0",), sources=("src0",)), Fold("b", generators=("gen1",), sources=("src1",))]
    chosen = choose_by_groups(embedded(train_samples, 0.0), embedded(val_samples, 0.0), [Candidate(1.0)],
                              lambda x, c: x, fit, {}, folds, extra=embedded(renders, 1.0))
    assert fitted == [4, 4]  # every fold fits on all four renders
    assert chosen is not None
