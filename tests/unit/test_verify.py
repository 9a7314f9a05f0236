"""Verified prefixes (``truncate.verify``) without Ray: the per-row search runs through an
EngineServer on the scripted judge and student (tests/support/scripted_engines.py), whose CoT
markers script both P(ENOUGH) and how many of a prefix's rollouts reach the gold answer, so
every move is known in advance; the rollouts are graded by the real grading worker."""

import pytest
from scripted_engines import ScriptedJudge

from palign.engines.guard import GuardedEngine
from palign.engines.server import EngineServer
from palign.method.grading import Grader
from palign.method.segment import sentence_ends
from palign.stages.truncate import Truncate, TruncateSection, batch_metrics, truncate_rows
from palign.stages.verify import VerifyConfig, rollouts

TOTAL = 10  # sentences per CoT: one move adds max(1, ceil(0.1 * 10)) = 1 sentence


def row(name, rates, enough_from=4, answer="42"):
    """A CoT of TOTAL sentences the judge calls enough from sentence ``enough_from`` on;
    ``rates`` maps a sentence to the ``r R/D`` its marker carries (the last one in a prefix
    scripts its rollouts; none: they all fail)."""
    sentences = []
    for i in range(1, TOTAL + 1):
        p = "0.9" if i >= enough_from else "0.1"
        rate = f" r {rates[i]}" if i in rates else ""
        sentences.append(f"Step {i} multiplies the terms [p {p}{rate}].")
    return {"id": name, "question": "What is 6 times 7? (answer 42)", "answer": answer,
            "cot": " ".join(sentences)}


ROWS = [
    row("passes", {4: "4/4"}),  # the searched prefix passes: 0 moves
    row("moves-once", {4: "1/4", 5: "3/4"}),  # 1/4 < 0.5, then 3/4: one move
    row("never", {}),  # no rollout ever passes: max_moves moves, not verified
    row("insufficient", {}, enough_from=TOTAL + 1),  # the search finds nothing sufficient
    row("no-gold", {4: "4/4"}, answer=None),
]
VERIFY = VerifyConfig(samples=4, min_pass=0.5, max_moves=3)


@pytest.fixture(scope="module")
def grader():
    with Grader(timeout_s=10) as g:
        yield g


def run(rows, cfg, grader=None):
    """truncate_rows through an EngineServer, as the stage worker runs it; with the backend."""
    backend = ScriptedJudge()
    server = EngineServer(backend, max_in_flight=8)
    try:
        return truncate_rows(rows, GuardedEngine(server), cfg, grader), backend
    finally:
        server.close()


@pytest.fixture(scope="module")
def verified(grader):
    outcomes, backend = run(ROWS, TruncateSection(verify=VERIFY), grader)
    return {o.id: o.record for o in outcomes}, backend


def test_a_prefix_whose_rollouts_pass_stays(verified):
    rec = verified[0]["passes"]
    assert rec["verify"] == {"samples": 4, "min_pass": 0.5, "search_k": 4,
                             "moves": [{"k": 4, "passed": 4, "of": 4}], "final_k": 4,
                             "passed": True, "tokens": rec["verify"]["tokens"]}
    assert rec["verify"]["tokens"] > 0 and rec["sentences_kept"] == 4
    assert Truncate().index(rec)["verify_moves"] == 0 and Truncate().index(rec)["verified"]


def test_a_prefix_under_min_pass_moves_exactly_once(verified):
    rec, cot = verified[0]["moves-once"], ROWS[1]["cot"]
    ends = sentence_ends(cot)
    assert rec["verify"]["moves"] == [{"k": 4, "passed": 1, "of": 4},
                                      {"k": 5, "passed": 3, "of": 4}]
    assert (rec["verify"]["search_k"], rec["verify"]["final_k"]) == (4, 5)
    assert rec["verify"]["passed"] is True
    # the prefix fields describe the final prefix; the probes still say where the search ended
    assert rec["sentences_kept"] == 5 and rec["prefix"] == cot[:ends[4]]
    assert rec["prefix_offset"] == ends[4] and rec["prefix_ratio"] == ends[4] / len(cot)
    assert rec["sufficient"] is True and rec["prefix"].endswith("r 3/4].")
    assert min(p["k"] for p in rec["probes"] if p["verdict"] == "ENOUGH") == 4
    index = Truncate().index(rec)
    assert (index["verify_moves"], index["verified"]) == (1, True)


