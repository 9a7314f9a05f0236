"""The judge audit's method (palign.method.audit): the grid, the replayed binary search against
a scan, the breaks counted exactly, and the agreement, threshold and finish-rate figures on
hand-made cases whose answers are worked out below."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scripted_engines import ScriptedJudge, scripted_score
from synthetic_rows import rows_with_curve

from palign.engines.base import Sampling
from palign.method.audit import (
    AuditRow,
    Rollout,
    agreement,
    audit_row,
    best_threshold,
    calibration_error,
    finish_rate_at,
    monotonicity_breaks,
    next_missing,
    probe_grid,
    rank_auc,
    reliability,
    replay_binary,
    rollout_pairs,
    rollout_points,
    scan_choice,
    with_rollouts,
)
from palign.method.grading import last_boxed
from palign.method.prompts import align_chat, judge_chat
from palign.method.search import BinarySearch, Probe, max_probes
from palign.method.segment import sentence_ends
from palign.method.verdict import LABELS, enough_probability, verdict_from_score


def curve_of(scores, t=0.5):
    return [Probe(k, verdict_from_score(s, t), s) for k, s in enumerate(scores, start=1)]


def direct_binary(m, judge):
    search = BinarySearch(m)
    while (k := search.next_probe()) is not None:
        search.record(k, "ENOUGH" if judge(k) else "NOT_ENOUGH")
    return search.result()


def test_probe_grid_every_k_or_an_even_grid_with_both_ends():
    assert probe_grid(10) == list(range(1, 11))
    assert probe_grid(64, 64) == list(range(1, 65))
    grid = probe_grid(200, 64)
    assert len(grid) == 64 and grid[0] == 1 and grid[-1] == 200 and grid == sorted(set(grid))
    gaps = {b - a for a, b in zip(grid, grid[1:])}
    assert gaps <= {3, 4}  # 199 / 63 = 3.16: even up to rounding
    assert probe_grid(5, 2) == [1, 5]
    with pytest.raises(ValueError):
        probe_grid(0)
    with pytest.raises(ValueError):
        probe_grid(10, 1)


def test_breaks_counted_exactly():
    # t = 0.5: N E N E E N E. Breaks: 2->3 (flip), 4->5 (a drop of 0.3, both ENOUGH), 6->7 is
    # a rise, 5->6 a flip; 1->2 and 3->4 rise.
    curve = curve_of([0.1, 0.6, 0.4, 0.9, 0.6, 0.2, 0.9])
    assert monotonicity_breaks(curve) == [(2, 3), (4, 5), (5, 6)]
    assert monotonicity_breaks(curve, tol=0.35) == [(2, 3), (5, 6)]  # flips count at any tol
    # Small wobbles under tol are not breaks; generated verdicts (no scores) count flips only.
    assert monotonicity_breaks(curve_of([0.1, 0.3, 0.27, 0.8, 0.78])) == []
    gen = [Probe(1, "NOT_ENOUGH", None), Probe(2, "ENOUGH", None), Probe(3, "UNPARSED", None)]
    assert monotonicity_breaks(gen) == [(2, 3)]
    assert monotonicity_breaks(curve_of([0.1, 0.2, 0.6, 0.9])) == []


def test_binary_lands_elsewhere_than_the_scan_on_a_non_monotone_curve():
    # N E N N N N E: binary probes 4 (N), 6 (N), 7 (E) and keeps 7; the scan keeps 2.
    scores = [0.1, 0.7, 0.2, 0.3, 0.2, 0.4, 0.9]
    row = audit_row("r", 7, 0.5, "score", curve_of(scores))
    assert (row.binary_k, row.binary_probes, row.binary_sufficient) == (7, [4, 6, 7], True)
    assert row.scan_k == 2
    assert row.breaks == [(2, 3), (4, 5)]  # a flip, then a drop of 0.1
    # Nothing judged enough: both keep the whole CoT, and binary says it found nothing.
    flat = audit_row("f", 3, 0.5, "score", curve_of([0.1, 0.2, 0.3]))
    assert (flat.binary_k, flat.binary_sufficient, flat.scan_k) == (3, False, 3)


@settings(max_examples=200, deadline=None)
@given(scores=st.lists(st.floats(0, 1), min_size=1, max_size=120),
       t=st.floats(0.05, 0.95), grid=st.integers(2, 40))
def test_replay_is_truncates_binary_search_on_any_curve(scores, t, grid):
    m = len(scores)
    judge = lambda k: scores[k - 1] >= t  # noqa: E731
    expected = direct_binary(m, judge)
    every = curve_of(scores, t)
    # Probed as the audit stage does: the grid, then each k the replay still needs.
    known = {k: every[k - 1] for k in probe_grid(m, grid)}
    extra = 0
    while (k := next_missing(m, known)) is not None:
        known[k] = every[k - 1]
        extra += 1
    assert extra <= max_probes(m)
    row = audit_row("x", m, t, "score", known.values())
    assert (row.binary_k, row.binary_sufficient) == (expected.kept, expected.sufficient)
    assert row.binary_probes == [p.k for p in expected.probes]
    assert row.binary_probes == [p.k for p in replay_binary(m, lambda k: (
        every[k - 1].verdict, every[k - 1].score)).probes]
    assert [p.k for p in row.curve] == sorted(known)
    # On the full curve the scan is the first k over t; on a monotone one the two agree.
    assert scan_choice(every, m) == next((k for k in range(1, m + 1) if judge(k)), m)
    monotone = sorted(scores)
    mrow = audit_row("m", m, t, "score", curve_of(monotone, t))
    assert mrow.binary_k == mrow.scan_k
    assert all(monotone[a - 1] - monotone[b - 1] <= 0 for a, b in mrow.breaks)
    assert mrow.breaks == []


def test_audit_row_needs_every_k_binary_asks_for():
    with pytest.raises(ValueError, match="k=4"):
        audit_row("r", 7, 0.5, "score", [Probe(1, "ENOUGH", 0.9)])


def test_rollout_points():
    assert rollout_points(20, 6, 3, points=3) == [3, 5, 6]
    assert rollout_points(20, 6, 6, points=3) == [5, 6, 10]
    assert rollout_points(20, 6, 6, points=5) == [5, 6, 10, 20]
    assert rollout_points(20, 6, 3, points=1) == [6]
    assert rollout_points(1, 1, 1) == [1]
    # Off the grid, the quarter points move to the nearest probed k (the lower on a tie).
    assert rollout_points(100, 40, 40, 4, curve_ks=[1, 24, 27, 40, 49, 52, 100]) == [
        24, 40, 49, 100]


PAIRS = [(0.1, 0.0), (0.3, 0.25), (0.4, 0.75), (0.6, 0.5), (0.8, 1.0), (0.9, 0.25)]


def test_agreement_and_auc_on_a_hand_made_case():
    # target 0.5: finishing points score 0.4, 0.6, 0.8; failing ones 0.1, 0.3, 0.9.
    a = agreement(PAIRS, 0.5, 0.5)
    assert (a.tp, a.fp, a.fn, a.tn) == (2, 1, 1, 2)
    assert a.accuracy == pytest.approx(4 / 6)
    assert a.balanced_accuracy == pytest.approx(2 / 3)
    assert a.auc == pytest.approx(6 / 9)  # 0.4, 0.6 and 0.8 each beat 0.1 and 0.3, not 0.9
    assert rank_auc([0.5, 0.5], [True, False]) == 0.5
    assert rank_auc([0.2, 0.7, 0.7, 0.9], [False, True, False, True]) == pytest.approx(0.875)
    assert rank_auc([0.1, 0.2], [True, True]) is None
    assert agreement([(0.2, 1.0)], 0.5, 0.5).balanced_accuracy is None


def test_best_threshold_exact_and_ties_to_the_middle():
    # Candidates 0.2, 0.35, 0.5, 0.7, 0.85 give balanced accuracy 2/3, 5/6, 2/3, 1/2, 1/3.
    s = best_threshold(PAIRS, 0.5)
    assert (s.threshold, s.low, s.high) == (0.35, 0.35, 0.35)
    assert s.balanced_accuracy == pytest.approx(5 / 6)
    # Past 0.5 one finishing and one failing point change sides: 0.35 and 0.65 tie at 3/4.
    tie = best_threshold([(0.2, 0.0), (0.5, 0.0), (0.5, 1.0), (0.8, 1.0)], 0.5)
    assert (tie.low, tie.high, tie.balanced_accuracy) == (0.35, 0.65, 0.75)
    assert tie.threshold == pytest.approx(0.5)
    assert best_threshold([(0.3, 1.0), (0.6, 1.0)], 0.5) is None  # one class
    assert best_threshold([(0.3, 1.0), (0.3, 0.0)], 0.5) is None  # one distinct score
    # Ranked backwards: every split does worse than chance, so no suggestion.
    assert best_threshold([(0.8, 0.0), (0.9, 0.0), (0.7, 1.0)], 0.5) is None
    perfect = best_threshold([(0.1, 0), (0.2, 0), (0.7, 1), (0.9, 1)], 0.5)
    assert (perfect.threshold, perfect.balanced_accuracy) == (pytest.approx(0.45), 1.0)


def test_reliability_bins_and_calibration_error():
    table = reliability([(0.05, 0.0), (0.15, 1.0), (0.12, 0.0), (1.0, 1.0), (0.95, 0.5)])
    assert [b.n for b in table] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert table[1].mean_score == pytest.approx(0.135) and table[1].pass_rate == 0.5
    assert table[2].mean_score is None and table[9].pass_rate == 0.75
    # |0.05-0| + 2|0.135-0.5| + 2|0.975-0.75|, over 5 points
    assert calibration_error(table) == pytest.approx((0.05 + 0.73 + 0.45) / 5)
    assert calibration_error(reliability([])) is None


def test_finish_rate_exact_or_interpolated():
    a = with_rollouts(audit_row("a", 4, 0.5, "score", curve_of([0.2, 0.4, 0.6, 0.8])),
                      [Rollout(3, 4, 2), Rollout(1, 4, 0)])
    b = with_rollouts(audit_row("b", 5, 0.5, "score", curve_of([0.1, 0.1, 0.7, 0.9, 0.9])),
                      [Rollout(1, 2, 0), Rollout(5, 2, 2)])
    assert [r.k for r in a.rollouts] == [1, 3] and a.rollouts[1].score == 0.6
    f = finish_rate_at([a, b], 0.5)  # a keeps 3 (rolled out: 0.5), b keeps 3 (0 .. 1: 0.5)
    assert (f.rate, f.rows, f.exact, f.interpolated) == (0.5, 2, 1, 1)
    f = finish_rate_at([a, b], 0.95)  # nothing enough: both keep all; a's nearest point is 3
    assert (f.rate, f.exact, f.interpolated) == (0.75, 1, 1)
    assert finish_rate_at([audit_row("g", 1, 0.5, "generate", [Probe(1, "ENOUGH", None)])],
                          0.5).rate is None


def test_record_round_trip_and_contract_keys():
    row = with_rollouts(audit_row("r", 7, 0.5, "score", curve_of([0.1, 0.7, 0.2, 0.3, 0.2,
                                                                   0.4, 0.9])),
                        [Rollout(2, 4, 3, 1, 40), Rollout(7, 4, 4, 0, 30)])
    rec = json.loads(json.dumps(row.to_record()))
    assert set(rec) == {"id", "sentences_total", "threshold", "verdict_mode", "curve", "binary",
                        "scan_k", "breaks", "rollouts"}
    assert rec["binary"] == {"k": 7, "probes": [4, 6, 7], "sufficient": True}
    assert rec["breaks"] == [[2, 3], [4, 5]]
    assert rec["rollouts"][0] == {"k": 2, "score": 0.7, "n": 4, "passed": 3, "from_prefix": 1,
                                  "tokens": 40}
    assert AuditRow.from_record(rec) == row
    assert row.rollouts[0].continuation_rate == 0.5
    assert rollout_pairs([row]) == [(0.7, 0.75), (0.9, 1.0)]


def test_the_scripted_judge_and_student_audited_end_to_end():
    """The audit method on what the scripted engine answers: the scores, breaks and binary
    path are what the markers script, and the rollouts' pass counts are exact."""
    scores = [0.1, 0.7, 0.2, 0.3, 0.2, 0.4, 0.9]
    rates = [(0, 4), (1, 4), (1, 4), (2, 4), (2, 4), (3, 4), (4, 4)]
    (row,) = rows_with_curve([scores], [rates])
    engine = ScriptedJudge()
    cot, ends = row["cot"], sentence_ends(row["cot"])
    m = len(ends)
    probes = []
    for k in probe_grid(m):
        (ls,) = engine.score_labels([judge_chat(row["question"], cot[:ends[k - 1]])],
                                    list(LABELS))
        p = enough_probability(ls.logprobs[LABELS[0]], ls.logprobs[LABELS[1]])
        probes.append(Probe(k, verdict_from_score(p, 0.5), p))
    audited = audit_row(row["id"], m, 0.5, "score", probes)
    assert [p.score for p in audited.curve] == [scripted_score(s) for s in scores]
    assert (audited.binary_k, audited.scan_k, audited.breaks) == (7, 2, [(2, 3), (4, 5)])
    rollouts = []
    for k in rollout_points(m, audited.binary_k, audited.scan_k, 3, [p.k for p in probes]):
        chat = align_chat(row["question"], cot[:ends[k - 1]])
        outs = engine.generate([chat] * 8, Sampling(temperature=1.0, seed=1000 * k))
        passed = sum(last_boxed(c.text) == row["answer"] for c in outs)
        rollouts.append(Rollout(k, 8, passed, 0, sum(c.completion_tokens for c in outs)))
    done = with_rollouts(audited, rollouts)
    assert [(r.k, r.passed, r.score) for r in done.rollouts] == [
        (2, 2, scripted_score(0.7)), (4, 4, scripted_score(0.3)), (7, 8, scripted_score(0.9))]
    # The judge is scripted to mislead at k=2 (P 0.7, a quarter finish) and k=4 (P 0.3, half).
    a = agreement(rollout_pairs([done]), 0.5, 0.5)
    assert (a.tp, a.fp, a.fn, a.tn, a.auc) == (1, 1, 1, 0, 0.5)
