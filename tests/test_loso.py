"""Leave-one-source-out validation (`streamguard train loso`) on a tiny CLIP and images the tests make."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from streamguard.cli import cli
from streamguard.config import load_settings
from streamguard.training.held_out import load_held_out, load_variant_scores
from streamguard.evaluation.datasets import Sample
from streamguard.evaluation.selection import Scored, choose_thresholds, choose_weights, fuse
from streamguard.training.loso import Fold, choose_fusion, groups_of, plan_folds, pool_groups, read_unseen_scores
from streamguard.training.loso_views import unseen_logits
from test_training_cli import _env, backbone, scan, smooth, textured, write_dataset  # noqa: F401 - the fixture
from test_training_units import _sample

# Two real sources and two generators; the 2 test images of each must never reach the LOSO pools.
GROUPS = (("photos", "real"), ("scans", "real"), ("noisegen", "ai"), ("blockgen", "ai"))
COUNTS = {"train": 8, "val": 3, "test": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def images() -> Iterator[tuple[str, str, str, int, Image.Image]]:
        seed = 5000
        for name, label in GROUPS:
            for split, count in COUNTS.items():
                for _ in range(count):
                    seed += 1
                    if label == "real":
                        image = smooth(seed, size=64 if name == "scans" else 96)
                    else:
                        image = textured(seed, block=1 if name == "noisegen" else 4)
                    yield name, label, split, seed, image

    return write_dataset(tmp_path_factory.mktemp("loso-data"), images())


def loso(dataset: Path, out: Path, cache: Path, backbone: Path, *extra: str) -> Result:
    args = ["train", "loso", "--data", str(dataset), "--loso-data", str(dataset), "--out", str(out),
            "--cache-dir", str(cache), "--method", "univfd", "--method", "mpft", "--folds", "2", "--epochs", "2",
            "--no-progress", *extra]
    return CliRunner().invoke(cli, args, env=_env(backbone, STREAMGUARD_LOG__LEVEL="info"))


def _events(result: Result, name: str) -> list[dict[str, Any]]:
    out = []
    for line in result.stderr.splitlines():
        if line.startswith("{") and json.loads(line).get("event") == name:
            out.append(json.loads(line))
    return out


def loso_variants(dataset: Path, out: Path, backbone: Path, *extra: str, **env: str) -> Result:
    """`train loso-variants` of the run in ``out``; fails the test unless it succeeded."""
    args = ["train", "loso-variants", "--data", str(dataset), "--loso-data", str(dataset), "--out", str(out), *extra]
    result = CliRunner().invoke(cli, args, env=_env(backbone, **env))
    assert result.exit_code == 0, f"{result.output}\n{result.stderr}\n{result.exception!r}"
    return result


def test_folds_keep_real_sources_apart_and_balance_sizes() -> None:
    groups = {"imagenet": ("source", 130), "bsd": ("source", 90), "ld": ("generator", 135),
              "dalle": ("generator", 136), "sg2": ("generator", 54), "vq": ("generator", 38)}
    folds = plan_folds(groups, 3)
    assert sorted(g for f in folds for g in (*f.generators, *f.sources)) == sorted(groups)
    assert all(len(f.sources) <= 1 for f in folds)
    sizes = [sum(groups[g][1] for g in (*f.generators, *f.sources)) for f in folds]
    assert max(sizes) - min(sizes) <= 60
    assert plan_folds(groups, 3) == folds
    # By default one group per fold: real sources first, then generators by size.
    assert plan_folds(groups) == [Fold("imagenet", sources=("imagenet",)), Fold("bsd", sources=("bsd",)),
                                  Fold("dalle", ("dalle",)), Fold("ld", ("ld",)), Fold("sg2", ("sg2",)),
                                  Fold("vq", ("vq",))]
    with pytest.raises(ValueError, match="folds must be between 1 and"):
        plan_folds(groups, 7)


def test_groups_count_images_outside_the_test_split() -> None:
    samples = [_sample("r1", 0, "real", "photos", "train"), _sample("r2", 0, "real", "photos", "test"),
               _sample("f1", 1, "gan", "set", "val")]
    assert groups_of(samples) == {"photos": ("source", 1), "gan": ("generator", 1)}


def _many(prefix: str, n: int, label: int, generator: str, source: str, family: str) -> list[Sample]:
    return [Sample(id=f"{prefix}{i}", path="x", member=None, label=label, generator=generator, family=family,
                   source=source, split="train") for i in range(n)]


def test_small_groups_are_pooled_by_family_and_held_out_together() -> None:
    samples = [*_many("a", 30, 0, "real", "phones", "real"), *_many("b", 3, 0, "real", "docs", "real"),
               *_many("c", 1, 0, "real", "fivek", "real"),
               *_many("d", 40, 1, "sd", "x", "diffusion"), *_many("e", 5, 1, "dit", "x", "diffusion"),
               *_many("f", 4, 1, "pixart", "x", "diffusion"), *_many("g", 2, 1, "hart", "x", "unknown"),
               *_many("h", 3, 1, "cogview", "x", "autoregressive")]
    pools = pool_groups(samples, min_images=8)
    assert pools["phones"] == "phones" and pools["sd"] == "sd"
    assert pools["docs"] == pools["fivek"] == "small-real"
    assert pools["dit"] == pools["pixart"] == "small-diffusion"  # 9 images together: a pool of useful size
    # Too few autoregressive ones for a pool of their own: they join the generators of unknown family.
    assert pools["hart"] == pools["cogview"] == "small-other"
    folds = plan_folds(groups_of(samples), None, pools)
    assert [f.name for f in folds] == ["phones", "small-real", "sd", "small-diffusion", "small-other"]
    assert folds[1].sources == ("docs", "fivek")
    assert folds[3].generators == ("dit", "pixart")


def test_loso_end_to_end(dataset: Path, backbone: Path, tmp_path: Path) -> None:
    out, cache = tmp_path / "loso", tmp_path / "cache"
    # One fold first, as after a crash: the full run then trains only the other fold.
    first = loso(dataset, out, cache, backbone, "--fold", "photos+blockgen")
    assert first.exit_code == 0, f"{first.output}\n{first.stderr}\n{first.exception!r}"
    assert json.loads(first.stdout)["trained"] == ["photos+blockgen"]
    assert not (out / "loso.json").exists()
    result = loso(dataset, out, cache, backbone)
    assert result.exit_code == 0, f"{result.output}\n{result.stderr}\n{result.exception!r}"
    assert {(e["method"], e["fold"]) for e in _events(result, "loso.fold_done_before")} == {
        ("univfd", "photos+blockgen"), ("mpft", "photos+blockgen")}
    assert {(e["method"], e["fold"]) for e in _events(result, "loso.fold_start")} == {
        ("univfd", "scans+noisegen"), ("mpft", "scans+noisegen")}

    report = json.loads((out / "loso.json").read_text())
    assert [f["name"] for f in report["folds"]] == ["photos+blockgen", "scans+noisegen"]
    # Every non-test image of every group, each scored once by the fold that held its group out.
    assert report["images"] == 4 * (COUNTS["train"] + COUNTS["val"])
    for method in ("univfd", "mpft"):
        for fold in report["folds"]:
            holdout, scores = load_held_out(out / method / fold["name"])
            held = set(fold["generators"]) | set(fold["sources"])
            assert holdout == {"generators": fold["generators"], "sources": fold["sources"]}
            assert {s.group for s in scores} == held
            assert len(scores) == len(held) * sum(COUNTS.values())  # test split scored, left out of the pools
            training = json.loads((out / method / fold["name"] / "training.json").read_text())
            assert training["holdout"] == holdout
    for name in ("univfd", "mpft", "fused", "fused-equal"):
        groups = report["detectors"][name]["groups"]
        assert {g: r["n"] for g, r in groups.items()} == {g: 11 for g, _ in GROUPS}
    weights = report["weights"]["weights"]
    assert set(weights) == {"univfd", "mpft"} and sum(weights.values()) == pytest.approx(1.0)
    t = report["thresholds"]
    fused = report["detectors"]["fused"]["groups"]
    worst = max(fused[g]["ai_generated"] for g in ("photos", "scans"))
    assert worst == pytest.approx(t["worst_false_flag"], abs=1e-4)
    assert worst <= 0.02 or not t["ai_target_met"]
    # The chosen settings load as the product's own configuration.
    settings = load_settings(**report["settings"])
    chosen = settings.fusion.weights
    assert settings.policy.ai_threshold == t["ai_threshold"]
    assert chosen["univfd"] + chosen["mpft"] == pytest.approx(2.0)  # scaled to average 1, the default weight
    assert chosen["univfd"] / 2 == pytest.approx(weights["univfd"], abs=1e-4)
    assert "Verdicts of fused under the chosen policy" in result.stdout
    # Each group's AUC against the other class: a kind's groups average to the balanced AUC, so the table's
    # costs name where it is lost.
    for kind in ("real", "ai"):
        aucs = [row["auc"] for row in fused.values() if row["kind"] == kind]
        assert np.mean(aucs) == pytest.approx(report["detectors"]["fused"]["balanced_auc"], abs=1e-4)
    assert "| group | ai_generated | uncertain | real | AUC against the other class | cost |" in result.stdout
    # The rule carried to each group it was not chosen on: every group once, under the pool's rule.
    carried = {c["group"]: c for c in report["policy_carry_over"]}
    assert set(carried) == {g for g, _ in GROUPS}
    assert {c["kind"] for c in carried.values()} == {"real", "ai"}
    assert "Chosen without each group in turn: real sources over 2% flagged:" in result.stdout
    # The fused ranking with every group unseen by the fusion's choice too, printed beside the pool's.
    assert 0.5 < report["carried_over_auc"] <= 1.0
    assert (f"without both: {report['carried_over_auc']:.4f} (chosen with them: "
            f"{report['detectors']['fused']['balanced_auc']})") in result.stdout
    # What each missed aim would cost the thresholds, beside the chosen policy they start from.
    points = report["operating_points"]
    assert set(points) == {"chosen", "flagged_aim", "uncertain_aim"}
    assert (points["chosen"]["ai_threshold"], points["chosen"]["real_threshold"]) == (t["ai_threshold"],
                                                                                       t["real_threshold"])
    assert points["chosen"]["uncertain"] == report["uncertain_share"]
    assert "What the thresholds alone would have to give up for each aim:" in result.stdout
    # univfd's held-out scores are what its fold's probe says of the original bytes through `scan`.
    _, held = load_held_out(out / "univfd" / "scans+noisegen")
    files = {Path(s.id).name: s for s in held[:6]}
    served = scan(backbone, "univfd", out / "univfd" / "scans+noisegen",
                  *(dataset / s.group / name for name, s in files.items()))
    for name, s in files.items():
        assert 1 / (1 + math.exp(-s.logit)) == pytest.approx(served[name], abs=1e-4)
    assert np.isfinite(report["detectors"]["fused"]["balanced_auc"])
    intervals = report["auc_intervals"]
    assert set(intervals) == {"univfd", "mpft", "univfd - mpft"}
    assert intervals["univfd"]["value"] == report["detectors"]["univfd"]["balanced_auc"]
    assert all(iv["low"] <= iv["value"] <= iv["high"] for iv in intervals.values())

    # The fold models scored again under other views and perturbations, through the serving path.
    loso_variants(dataset, out, backbone, "--method", "univfd", "--folds", "2", "--variant", "crops2+whole",
                  "--variant", "resize@jpeg75")
    compared = json.loads((out / "loso-variants.univfd.json").read_text())
    assert list(compared["variants"]) == ["resize", "crops2+whole", "resize@jpeg75"]
    assert compared["images"] == report["images"]
    # The reference variant re-scores the original bytes with the shipped contract: held_out.json again.
    for fold in report["folds"]:
        _, base = load_held_out(out / "univfd" / fold["name"])
        again = json.loads((out / "univfd" / fold["name"] / "held_out.resize.json").read_text())["scores"]
        expected = {b.id: b.logit for b in base if b.split != "test"}
        assert {r["id"]: pytest.approx(expected[r["id"]], abs=1e-4) for r in again} == expected
        crops = json.loads((out / "univfd" / fold["name"] / "held_out.crops2_whole.json").read_text())["scores"]
        assert sorted(r["id"] for r in crops) == sorted(expected)
        # These images are 64-96 px, too small for a 224-px crop: univfd judges them on their resized view, in
        # the LOSO machinery as in the worker (tests/test_trunk.py scores real crops).
        assert {r["id"]: pytest.approx(r["logit"], abs=1e-4) for r in crops} == expected
    assert set(compared["variants"]["crops2+whole"]["accuracy_change"]) == {g for g, _ in GROUPS}
    for name in ("crops2+whole", "resize@jpeg75"):  # a paired interval around each change
        low, high = compared["variants"][name]["auc_change_interval"]
        assert low <= compared["variants"][name]["auc_change"] <= high
    assert "auc_change_interval" not in compared["variants"]["resize"]

    # The same fold models on the shared trunk at a faster serving: ONNX Runtime at fp32 gives the reference's
    # scores; a run with a per-group limit is extended, not redone, by a run without one.
    def serving(*extra: str) -> dict[str, Any]:
        loso_variants(dataset, out, backbone, "--method", "univfd", "--variant", "resize:ort-fp32", "--variant",
                      "resize:ort-int8-mixed", *extra, STREAMGUARD_BACKBONE__CACHE_DIR=str(tmp_path / "backbone-cache"))
        return json.loads((out / "loso-variants.univfd.json").read_text())

    first = json.loads((out / "univfd" / report["folds"][0]["name"] / "held_out.resize.json").read_text())["scores"]
    assert serving("--limit-per-group", "1")["images"] < report["images"]
    fold = out / "univfd" / report["folds"][0]["name"]
    few = {r["id"]: r["logit"] for r in json.loads((fold / "held_out.resize_ort-int8-mixed.json").read_text())["scores"]}
    assert few
    served = serving()
    assert served["images"] == report["images"]
    assert list(served["variants"]) == ["resize", "resize:ort-fp32", "resize:ort-int8-mixed"]
    ort = json.loads((fold / "held_out.resize_ort-fp32.json").read_text())
    assert ort["version"].endswith(".ort-fp32")
    assert {r["id"]: r["logit"] for r in ort["scores"]} == {
        r["id"]: pytest.approx(r["logit"], abs=1e-4) for r in first}
    quantized = json.loads((fold / "held_out.resize_ort-int8-mixed.json").read_text())
    assert quantized["version"].endswith(".ort-int8-mixed") and len(quantized["scores"]) == len(first)
    assert {r["id"]: r["logit"] for r in quantized["scores"] if r["id"] in few} == few  # kept, not scored again

    # A detector that was not retrained per fold joins by its `eval` scores on images it never saw: the report
    # covers the images every detector scored, and fusion weighs it too.
    rows = ["id,path,member,label,generator,family,source,split,perturbation,score,error"]
    everyone = [s for f in report["folds"] for s in load_held_out(out / "univfd" / f["name"])[1] if s.split != "test"]
    unseen = [s for s in everyone if s.label == 0][:3] + [s for s in everyone if s.label == 1][:3]
    for s in unseen:
        for perturbation, p in (("none", 0.9 if s.label else 0.2), ("jpeg75", 0.5)):  # perturbed rows: not pooled
            rows.append(f"{s.id},x,,{s.label},{s.generator},unknown,{s.source},{s.split},{perturbation},{p},")
    (tmp_path / "scores.csv").write_text("\n".join(rows) + "\n")
    extra = loso(dataset, out, cache, backbone, "--unseen-scores", f"oracle={tmp_path / 'scores.csv'}",
                 "--report", "with-oracle.json")
    assert extra.exit_code == 0, f"{extra.output}\n{extra.stderr}\n{extra.exception!r}"
    joined = json.loads((out / "with-oracle.json").read_text())
    assert joined["images"] == len(unseen) and set(joined["weights"]["weights"]) == {"univfd", "mpft", "oracle"}
    assert json.loads((out / "loso.json").read_text())["images"] == report["images"]  # the first report stays
    # Another loso run's method folder joins the same way (a method packed into fewer folds): its held-out
    # scores outside the test split, as its folds stored them. Here the run's own univfd, under another name.
    packed = loso(dataset, out, cache, backbone, "--unseen-scores", f"univfd-packed={out / 'univfd'}",
                  "--report", "with-packed.json")
    assert packed.exit_code == 0, f"{packed.output}\n{packed.stderr}\n{packed.exception!r}"
    with_packed = json.loads((out / "with-packed.json").read_text())
    assert with_packed["images"] == report["images"]
    assert set(with_packed["weights"]["weights"]) == {"univfd", "mpft", "univfd-packed"}
    assert with_packed["unseen_scores"] == {"univfd-packed": str(out / "univfd")}
    assert sorted(read_unseen_scores(out / "univfd"), key=lambda s: s.id) == sorted(everyone, key=lambda s: s.id)
    with pytest.raises(ValueError, match="no fold with a held_out.json"):
        read_unseen_scores(tmp_path)
    # Under a view, the folder's scores are those its own loso-variants run gave that view: here its
    # crops2+whole files, shifted by one so they cannot pass for the resized view's.
    shifted = tmp_path / "shifted" / "univfd"
    shutil.copytree(out / "univfd", shifted)
    for f in report["folds"]:
        path = shifted / f["name"] / "held_out.crops2_whole.json"
        payload = json.loads(path.read_text())
        payload["scores"] = [{**r, "logit": r["logit"] + 1.0} for r in payload["scores"]]
        path.write_text(json.dumps(payload))
    assert {s.id: s.logit for s in read_unseen_scores(shifted, "crops2+whole")} == {
        s.id: pytest.approx(s.logit + 1.0, abs=2e-4) for s in everyone}
    with pytest.raises(ValueError, match="has no scores under view crops3"):
        read_unseen_scores(shifted, "crops3")
    # A report's fused verdict under a perturbation: the fold models' perturbed scores with the unseen
    # detector's perturbed eval rows, weighted and recalibrated as that report chose. loso.json does not
    # weigh the oracle: its fusion leaves it out and covers every held-out image.
    again = loso_variants(dataset, out, backbone, "--method", "univfd", "--folds", "2", "--variant", "resize@jpeg75",
                          "--report", "with-oracle.json", "--unseen-scores", f"oracle={tmp_path / 'scores.csv'}")
    fused = json.loads((out / "loso-variants.fused.json").read_text())["reports"]
    assert fused["with-oracle.json"]["images"] == len(unseen)
    assert list(fused["with-oracle.json"]["variants"]) == ["resize", "resize@jpeg75"]
    assert json.loads((out / "loso-variants.univfd.json").read_text())["fused"]["images"] == report["images"]
    assert "Default fused verdict" in again.stdout and "Fused verdict of with-oracle.json" in again.stdout
    # The folder's perturbed scores are its own loso-variants files; a perturbation it never scored is refused.
    loso_variants(dataset, out, backbone, "--method", "univfd", "--variant", "resize@jpeg75", "--report",
                  "with-packed.json", "--unseen-scores", f"univfd-packed={out / 'univfd'}")
    fused = json.loads((out / "loso-variants.fused.json").read_text())["reports"]["with-packed.json"]
    assert fused["images"] == report["images"] and list(fused["variants"]) == ["resize", "resize@jpeg75"]
    # The policy chosen to hold on the JPEG q75 copies too, from the fold models' own scores of those copies:
    # refused, with the command that scores them, until every method has them (mpft has none yet).
    refused = loso(dataset, out, cache, backbone, "--policy-copies", "jpeg75", "--report", "copies.json")
    assert refused.exit_code != 0 and "mpft fold" in refused.output and "--variant resize@jpeg75" in refused.output
    assert "unknown perturbation" in loso(dataset, out, cache, backbone, "--policy-copies", "jpeg7").output
    loso_variants(dataset, out, backbone, "--method", "mpft", "--variant", "resize@jpeg75")
    copied = loso(dataset, out, cache, backbone, "--policy-copies", "jpeg75", "--report", "copies.json")
    assert copied.exit_code == 0, f"{copied.output}\n{copied.stderr}\n{copied.exception!r}"
    on_copies = json.loads((out / "copies.json").read_text())
    assert on_copies["fused_scores"] == report["fused_scores"]  # the fusion is still chosen on the original bytes
    ids = sorted(on_copies["fused_scores"])
    jpeg_logits = {m: {r["id"]: r["logit"] for f in report["folds"] for r in json.loads(
        (out / m / f["name"] / "held_out.resize_jpeg75.json").read_text())["scores"]} for m in ("univfd", "mpft")}
    cal = on_copies["fused_calibration"]
    fused_jpeg = fuse({m: np.array([v[i] for i in ids]) for m, v in jpeg_logits.items()},
                      on_copies["weights"]["weights"])
    copies = np.stack([[on_copies["fused_scores"][i] for i in ids],
                       1 / (1 + np.exp(-(cal["scale"] * fused_jpeg + cal["bias"])))])
    by_id = {s.id: s for s in everyone}
    labels, groups = np.array([by_id[i].label for i in ids]), [by_id[i].group for i in ids]
    expected = choose_thresholds(labels, groups, copies, 0.02, 0.10)
    assert on_copies["thresholds"] == pytest.approx(asdict(expected), abs=1e-6)
    assert list(on_copies["policy_copies"]) == ["none", "jpeg75"]
    for row, name in zip(copies, on_copies["policy_copies"], strict=True):
        point = on_copies["policy_copies"][name]
        assert point["worst_false_flag"] == pytest.approx(
            max(np.mean(row[[g == r for g in groups]] >= expected.ai_threshold) for r in ("photos", "scans")),
            abs=1e-4)
    assert all(len(c["copies_ai_generated"]) == 1 for c in on_copies["policy_carry_over"])
    assert "The policy on each copy of the held-out images it was chosen on" in copied.stdout
    assert "| jpeg75 |" in copied.stdout and "on average, on the copy that bounds each)" in copied.stdout
    # A run whose report was written under another name: loso-variants names the option and the reports there,
    # then scores that report's folds with its fusion as the default.
    alone = tmp_path / "alone"
    for method in ("univfd", "mpft"):
        shutil.copytree(out / method, alone / method)
    shutil.copy(out / "copies.json", alone / "copies.json")
    variants = ("--method", "univfd", "--method", "mpft", "--variant", "resize@jpeg75")
    unnamed = CliRunner().invoke(cli, ["train", "loso-variants", "--data", str(dataset), "--loso-data", str(dataset),
                                       "--out", str(alone), *variants], env=_env(backbone))
    assert unnamed.exit_code != 0 and "--base-report (reports in" in unnamed.output
    assert "copies.json" in unnamed.output
    based = loso_variants(dataset, alone, backbone, *variants, "--base-report", "copies.json")
    fused = json.loads((alone / "loso-variants.fused.json").read_text())["reports"]
    assert list(fused) == ["copies.json"]
    assert fused["copies.json"]["weights"] == on_copies["settings"]["fusion"]["weights"]
    assert "Default fused verdict" in based.stdout
    # These images separate at 0.5 on both copies. A copy of the run where one photo's JPEG copy scores 0.9
    # (both detectors' logit set to what the fused calibration maps to 0.9): the rule holds on that copy too,
    # so ai_threshold rises over it; left out of the choice, the photos are flagged on that copy alone.
    doctored = tmp_path / "doctored"
    shutil.copytree(out, doctored)
    photo = next(i for i in ids if by_id[i].group == "photos")
    lifted = (math.log(0.9 / 0.1) - cal["bias"]) / cal["scale"]
    for path in doctored.glob("*/*/held_out.resize_jpeg75.json"):
        payload = json.loads(path.read_text())
        payload["scores"] = [{**r, "logit": lifted if r["id"] == photo else r["logit"]} for r in payload["scores"]]
        path.write_text(json.dumps(payload))
    lifted_run = loso(dataset, doctored, cache, backbone, "--policy-copies", "jpeg75", "--report", "copies.json")
    assert lifted_run.exit_code == 0, f"{lifted_run.output}\n{lifted_run.stderr}\n{lifted_run.exception!r}"
    lifted_report = json.loads((doctored / "copies.json").read_text())
    assert lifted_report["thresholds"]["ai_threshold"] == 0.91 > on_copies["thresholds"]["ai_threshold"]
    assert lifted_report["policy_copies"]["jpeg75"]["worst_false_flag"] == 0.0
    carried = {c["group"]: c for c in lifted_report["policy_carry_over"]}
    assert carried["photos"]["ai_generated"] == 0.0 and carried["photos"]["copies_ai_generated"] == [
        pytest.approx(1 / (COUNTS["train"] + COUNTS["val"]), abs=1e-4)]
    assert f"photos {1 / 11:.1%} on jpeg75" in lifted_run.stdout
    # An `eval` scores.csv gives a copy its perturbation's rows (here p 0.5 for each of its six images).
    assert {s.id: s.logit for s in read_unseen_scores(tmp_path / "scores.csv", "resize@jpeg75")} == {
        s.id: pytest.approx(0.0) for s in unseen}
    jpeg = unseen_logits({"packed": out / "univfd"}, ["resize@jpeg75"])["packed"]["resize@jpeg75"]
    assert jpeg == {r["id"]: r["logit"] for f in report["folds"] for r in json.loads(
        (out / "univfd" / f["name"] / "held_out.resize_jpeg75.json").read_text())["scores"] if r["split"] != "test"}
    with pytest.raises(ValueError, match="have no resize@jpeg90 scores"):
        unseen_logits({"packed": out / "univfd"}, ["resize@jpeg90"])
    # Under a view, a folder gives its own scores of that view (the shifted copy's crops2+whole files), and an
    # eval scores.csv, which has no views, its unperturbed rows.
    viewed = unseen_logits({"shifted": shifted}, ["crops2+whole"])
    viewed |= unseen_logits({"oracle": tmp_path / "scores.csv"}, ["crops2+whole@jpeg75", "crops2+whole"])
    assert viewed["shifted"]["crops2+whole"] == {s.id: s.logit for s in read_unseen_scores(shifted, "crops2+whole")}
    assert viewed["shifted"]["resize"] == {s.id: s.logit for s in everyone}
    assert viewed["oracle"]["crops2+whole"] == viewed["oracle"]["resize"] and len(viewed["oracle"]["resize"]) == 6
    assert set(viewed["oracle"]["crops2+whole@jpeg75"].values()) == {0.0}  # the jpeg75 rows: p 0.5


def test_a_rerun_under_other_settings_trains_the_fold_again(dataset: Path, backbone: Path, tmp_path: Path) -> None:
    out, cache, fold = tmp_path / "loso", tmp_path / "cache", "photos+blockgen"

    def run(*extra: str) -> tuple[set[str], set[str]]:
        """The methods trained and the methods kept by a run of ``fold`` with these settings."""
        result = loso(dataset, out, cache, backbone, "--fold", fold, *extra)
        assert result.exit_code == 0, f"{result.output}\n{result.stderr}\n{result.exception!r}"
        return ({e["method"] for e in _events(result, "loso.fold_start")},
                {e["method"] for e in _events(result, "loso.fold_done_before")})

    assert run("--epochs", "1") == ({"univfd", "mpft"}, set())
    assert run("--epochs", "1") == (set(), {"univfd", "mpft"})
    # More epochs retrain mpft; univfd's probe has no epochs, so its fold stands.
    assert run("--epochs", "2") == ({"mpft"}, {"univfd"})
    assert len(json.loads((out / "mpft" / fold / "training.json").read_text())["epochs"]) == 2
    # Another sample of the data is another run for both.
    assert run("--epochs", "2", "--limit-per-group", "12") == ({"univfd", "mpft"}, set())
    # Another augmentation draw is another run of the probe only; the seed's own draw named is the same run.
    assert run("--epochs", "2", "--limit-per-group", "12", "--augment-seed", "0") == (set(), {"univfd", "mpft"})
    assert run("--epochs", "2", "--limit-per-group", "12", "--augment-seed", "1") == ({"univfd"}, {"mpft"})
    meta = json.loads((out / "univfd" / fold / "meta.json").read_text())
    assert (meta["augment_seed"], meta["augment_draws"]) == (1, 3)  # three draws a training image by default
    report = json.loads((out / "univfd" / fold / "training.json").read_text())
    assert report["train_rows"] == 3 * report["counts"]["train"]
    # The averaged probe blind to the real sources' directions is another run of the probe only, and says so.
    blind = ("--epochs", "2", "--limit-per-group", "12", "--augment-seed", "1", "--without-source-directions")
    assert run(*blind) == ({"univfd"}, {"mpft"})
    assert json.loads((out / "univfd" / fold / "meta.json").read_text())["without_source_directions"] is True
    assert json.loads((out / "univfd" / fold / "loso_run.json").read_text())["without_source_directions"] is True
    refused = loso(dataset, out, cache, backbone, "--fold", fold, *blind, "--choose-on", "groups")
    assert refused.exit_code != 0 and "for the averaged probe" in refused.output
    # Two draws (1 and 2): another run of the probe, whose rows the run before embedded and cached.
    result = loso(dataset, out, cache, backbone, "--fold", fold, "--epochs", "2", "--limit-per-group", "12",
                  "--augment-seed", "1", "--augment-draws", "2")
    assert result.exit_code == 0, f"{result.output}\n{result.stderr}\n{result.exception!r}"
    assert {e["method"] for e in _events(result, "loso.fold_start")} == {"univfd"}
    assert [e["split"] for e in _events(result, "train.embedded")] == []
    assert json.loads((out / "univfd" / fold / "meta.json").read_text())["augment_draws"] == 2
    report = json.loads((out / "univfd" / fold / "training.json").read_text())
    assert report["train_rows"] == 2 * report["counts"]["train"]
    # A fold folder from before the settings were recorded is kept, and the log says it was not checked.
    (out / "univfd" / fold / "loso_run.json").unlink()
    result = loso(dataset, out, cache, backbone, "--fold", fold, "--epochs", "2")
    assert result.exit_code == 0, f"{result.output}\n{result.stderr}\n{result.exception!r}"
    assert [e["method"] for e in _events(result, "loso.fold_settings_unrecorded")] == ["univfd"]
    assert {e["method"] for e in _events(result, "loso.fold_start")} == {"mpft"}


def test_loso_measures_univfd_on_every_blocks_class_token(dataset: Path, backbone: Path, tmp_path: Path) -> None:
    """`--method univfd-blocks` runs univfd's recipe on every block's class token: its own embedding cache,
    a probe as wide as all the blocks, and held-out scores pooled and fused beside univfd's."""
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    args = ["train", "loso", "--data", str(dataset), "--loso-data", str(dataset), "--out", str(tmp_path / "loso"),
            "--cache-dir", str(cache), "--method", "univfd", "--method", "univfd-blocks", "--folds", "2",
            "--no-progress"]
    result = CliRunner().invoke(cli, args, env=_env(backbone))
    assert result.exit_code == 0, f"{result.output}\n{result.stderr}\n{result.exception!r}"
    report = json.loads((tmp_path / "loso" / "loso.json").read_text())
    assert set(report["weights"]["weights"]) == {"univfd", "univfd-blocks"}
    assert report["detectors"]["univfd-blocks"]["balanced_auc"] is not None
    config = json.loads((backbone / "config.json").read_text())
    for fold in report["folds"]:
        plain = load_file(str(tmp_path / "loso" / "univfd" / fold["name"] / "head.safetensors"))["linear.weight"]
        blocks = load_file(str(tmp_path / "loso" / "univfd-blocks" / fold["name"] / "head.safetensors"))
        assert plain.shape[1] == config["projection_dim"]
        assert blocks["linear.weight"].shape[1] == config["num_hidden_layers"] * config["hidden_size"]
        _, held = load_held_out(tmp_path / "loso" / "univfd-blocks" / fold["name"])
        assert {s.id for s in held} == {s.id for s in load_held_out(tmp_path / "loso" / "univfd" / fold["name"])[1]}
    assert {p.name.split("-")[0] for p in cache.glob("*.npz")} == {"univfd", "clip"}  # univfd-*, clip-blocks-*
    # Its fold models served (univfd's class-token head, on its own whole model): the original bytes give the
    # logits training recorded, and a perturbation is scored too.
    loso_variants(dataset, tmp_path / "loso", backbone, "--method", "univfd-blocks", "--variant", "resize@jpeg75")
    for fold in report["folds"]:
        directory = tmp_path / "loso" / "univfd-blocks" / fold["name"]
        expected = {b.id: b.logit for b in load_held_out(directory)[1] if b.split != "test"}
        again = json.loads((directory / "held_out.resize.json").read_text())["scores"]
        assert {r["id"]: pytest.approx(expected[r["id"]], abs=1e-4) for r in again} == expected
        assert len(json.loads((directory / "held_out.resize_jpeg75.json").read_text())["scores"]) == len(expected)

    # The fusion and policy chosen on a view's scores (`--view`): refused until the fold models have scored
    # every held-out image under it, then pooled from those scores instead of the resized view's.
    args = [*args[:args.index("--method")], "--method", "univfd-blocks", "--folds", "2", "--no-progress"]

    def under(view: str, *extra: str) -> Result:
        return CliRunner().invoke(cli, [*args, "--view", view, "--report", f"{view}.json", *extra], env=_env(backbone))

    loso_variants(dataset, tmp_path / "loso", backbone, "--method", "univfd-blocks", "--variant", "crops2",
                  "--limit-per-group", "1")
    refused = under("crops2")
    assert refused.exit_code != 0 and "score the rest with `streamguard train loso-variants" in refused.output
    assert "no scores under view crops3" in under("crops3").output
    assert "views must be resize, cropsN" in under("crops").output
    loso_variants(dataset, tmp_path / "loso", backbone, "--method", "univfd-blocks", "--variant", "crops2")
    # Compared with another report's fused verdict on the same images, paired; a report written before the
    # per-image scores were recorded is refused with what to do.
    old = {k: v for k, v in report.items() if k != "fused_scores"}
    (tmp_path / "loso" / "old.json").write_text(json.dumps(old))
    assert "run its `streamguard train loso` command again" in under("crops2", "--against", "old.json").output
    result = under("crops2", "--against", "loso.json")
    assert result.exit_code == 0, f"{result.output}\n{result.stderr}\n{result.exception!r}"
    fold = tmp_path / "loso" / "univfd-blocks" / report["folds"][0]["name"]
    assert json.loads((fold / "held_out.crops2.json").read_text())["version"].endswith("@crops2")  # as served
    crops = json.loads((tmp_path / "loso" / "crops2.json").read_text())
    against = crops["against"]["loso.json"]
    assert against["images"] == report["images"] == len(crops["fused_scores"])
    assert against["balanced_auc"] == crops["detectors"]["fused"]["balanced_auc"]
    assert against["other_balanced_auc"] == report["detectors"]["fused"]["balanced_auc"]
    difference = against["difference"]
    assert difference["low"] <= difference["value"] <= difference["high"]
    assert difference["value"] == pytest.approx(against["balanced_auc"] - against["other_balanced_auc"], abs=2e-4)
    assert "Against loso.json" in result.stdout
    # What each policy decides, chosen again on the same images: chosen without copies, it is the report's own.
    policy = against["policy"]
    for measure in ("generators_flagged", "uncertain", "real_cleared"):
        assert policy[f"this {measure}"]["value"] == crops["operating_points"]["chosen"][measure]
        assert policy[f"other {measure}"]["value"] == report["operating_points"]["chosen"][measure]
        change = policy[f"this - other {measure}"]
        assert change["low"] <= change["high"]
        assert change["value"] == pytest.approx(policy[f"this {measure}"]["value"] - policy[f"other {measure}"]["value"],
                                                abs=2e-4)
    assert "Each policy chosen again on the original bytes" in result.stdout
    # A detector joined from another run's folder is pooled under the same view, or refused: univfd's folds
    # never scored crops2, univfd-blocks' did.
    plain = under("crops2", "--unseen-scores", f"plain={tmp_path / 'loso' / 'univfd'}")
    assert plain.exit_code != 0 and "univfd fold" in plain.output and "no scores under view crops2" in plain.output
    joined = under("crops2", "--unseen-scores", f"packed={tmp_path / 'loso' / 'univfd-blocks'}")
    assert joined.exit_code == 0, f"{joined.output}\n{joined.stderr}\n{joined.exception!r}"
    both = json.loads((tmp_path / "loso" / "crops2.json").read_text())["detectors"]
    assert both["packed"]["groups"] == both["univfd-blocks"]["groups"]  # the same fold models' crops2 scores
    assert crops["view"] == "crops2" and crops["images"] == report["images"]
    scored = [s for fold in report["folds"] for s in load_variant_scores(
        tmp_path / "loso" / "univfd-blocks" / fold["name"], "crops2")]
    for group, rates in crops["detectors"]["univfd-blocks"]["groups"].items():
        mine = [s for s in scored if s.group == group]
        right = sum((s.logit > 0) == bool(s.label) for s in mine)
        assert (rates["n"], rates["accuracy_at_0.5"]) == (len(mine), pytest.approx(right / len(mine), abs=1e-4))


