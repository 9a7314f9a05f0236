import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from palign.method.search import BinarySearch, FixedRatioSearch, FullSearch, make_search, max_probes


def run(search, judge):
    while (k := search.next_probe()) is not None:
        search.record(k, "ENOUGH" if judge(k) else "NOT_ENOUGH")
    return search.result()


@given(total=st.integers(1, 400), data=st.data())
def test_binary_finds_brute_force_minimum_on_monotone_judges(total, data):
    threshold = data.draw(st.integers(1, total + 1))  # total + 1: nothing is sufficient
    judge = lambda k: k >= threshold  # noqa: E731
    res = run(BinarySearch(total), judge)
    brute = next((k for k in range(1, total + 1) if judge(k)), None)
    assert len(res.probes) <= max_probes(total) == math.ceil(math.log2(total + 1))
    if brute is None:
        assert (res.kept, res.sufficient) == (total, False)
    else:
        assert (res.kept, res.sufficient) == (brute, True)
    assert all(1 <= p.k <= total for p in res.probes)


@given(verdicts=st.lists(st.booleans(), min_size=1, max_size=200))
def test_binary_on_any_judge_keeps_a_prefix_it_judged_enough(verdicts):
    res = run(BinarySearch(len(verdicts)), lambda k: verdicts[k - 1])
    assert len(res.probes) <= max_probes(len(verdicts))
    if res.sufficient:
        assert verdicts[res.kept - 1]
        assert any(p.k == res.kept and p.verdict == "ENOUGH" for p in res.probes)
    else:
        assert res.kept == len(verdicts)
        assert all(p.verdict != "ENOUGH" for p in res.probes)


def test_unparsed_counts_as_not_enough():
    s = BinarySearch(3)
    s.record(s.next_probe(), "UNPARSED")
    s.record(s.next_probe(), "ENOUGH")
    assert s.result().kept == 3


def test_wrong_probe_and_unfinished_search_are_errors():
    s = BinarySearch(10)
    with pytest.raises(ValueError):
        s.record(s.next_probe() + 1, "ENOUGH")
    with pytest.raises(RuntimeError):
        s.result()


@pytest.mark.parametrize("total,ratio,kept", [(10, 0.25, 3), (4, 0.25, 1), (1, 0.1, 1),
                                              (7, 1.0, 7), (8, 0.5, 4)])
def test_fixed_ratio_rounds_up(total, ratio, kept):
    res = FixedRatioSearch(total, ratio).result()
    assert (res.kept, res.probes, res.sufficient) == (kept, [], True)


def test_full_keeps_everything_without_probes():
    s = FullSearch(5)
    assert s.next_probe() is None
    assert s.result().kept == 5
    assert isinstance(make_search("full", 5), FullSearch)
    with pytest.raises(ValueError):
        make_search("nope", 5)