def test_rollouts_that_never_pass_stop_after_max_moves(verified):
    rec = verified[0]["never"]
    assert [m["k"] for m in rec["verify"]["moves"]] == [4, 5, 6, 7]  # max_moves = 3 moves
    assert all(m["passed"] == 0 for m in rec["verify"]["moves"])
    assert rec["verify"]["passed"] is False and rec["verify"]["final_k"] == 7
    assert rec["sentences_kept"] == 7  # the last prefix tried
    index = Truncate().index(rec)
    assert (index["verify_moves"], index["verified"]) == (3, False)


def test_exactly_min_pass_is_enough(grader):
    (out,), _ = run([row("half", {4: "2/4"})], TruncateSection(verify=VERIFY), grader)
    assert out.record["verify"]["moves"] == [{"k": 4, "passed": 2, "of": 4}]
    assert out.record["verify"]["passed"] is True


def test_moves_stop_at_the_whole_cot(grader):
    cot_end = row("late", {}, enough_from=TOTAL - 1)
    (out,), _ = run([cot_end], TruncateSection(verify=VERIFY.model_copy(
        update={"max_moves": 5})), grader)
    assert [m["k"] for m in out.record["verify"]["moves"]] == [TOTAL - 1, TOTAL]
    assert out.record["verify"]["passed"] is False and out.record["sentences_kept"] == TOTAL


def test_rows_verification_cannot_check_say_why(verified):
    assert "no sufficient prefix" in verified[0]["insufficient"]["verify"]["skipped"]
    assert "no gold answer" in verified[0]["no-gold"]["verify"]["skipped"]
    for name in ("insufficient", "no-gold"):
        assert Truncate().index(verified[0][name])["verify_moves"] is None


def test_rollouts_are_seeded_apart(verified):
    """The default sampling seed is 0: were it reused, K rollouts would be K copies."""
    drawn = [r for r in verified[1].requests if r["kind"] == "rollout"]
    assert len(drawn) == 4 * (1 + 2 + 4)  # passes, moves-once, never
    by_row = {}
    for r in drawn:
        key = "moves-once" if "r 1/4" in r["draft_end"] or "r 3/4" in r["draft_end"] else \
            ("passes" if "r 4/4" in r["draft_end"] else "never")
        by_row.setdefault(key, []).append(r["seed"])
    assert sorted(by_row["moves-once"]) == list(range(8))
    assert sorted(by_row["never"]) == list(range(16))
    assert all(len(set(seeds)) == len(seeds) for seeds in by_row.values())


def test_verify_off_keeps_todays_record(verified):
    """Off (the default), a record is the search's own: no verify field, the same prefix;
    a row whose searched prefix passed differs only by its verify field."""
    off, _ = run(ROWS, TruncateSection())
    lockstep, _ = run(ROWS, TruncateSection(search="lockstep"))
    assert [o.record for o in off] == [o.record for o in lockstep]
    assert all("verify" not in o.record for o in off)
    passes = dict(verified[0]["passes"])
    passes.pop("verify")
    assert passes == off[0].record
    assert off[1].record["sentences_kept"] == 4  # the move is verification's, not the search's
    assert Truncate().index(off[0].record)["verify_moves"] is None
    assert "verify_moved_share" not in Truncate().stats(
        Truncate().index_values([o.record for o in off]))


def test_index_stats_and_metrics_count_the_checks(verified):
    records = list(verified[0].values())
    stats = Truncate().stats(Truncate().index_values(records))
    checked = 3  # passes, moves-once, never
    assert stats["verify_moved_share"] == 2 / checked
    assert stats["verify_failed_share"] == 1 / checked
    assert stats["mean_verify_moves"] == (0 + 1 + 3) / checked
    rollout_tokens = sum(r["verify"].get("tokens", 0) for r in records)
    judge_tokens = sum(r["judge_prompt_tokens"] for r in records)
    assert batch_metrics(records).tokens == judge_tokens + rollout_tokens > judge_tokens