@pytest.fixture(scope="module")
def wide_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four groups at 288 px: wide enough for two distinct 224-px native crops of most images."""
    def images() -> Iterator[tuple[str, str, str, int, Image.Image]]:
        seed = 7000
        for name, label in GROUPS:
            for split, count in COUNTS.items():
                for _ in range(count):
                    seed += 1
                    yield name, label, split, seed, (smooth(seed, size=288) if label == "real"
                                                     else textured(seed, size=288, block=1 if name == "noisegen" else 4))

    return write_dataset(tmp_path_factory.mktemp("loso-wide"), images())


def test_loso_trains_the_probe_on_a_crop_view(wide_dataset: Path, backbone: Path, tmp_path: Path) -> None:
    """`--train-view crops2`: every native crop of an augmented image is a training row, the fold run is its
    own (recorded, not a resized run's), and the held-out images are scored under that view as the served
    detector scores them (`loso-variants --variant crops2` gives the same logits), besides resized."""
    from streamguard.training.probe_choice import Embedded

    out, cache = tmp_path / "loso", tmp_path / "cache"
    args = ["train", "loso", "--data", str(wide_dataset), "--loso-data", str(wide_dataset), "--out", str(out),
            "--cache-dir", str(cache), "--method", "univfd-blocks", "--folds", "2", "--no-progress"]
    result = CliRunner().invoke(cli, [*args, "--train-view", "crops2"], env=_env(backbone))
    assert result.exit_code == 0, f"{result.output}\n{result.stderr}\n{result.exception!r}"
    trains = [np.load(path) for path in cache.glob("clip-blocks-train-*.npz")]
    assert len(trains) == 3  # one a draw (--augment-draws 3, the default)
    for train in trains:
        owner, ids = train["owner"], train["ids"]
        assert len(ids) < len(owner) <= 2 * len(ids)  # two crops, one row where a rescale left no native crop
        assert sorted(set(owner.tolist())) == list(range(len(ids)))
    report = json.loads((out / "loso.json").read_text())
    trained: dict[str, float] = {}
    for fold in report["folds"]:
        directory = out / "univfd-blocks" / fold["name"]
        assert json.loads((directory / "loso_run.json").read_text())["train_view"] == "crops2"
        assert json.loads((directory / "training.json").read_text())["view"] == "crops2"
        assert json.loads((directory / "held_out.crops2.json").read_text())["version"].endswith("@crops2")
        mine = {s.id: s.logit for s in load_variant_scores(directory, "crops2") if s.split != "test"}
        assert mine.keys() == {s.id for s in load_held_out(directory)[1] if s.split != "test"}
        trained |= mine
        (directory / "held_out.crops2.json").unlink()
    loso_variants(wide_dataset, out, backbone, "--method", "univfd-blocks", "--variant", "crops2")
    served = {s.id: s.logit for fold in report["folds"]
              for s in load_variant_scores(out / "univfd-blocks" / fold["name"], "crops2")}
    assert served == pytest.approx(trained, abs=1e-4)
    # The same settings again keep the folds; the resized view is another run.
    logged = _env(backbone, STREAMGUARD_LOG__LEVEL="info")
    again = CliRunner().invoke(cli, [*args, "--train-view", "crops2"], env=logged)
    assert again.exit_code == 0 and _events(again, "loso.fold_done_before") and not _events(again, "loso.fold_start")
    resized = CliRunner().invoke(cli, args, env=logged)
    assert resized.exit_code == 0 and len(_events(resized, "loso.fold_start")) == len(report["folds"])
    assert "train_view" not in json.loads((out / "univfd-blocks" / report["folds"][0]["name"] / "loso_run.json").read_text())
    refused = CliRunner().invoke(cli, [*args, "--method", "mpft", "--train-view", "crops2"], env=_env(backbone))
    assert refused.exit_code != 0 and "a training view other than resize is for the probe methods" in refused.output
    # An image's logit is the mean of its views'.
    split = Embedded(np.zeros((3, 1)), np.array([0, 0, 1]), ["a", "b"])
    assert split.per_image(np.array([1.0, 3.0, -2.0])).tolist() == [2.0, -2.0]


def test_loso_refuses_held_out_data_it_does_not_train_on(dataset: Path, backbone: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["train", "loso", "--data", str(dataset), "--loso-data", str(tmp_path),
                                      "--out", str(tmp_path / "o")], env=_env(backbone))
    assert result.exit_code != 0 and "held-out data must also be training data" in result.output


def test_loso_trains_nirnet_per_fold_and_fuses_it(dataset: Path, backbone: Path, tmp_path: Path) -> None:
    """NIRNet in the same machinery: retrained with each fold's groups held out (its imprint statistics too),
    pooled, weighed in the fusion, and re-scored by its fold models under a perturbation."""
    out = tmp_path / "loso"
    args = ["train", "loso", "--data", str(dataset), "--loso-data", str(dataset), "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--method", "univfd", "--method", "nirnet", "--folds", "2",
            "--epochs", "1", "--limit-per-group", "10", "--no-progress"]
    result = CliRunner().invoke(cli, args, env=_env(backbone, STREAMGUARD_LOG__LEVEL="info"))
    assert result.exit_code == 0, f"{result.output}\n{result.stderr}\n{result.exception!r}"
    report = json.loads((out / "loso.json").read_text())
    assert report["limit_per_group"] == 10 and 0 < report["images"] < 4 * (COUNTS["train"] + COUNTS["val"])
    assert set(report["weights"]["weights"]) == {"univfd", "nirnet"}
    assert set(report["detectors"]["nirnet"]["groups"]) == {g for g, _ in GROUPS}
    for fold in report["folds"]:
        held = set(fold["generators"]) | set(fold["sources"])
        directory = out / "nirnet" / fold["name"]
        holdout, scores = load_held_out(directory)
        assert holdout == {"generators": fold["generators"], "sources": fold["sources"]}
        assert {s.group for s in scores} == held
        training = json.loads((directory / "training.json").read_text())
        # The simulator's statistics come from the generators the fold trained on, never the held-out one.
        fitted = set(training["simulator"]["fitted_on"]["generators"])
        assert fitted and not fitted & held, training["simulator"]["fitted_on"]

    # Without the run's --limit-per-group, and with another fold count: the folds and their images are the
    # ones the run's report recorded (planned again, other settings name fold runs that do not exist).
    loso_variants(dataset, out, backbone, "--method", "nirnet", "--folds", "3", "--variant", "resize@jpeg75")
    refused = CliRunner().invoke(cli, ["train", "loso-variants", "--data", str(dataset), "--loso-data", str(dataset),
                                       "--out", str(out), "--method", "nirnet", "--variant", "resize:int8"],
                                 env=_env(backbone))
    assert refused.exit_code != 0 and "runs on no shared trunk" in refused.output
    compared = json.loads((out / "loso-variants.nirnet.json").read_text())
    assert list(compared["variants"]) == ["resize", "resize@jpeg75"] and compared["images"] == report["images"]
    # "resize" names the shipped contract, which for NIRNet is its native crops: held_out.json again.
    for fold in report["folds"]:
        _, base = load_held_out(out / "nirnet" / fold["name"])
        again = json.loads((out / "nirnet" / fold["name"] / "held_out.resize.json").read_text())["scores"]
        expected = {b.id: b.logit for b in base if b.split != "test"}
        assert {r["id"]: pytest.approx(expected[r["id"]], abs=1e-4) for r in again} == expected

    # With NIRNet and without it, under the same perturbation: the same folds' univfd-only report, and both
    # fusions compared over both methods' variant scores. Without NIRNet, the fusion is univfd's alone.
    without = [a for i, a in enumerate(args) if "nirnet" not in args[i:i + 2]]  # "--method", "nirnet" dropped
    alone = CliRunner().invoke(cli, [*without, "--report", "univfd-only.json"], env=_env(backbone))
    assert alone.exit_code == 0, f"{alone.output}\n{alone.stderr}\n{alone.exception!r}"
    both = loso_variants(dataset, out, backbone, "--method", "univfd", "--method", "nirnet", "--variant",
                         "resize@jpeg75", "--report", "univfd-only.json")
    fused = json.loads((out / "loso-variants.fused.json").read_text())
    assert fused["methods"] == ["univfd", "nirnet"] and list(fused["reports"]) == ["loso.json", "univfd-only.json"]
    assert set(fused["reports"]["loso.json"]["weights"]) == {"univfd", "nirnet"}
    assert set(fused["reports"]["univfd-only.json"]["weights"]) == {"univfd"}
    univfd = json.loads((out / "loso-variants.univfd.json").read_text())
    for variant in ("resize", "resize@jpeg75"):
        # A one-detector fusion is a monotone map of its logit: it ranks as the detector does.
        assert fused["reports"]["univfd-only.json"]["variants"][variant]["balanced_auc"] == \
            univfd["variants"][variant]["balanced_auc"]
    assert "Fused verdict of univfd-only.json (univfd" in both.stdout


def test_loso_trains_nirnet_ablations_per_fold_under_their_own_names(dataset: Path, backbone: Path,
                                                                    tmp_path: Path) -> None:
    """An ablation is the default recipe with one thing changed, trained per fold into its own folder, and
    reported beside the others: what the simulator and each branch are worth on unseen sources."""
    out = tmp_path / "loso"
    result = CliRunner().invoke(cli, [
        "train", "loso", "--data", str(dataset), "--loso-data", str(dataset), "--out", str(out),
        "--cache-dir", str(tmp_path / "cache"), "--method", "nirnet-frequency", "--method", "nirnet-no-simulator",
        "--folds", "2", "--epochs", "1", "--limit-per-group", "10", "--no-progress"], env=_env(backbone))
    assert result.exit_code == 0, f"{result.output}\n{result.stderr}\n{result.exception!r}"
    report = json.loads((out / "loso.json").read_text())
    assert set(report["weights"]["weights"]) == {"nirnet-frequency", "nirnet-no-simulator"}
    for fold in report["folds"]:
        frequency = json.loads((out / "nirnet-frequency" / fold["name"] / "training.json").read_text())
        plain = json.loads((out / "nirnet-no-simulator" / fold["name"] / "training.json").read_text())
        assert frequency["branches"] == ["frequency"] and frequency["simulator"]["enabled"] is True
        assert "--branches frequency " in frequency["command"]
        assert plain["branches"] == ["noise", "frequency", "semantic"] and plain["simulator"]["enabled"] is False
        assert "--no-simulator" in plain["command"]
    # Re-scored through the serving code, which reads the branches from the ablation's own weights.
    loso_variants(dataset, out, backbone, "--method", "nirnet-frequency", "--variant", "resize@jpeg75")
    compared = json.loads((out / "loso-variants.nirnet-frequency.json").read_text())
    assert list(compared["variants"]) == ["resize", "resize@jpeg75"] and compared["images"] == report["images"]

    # A fold killed after its first epoch (no held_out.json yet) resumes from its checkpoint when the command
    # runs again; under another recipe (another sample) the checkpoint is not this run's and it starts afresh.
    fold = report["folds"][0]["name"]
    base = ["train", "loso", "--data", str(dataset), "--loso-data", str(dataset), "--out", str(out), "--cache-dir",
            str(tmp_path / "cache"), "--method", "nirnet-no-simulator", "--folds", "2", "--epochs", "2",
            "--no-progress", "--fold", fold]
    for limit, resumed in (("10", [1]), ("9", [])):
        (out / "nirnet-no-simulator" / fold / "held_out.json").unlink()
        again = CliRunner().invoke(cli, [*base, "--limit-per-group", limit],
                                   env=_env(backbone, STREAMGUARD_LOG__LEVEL="info"))
        assert again.exit_code == 0, f"{again.output}\n{again.stderr}\n{again.exception!r}"
        assert [e["epochs_done"] for e in _events(again, "train.resumed")] == resumed
        training = json.loads((out / "nirnet-no-simulator" / fold / "training.json").read_text())
        assert [e["epoch"] for e in training["epochs"]] == [1, 2]


def test_an_augmentation_draw_changes_the_augmented_pixels_only(dataset: Path, tmp_path: Path) -> None:
    """`augment_seed` redraws each image's augmentation and nothing else: the original pixels (and their
    cache) stay; unset, or naming the seed, it is the seed's own draw (and its cache)."""
    from dataclasses import replace

    import torch

    from streamguard.builtin.cliphead import CONTRACT
    from streamguard.config import Settings
    from streamguard.evaluation import load_samples
    from streamguard.training.univfd import Frozen, TrainConfig, embed

    def encode(pixels: torch.Tensor) -> torch.Tensor:  # a cheap, deterministic stand-in for the encoder
        return torch.nn.functional.avg_pool2d(pixels, 28).flatten(1)

    encoder = Frozen(encode, "pooled-pixels", CONTRACT)
    train = [s for s in load_samples([str(dataset)], seed=0) if s.split == "train"][:6]
    cache = tmp_path / "cache"
    cfg = TrainConfig(data=(str(dataset),), out=tmp_path / "out", cache_dir=cache)
    settings = Settings()

    def embedded(config: TrainConfig, augmented: bool = True) -> tuple[np.ndarray, int]:
        e = embed(train, settings, config, encoder, "train", augmented=augmented)
        assert [s.id for s in e.samples] == [s.id for s in train]
        return e.x, len(list(cache.glob("*.npz")))

    seed_draw, files = embedded(cfg)
    named, files_named = embedded(replace(cfg, augment_seed=0))
    np.testing.assert_array_equal(named, seed_draw)
    assert files_named == files  # the same cache entry
    other, _ = embedded(replace(cfg, augment_seed=1))
    assert np.abs(other - seed_draw).max() > 1e-3
    original, files = embedded(cfg, augmented=False)
    original_other, files_other = embedded(replace(cfg, augment_seed=1), augmented=False)
    np.testing.assert_array_equal(original_other, original)
    assert files_other == files


