"""Evaluation metrics against values computed by hand on small arrays, degenerate groups included."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from streamguard.evaluation.calibrate import fit_calibration, quality
from streamguard.evaluation.metrics import (
    binary_metrics,
    expected_calibration_error,
    gap,
    grouped_metrics,
    ranked_auc,
    source_metrics,
)

# The classic four-point example: AUC 3/4; AP = (1/2)(1) + (1/2)(2/3) = 5/6.
Y = [0, 0, 1, 1]
P = [0.1, 0.4, 0.35, 0.8]


@given(st.lists(st.tuples(st.booleans(), st.integers(-3, 3), st.floats(0.05, 5.0)), min_size=2, max_size=40))
def test_ranked_auc_is_sklearns_area_with_ties_and_weights(rows: list[tuple[bool, int, float]]) -> None:
    # Few distinct scores, so ties across and within the classes are the common case.
    rows = [(True, 0, 1.0), (False, 0, 1.0), *rows]
    labels = np.array([int(fake) for fake, _, _ in rows])
    scores, weights = np.array([s / 2 for _, s, _ in rows]), np.array([w for _, _, w in rows])
    assert ranked_auc(labels, scores, weights) == pytest.approx(roc_auc_score(labels, scores, sample_weight=weights),
                                                                abs=1e-12)
    assert ranked_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_four_point_example_by_hand() -> None:
    m = binary_metrics(Y, P)
    assert (m.n, m.n_real, m.n_fake, m.abstained) == (4, 2, 2, 0)
    assert m.auc == pytest.approx(0.75)
    assert m.ap == pytest.approx(5 / 6, abs=1e-6)
    assert m.accuracy == 0.75 and m.real_accuracy == 1.0 and m.fake_accuracy == 0.5
    # Thresholds 0.8 and 0.35 both reach 3/4; the higher one is reported.
    assert (m.best_accuracy, m.best_threshold) == (0.75, 0.8)
    # With FPR 0 allowed, the best operating point catches one fake of two.
    assert m.tpr_at_fpr_1pct == 0.5 and m.tpr_at_fpr_5pct == 0.5
    # Each score alone in its bin: (0.1 + 0.4 + 0.65 + 0.2) / 4.
    assert m.ece == pytest.approx(0.3375)
    expected_loss = -np.mean(np.log([0.9, 0.6, 0.35, 0.8]))
    assert m.log_loss == pytest.approx(expected_loss, abs=1e-6)


def test_ece_bins_share_and_perfect_calibration() -> None:
    labels = np.array([1] * 7 + [0] * 3)
    assert expected_calibration_error(labels, np.full(10, 0.7)) == pytest.approx(0.0)
    # Two bins: {0.05 x2 -> 0 fakes} and {0.95 x2 -> 1 fake of 2}: (2/4)*0.05 + (2/4)*0.45.
    got = expected_calibration_error(np.array([0, 0, 1, 0]), np.array([0.05, 0.05, 0.95, 0.95]))
    assert got == pytest.approx(0.25)
    assert expected_calibration_error(np.array([1]), np.array([1.0])) == 0.0  # p = 1 lands in the last bin


def test_tpr_at_fpr_uses_the_allowed_false_positives() -> None:
    labels = [0] * 20 + [1] * 4
    scores = [0.1] * 19 + [0.9] + [0.95, 0.85, 0.2, 0.05]
    m = binary_metrics(labels, scores)
    assert m.tpr_at_fpr_1pct == 0.25  # only the fake above the one bright real
    # One real of 20 may be called fake: the threshold drops to 0.2 and three fakes are caught.
    assert m.tpr_at_fpr_5pct == 0.75


def test_best_threshold_when_every_call_should_be_real() -> None:
    m = binary_metrics([1, 0, 0, 0], [0.1, 0.9, 0.8, 0.7])  # anti-correlated
    assert m.best_accuracy == 0.75 and m.best_threshold is None
    assert m.auc == 0.0


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1]])
def test_one_class_groups_have_no_auc_but_do_not_fail(labels: list[int]) -> None:
    m = binary_metrics(labels, [0.2, 0.7, 0.9][: len(labels)])
    assert m.auc is None and m.ap is None and m.best_accuracy is None and m.tpr_at_fpr_5pct is None
    assert m.accuracy is not None and m.ece is not None
    assert (m.real_accuracy is None) == (labels[0] == 1)
    assert (m.fake_accuracy is None) == (labels[0] == 0)


def test_empty_group() -> None:
    m = binary_metrics([], [])
    assert m.n == 0 and m.accuracy is None and m.ece is None and m.abstention_rate is None
    assert source_metrics([]).real_accuracy is None


def test_abstentions_count_as_half_and_real_calls() -> None:
    m = binary_metrics([0, 1, 1, 0], [None, None, 0.9, 0.1])
    assert m.abstained == 2 and m.abstention_rate == 0.5
    assert m.accuracy == 0.75  # the abstained fake is a miss, the abstained real a hit
    assert m.auc == pytest.approx(3.5 / 4)  # of four real/fake pairs, the two abstentions tie


def test_grouped_each_generator_against_all_reals() -> None:
    labels = [0, 0, 0, 1, 1, 1]
    generators = ["real", "real", "real", "a", "a", "b"]
    sources = ["x", "x", "y", "d", "d", "d"]
    scores = [0.1, 0.6, 0.2, 0.9, 0.4, 0.7]
    g = grouped_metrics(labels, generators, sources, scores)
    assert set(g.per_generator) == {"a", "b"}
    assert (g.per_generator["a"].n_real, g.per_generator["a"].n_fake) == (3, 2)
    assert (g.per_generator["b"].n_real, g.per_generator["b"].n_fake) == (3, 1)
    assert g.per_generator["b"].auc == pytest.approx(1.0)
    assert g.per_generator["a"].auc == pytest.approx(5 / 6, abs=1e-6)  # 0.9 beats all 3 reals, 0.4 beats 2
    assert g.per_source["x"].real_accuracy == 0.5 and g.per_source["y"].real_accuracy == 1.0
    assert g.mean_over_generators["auc"] == pytest.approx((1.0 + 5 / 6) / 2, abs=1e-6)
    assert g.overall.n == 6
    assert gap(g.overall, g.overall)["auc"] == 0.0


def test_temperature_recovers_an_overconfident_detector() -> None:
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, 4000)
    labels = (rng.random(4000) < 1 / (1 + np.exp(-true_logit))).astype(int)
    raw = 20 * true_logit  # 20x overconfident
    cal = fit_calibration(raw, labels, "temperature", fitted_on="synthetic")
    assert cal.method == "temperature" and cal.bias == 0.0 and cal.fitted_on == "synthetic"
    assert cal.scale == pytest.approx(1 / 20, rel=0.1)
    before, after = quality(raw, labels, type(cal)()), quality(raw, labels, cal)
    assert after.ece < before.ece / 3 and after.log_loss < before.log_loss

    shifted = raw + 30  # Platt also removes an offset
    platt = fit_calibration(shifted, labels, "platt")
    assert platt.scale == pytest.approx(1 / 20, rel=0.1)
    assert platt.bias == pytest.approx(-1.5, abs=0.3)


def test_calibration_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both"):
        fit_calibration([1.0, 2.0], [1, 1])
