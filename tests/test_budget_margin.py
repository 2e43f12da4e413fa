"""A perplexity budget is met on a margin: the upper confidence bound of the increase over the
held-out windows (paired per-window NLL differences vs float, Student t), not the mean alone."""

from __future__ import annotations

import math

import pytest

from slimport.analyze.budget import Budget
from slimport.analyze.margin import check_confidence, relative_increase, t_quantile
from slimport.errors import SlimportError

FLOAT = [3.40, 3.55, 3.31, 3.62, 3.47, 3.38, 3.51, 3.44]  # per-window mean NLL, nats


def quantized(deltas: list[float]) -> list[float]:
    return [f + d for f, d in zip(FLOAT, deltas, strict=True)]


def test_without_confidence_the_increase_is_the_slice_perplexity_ratio():
    q = quantized([0.03, 0.05, 0.02, 0.06, 0.04, 0.05, 0.03, 0.04])
    ratio = math.exp(sum(q) / 8) / math.exp(sum(FLOAT) / 8)
    assert relative_increase(q, FLOAT, 0) == pytest.approx(ratio - 1, rel=1e-12)


def test_the_bound_is_the_mean_when_the_windows_agree():
    q = quantized([0.04] * 8)
    assert relative_increase(q, FLOAT, 0.9) == pytest.approx(math.expm1(0.04), rel=1e-12)
    assert relative_increase(q, FLOAT, 0.99) == pytest.approx(relative_increase(q, FLOAT, 0))


def test_the_bound_is_the_student_t_upper_limit_of_the_mean_difference():
    d = [0.01, 0.07, 0.02, 0.06, 0.03, 0.05, 0.00, 0.08]
    mean, sd = sum(d) / 8, math.sqrt(sum((x - 0.04) ** 2 for x in d) / 7)
    expected = math.expm1(mean + 1.4149 * sd / math.sqrt(8))  # t_{0.9, 7} = 1.4149 (tables)
    assert relative_increase(quantized(d), FLOAT, 0.9) == pytest.approx(expected, rel=1e-4)


def test_a_plan_that_meets_on_the_mean_but_not_on_the_bound_is_refused():
    budget = Budget("ppl", 0.05)
    d = [0.00, 0.09, 0.01, 0.08, 0.02, 0.07, 0.03, 0.06]  # mean 0.045: +4.6%, spread wide
    q = quantized(d)
    mean, bound = relative_increase(q, FLOAT, 0), relative_increase(q, FLOAT, 0.9)
    assert budget.met(mean, 6.0) and not budget.met(bound, 6.0)
    # the same mean with agreeing windows passes
    assert budget.met(relative_increase(quantized([0.045] * 8), FLOAT, 0.9), 6.0)


def test_the_bound_widens_with_confidence_and_narrows_with_more_windows():
    d = [0.01, 0.07, 0.02, 0.06, 0.03, 0.05, 0.00, 0.08]
    q = quantized(d)
    assert relative_increase(q, FLOAT, 0.8) < relative_increase(q, FLOAT, 0.9)
    assert relative_increase(q, FLOAT, 0.9) < relative_increase(q, FLOAT, 0.99)
    twice = relative_increase(q + q, FLOAT + FLOAT, 0.9)  # same spread, 16 windows
    assert relative_increase(q, FLOAT, 0) < twice < relative_increase(q, FLOAT, 0.9)


@pytest.mark.parametrize(
    ("p", "dof", "table"),
    [(0.9, 1, 3.0777), (0.9, 7, 1.4149), (0.95, 15, 1.7531), (0.99, 2, 6.9646), (0.5, 4, 0.0)],
)
def test_t_quantiles_match_the_tables(p, dof, table):
    assert t_quantile(p, dof) == pytest.approx(table, abs=2e-4)


@pytest.mark.parametrize(
    ("confidence", "windows", "message"),
    [(1.0, 8, r"--confidence 1.0: a probability in \[0, 1\)"),
     (-0.1, 8, "a probability"),
     (0.9, 1, r"--confidence 0.9: a bound over windows needs at least 2 \(--windows 1\)")],
)  # fmt: skip
def test_bad_confidences_are_refused(confidence, windows, message):
    with pytest.raises(SlimportError, match=message):
        check_confidence(confidence, windows)
    check_confidence(0, 1)  # no margin: one window will do