def test_loso_tunes_pin_clips_recipe_per_fold(dataset: Path, backbone: Path, tmp_path: Path) -> None:
    out, cache, fold = tmp_path / "loso", tmp_path / "cache", "photos+blockgen"

    def run(*recipe: str) -> Result:
        args = ["train", "loso", "--data", str(dataset), "--loso-data", str(dataset), "--out", str(out),
                "--cache-dir", str(cache), "--method", "pin-clip", "--folds", "2", "--epochs", "1", "--fold", fold,
                "--no-progress", *(a for value in recipe for a in ("--pin-clip", value))]
        return CliRunner().invoke(cli, args, env=_env(backbone, STREAMGUARD_LOG__LEVEL="info"))

    def trained(result: Result) -> bool:
        assert result.exit_code == 0, f"{result.output}\n{result.stderr}\n{result.exception!r}"
        return [e["method"] for e in _events(result, "loso.fold_start")] == ["pin-clip"]

    assert trained(run("noise_scale=0.05", "beta=0.01"))
    # The fold trained under that recipe, and says so where a later run (and a reader) looks.
    meta = json.loads((out / "pin-clip" / fold / "meta.json").read_text())
    assert (meta["recipe"]["config"]["noise_scale"], meta["recipe"]["config"]["beta"]) == (0.05, 0.01)
    assert meta["recipe"]["config"]["mode"] == "learned"  # the default where not named
    recorded = json.loads((out / "pin-clip" / fold / "loso_run.json").read_text())["pin_clip"]
    assert recorded == {"noise_scale": 0.05, "beta": 0.01}
    # The same recipe keeps the fold (a default named changes nothing); another one, or the defaults, trains it
    # again.
    assert not trained(run("noise_scale=0.050", "beta=0.01", "mode=learned"))
    assert trained(run("noise_scale=0.05", "beta=0.01", "mode=none"))
    assert json.loads((out / "pin-clip" / fold / "meta.json").read_text())["recipe"]["config"]["mode"] == "none"
    assert trained(run())
    assert json.loads((out / "pin-clip" / fold / "meta.json").read_text())["recipe"]["config"]["noise_scale"] == 0.02
    assert not trained(run("mode=learned", "beta=0.001"))
    # A name the recipe does not have, or a value it refuses, stops the run before any fold trains.
    for bad, said in (("noise=0.1", "pin-clip's recipe has no ['noise']"),
                      ("mode=loud", "pin-clip mode must be one of"), ("beta", "--pin-clip wants NAME=VALUE")):
        result = run(bad)
        assert result.exit_code != 0 and said in result.output, result.output
        assert _events(result, "loso.fold_start") == []


