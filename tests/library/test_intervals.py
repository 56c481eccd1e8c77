"""Specification of measure.intervals: how sure an accuracy is, and a paired comparison.

Checked against values computed independently (Wilson's formula by hand, McNemar's test
from the binomial distribution), and for the behaviour that matters: two models that
agree on every picture cannot be told apart, one that is better on many pictures can.
"""
import math

import pytest

from compress.measure.intervals import (accuracy_interval, describe_difference, mcnemar_p,
                                        paired_difference, tells_apart)


def test_wilson_interval_matches_the_formula():
    # 85 of 100: centre (0.85 + 1.92/100) / 1.0384, half-width from the textbook formula
    low, high = accuracy_interval(85, 100)
    assert low == pytest.approx(0.7672, abs=1e-4) and high == pytest.approx(0.9069, abs=1e-4)


def test_wilson_interval_stays_within_0_and_1_at_the_edges():
    assert accuracy_interval(100, 100)[1] == 1.0 and accuracy_interval(100, 100)[0] < 1.0
    assert accuracy_interval(0, 50)[0] == 0.0 and accuracy_interval(0, 50)[1] > 0.0


def test_more_pictures_give_a_narrower_interval():
    narrow, wide = accuracy_interval(850, 1000), accuracy_interval(85, 100)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 3


def test_mcnemar_is_the_two_sided_binomial_tail_of_the_discordant_pairs():
    # 10 vs 3 discordant pictures: 2 * P(X <= 3), X ~ Binomial(13, 1/2)
    expected = 2 * sum(math.comb(13, k) for k in range(4)) / 2 ** 13
    assert mcnemar_p(10, 3) == pytest.approx(expected)
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(5, 5) == 1.0


def test_two_models_right_on_the_same_pictures_cannot_be_told_apart():
    hits = [1, 0, 1, 1, 0, 1, 1, 1] * 20
    difference = paired_difference(hits, hits)
    assert difference["difference"] == 0 and difference["low"] == difference["high"] == 0
    assert not tells_apart(difference) and difference["p_value"] == 1.0


def test_a_model_better_on_many_pictures_is_told_apart_and_its_interval_holds_the_truth():
    a = [1] * 700 + [0] * 300
    b = [1] * 700 + [1] * 60 + [0] * 240  # right on 60 more pictures: +6 points
    difference = paired_difference(a, b)
    assert difference["difference"] == pytest.approx(0.06)
    assert difference["low"] < 0.06 < difference["high"] and tells_apart(difference)
    assert difference["only_a"] == 0 and difference["only_b"] == 60
    assert difference["p_value"] < 1e-10
    assert describe_difference(difference).startswith("+6.0 points [")


def test_the_bootstrap_is_seeded():
    a, b = [1, 0] * 200, [1, 1, 0, 0] * 100
    assert paired_difference(a, b, seed=3) == paired_difference(a, b, seed=3)


def test_answers_on_other_pictures_are_refused():
    with pytest.raises(ValueError, match="same pictures"):
        paired_difference([1, 0, 1], [1, 0])