def test_rollouts_grade_each_continuation(grader):
    """The audit's entry: K graded continuations of one prefix, seeded seed + i."""
    import asyncio

    from palign.engines.base import Sampling

    backend = ScriptedJudge()
    server = EngineServer(backend)
    try:
        got = asyncio.run(rollouts(GuardedEngine(server), grader, "6*7? (answer 42)",
                                   "Multiply [p 0.9 r 1/2].", "42", 4,
                                   Sampling(max_tokens=32, temperature=0.6, seed=10)))
    finally:
        server.close()
    assert sorted(r.seed for r in got) == [10, 11, 12, 13]
    assert sum(r.passed for r in got) == 2
    assert all(r.source == "continuation" and r.tokens > 0 for r in got)
    assert {r.predicted for r in got} == {"42", "-1"}


def test_the_stage_grades_only_when_verifying():
    stage = Truncate()
    assert not stage.needs_grader(TruncateSection())
    on = TruncateSection(verify={"samples": 2, "grade_timeout_s": 7})
    assert stage.needs_grader(on) and stage.grade_timeout(on) == 7
    assert stage.output_budget(on) == ("verify.sampling.max_tokens", 1024)
    assert stage.output_budget(TruncateSection()) == ("judge_max_tokens", 1)


def test_verify_is_in_the_fingerprint_and_off_changes_nothing():
    """Its settings change rows, so they are truncate's fingerprint; off, a run made before
    verify existed resumes (an absent field and a null one are the same)."""
    from palign.data.fingerprint import changes, section_fields

    off = section_fields(TruncateSection())
    before = {k: v for k, v in off.items() if k != "verify"}
    assert not changes({"truncate": before}, {"truncate": off})
    on = section_fields(TruncateSection(verify=VERIFY))
    changed = {c.field for c in changes({"truncate": off}, {"truncate": on})}
    assert {"truncate.verify.samples", "truncate.verify.min_pass", "truncate.verify.max_moves",
            "truncate.verify.sampling.seed", "truncate.verify.gold"} <= changed


def test_the_worker_starts_a_grader_only_for_verify(tmp_path):
    """The stage worker (no Ray here) asks the stage whether it grades: truncate only with
    verify on, with verify's own time limit; the committed rows carry the verify record."""
    import json

    from palign.config import parse_config
    from palign.data.shards import read_index, read_rows
    from palign.runtime.spec import WorkerSpec
    from palign.runtime.worker import StageWorker

    model = str(tmp_path)  # a folder: resolved as it is; the scripted backend loads nothing
    raw = {"run": {"output_dir": str(tmp_path / "run"), "stages": ["truncate"]},
           "data": {"path": "unused.jsonl"}, "models": {"student": model},
           "truncate": {"engine": {"backend": "scripted_engines:ScriptedJudge"}}}
    off = StageWorker(WorkerSpec.of(parse_config(raw), "truncate", model))
    off.engine.close()
    assert off.grader is None
    raw["truncate"]["verify"] = {"samples": 4, "grade_timeout_s": 9}
    worker = StageWorker(WorkerSpec.of(parse_config(raw), "truncate", model))
    try:
        assert worker.grader is not None and worker.grader.timeout_s == 9
        got = worker({"record": [json.dumps(r) for r in ROWS[:3]]})
    finally:
        worker.engine.close()
        worker.grader.close()
    assert got["ok"] == [3]
    out = str(tmp_path / "run" / "truncate")
    moves = {r["id"]: len(r["verify"]["moves"]) - 1 for r in read_rows(out)}
    assert moves == {"passes": 0, "moves-once": 1, "never": 3}
    index = read_index(out, ("id", "verify_moves", "verified")).to_pylist()
    assert {r["id"]: (r["verify_moves"], r["verified"]) for r in index} == {
        "passes": (0, True), "moves-once": (1, True), "never": (3, False)}