def test_loso_tunes_the_fine_tuned_methods_blocks_per_fold(dataset: Path, backbone: Path, tmp_path: Path) -> None:
    out, cache, fold = tmp_path / "loso", tmp_path / "cache", "photos+blockgen"

    def run(method: str, *blocks: str) -> Result:
        args = ["train", "loso", "--data", str(dataset), "--loso-data", str(dataset), "--out", str(out),
                "--cache-dir", str(cache), "--method", method, "--folds", "2", "--epochs", "1", "--fold", fold,
                "--no-progress", *blocks]
        return CliRunner().invoke(cli, args, env=_env(backbone, STREAMGUARD_LOG__LEVEL="info"))

    def tuned(result: Result) -> list[int] | None:
        """The fold's tuned blocks when this run trained it; None when it kept the fold."""
        assert result.exit_code == 0, f"{result.output}\n{result.stderr}\n{result.exception!r}"
        if not _events(result, "loso.fold_start"):
            return None
        return json.loads((out / "pin-clip" / fold / "meta.json").read_text())["tuned_blocks"]

    default = tuned(run("pin-clip"))
    assert default is not None and len(default) == 2  # `train pin-clip`'s own default
    assert tuned(run("pin-clip", "--tune-blocks", "1")) == default[-1:]
    assert json.loads((out / "pin-clip" / fold / "loso_run.json").read_text())["tune_blocks"] == 1
    assert tuned(run("pin-clip", "--tune-blocks", "1")) is None  # the same recipe keeps the fold
    assert tuned(run("pin-clip")) == default  # and the default trains it again
    # The recipe's own number spelled out is the default's run: the fold stands.
    assert tuned(run("pin-clip", "--tune-blocks", str(len(default)))) is None
    for method, blocks, said in (("pin-clip", "0", "0 is not in the range x>=1"),
                                 ("nirnet", "1", "tuned blocks are for the fine-tuned methods")):
        result = run(method, "--tune-blocks", blocks)
        assert result.exit_code != 0 and said in result.output, result.output


def test_the_fusion_chosen_on_some_groups_scores_every_image() -> None:
    """What the carry-over check refits without a group: weights and calibration from the mask's images alone,
    applied to all of them (the left-out group's too)."""
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 0, 1, 1], 30)
    groups = tuple(np.repeat(["r1", "r2", "g1", "g2"], 30).tolist())
    good = labels * 2.0 + rng.normal(0, 1, 120)
    odd = np.where(np.asarray(groups) == "r2", 3.0, labels * 2.0) + rng.normal(0, 1, 120)  # r2 looks generated
    scored = Scored(labels, groups, {"good": good, "odd": odd})
    weights, calibration, probs = choose_fusion(scored, 0.1)
    rest = np.asarray(groups) != "r2"
    w_rest, c_rest, p_rest = choose_fusion(scored, 0.1, rest)
    assert w_rest == choose_weights(scored.only(rest), 0.1) and w_rest != weights  # r2 had no say
    assert len(probs) == len(p_rest) == 120 and (c_rest.scale, c_rest.bias) != (calibration.scale, calibration.bias)
    assert np.all((p_rest > 0) & (p_rest < 1))
