from itertools import combinations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from palign.method.metrics import pass_at_k, pass_at_ks


def brute_force(samples: list[bool], k: int) -> float:
    subsets = list(combinations(range(len(samples)), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@given(samples=st.lists(st.booleans(), min_size=1, max_size=9), data=st.data())
def test_estimator_equals_enumeration_of_subsets(samples, data):
    k = data.draw(st.integers(1, len(samples)))
    assert pass_at_k(len(samples), sum(samples), k) == pytest.approx(brute_force(samples, k))


def test_pass_at_1_is_mean_correctness_and_edges():
    got = pass_at_ks([[True, False, False], [True, True, True], [False, False, False]])
    assert got["pass@1"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert got["pass@3"] == pytest.approx(2 / 3)
    assert list(pass_at_ks([[True, False], [False, False, True]])) == ["pass@1", "pass@2"]
    assert pass_at_k(100, 0, 5) == 0.0 and pass_at_k(100, 99, 5) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_ks([[]])


def test_grade_tally_counts_problems_samples_and_statuses():
    from palign.method.metrics import GradeTally, grade_figures

    tally = GradeTally()
    tally.add([(True, "ok"), (False, "no_answer"), (False, "timeout")])
    tally.add((c, s) for c, s in [(False, "ok"), (True, "ok")])
    assert tally.problems == 2 and tally.correct == [[True, False, False], [False, True]]
    assert tally.counts() == {"problems": 2, "samples": 5, "n_min": 2, "n_max": 3}
    assert tally.figures() == grade_figures(tally.correct, tally.statuses)
    with pytest.raises(ValueError):
        GradeTally().counts()
