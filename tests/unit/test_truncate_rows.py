"""The truncate stage's schedulers without Ray: lockstep (many searches, one engine call per
round) and per row (each search its own coroutine, through an EngineServer).

The judge here is a scripted stand-in (it calls a prefix sufficient once it holds the sentence
"KEY."), so the expected prefix is known exactly; the real engines run in test_pipeline.py.
"""

import math
import threading

import pytest

from palign.engines.base import BackendBase, Completion, LabelScores
from palign.engines.guard import GuardedEngine
from palign.engines.server import EngineServer
from palign.method.search import max_probes
from palign.method.segment import sentence_ends
from palign.stages.truncate import TruncateSection, truncate_rows


class ScriptedJudge(BackendBase):
    name = "scripted"

    def __init__(self):
        self.calls = []

    def _enough(self, chat):
        opening = chat[0]["content"].split("Opening of the solution:\n", 1)[1]
        return "KEY." in opening.split("\n\nAnswer with one word")[0]

    def score_labels(self, chats, labels):
        self.calls.append(len(chats))
        return [LabelScores({"ENOUGH": math.log(0.9 if self._enough(c) else 0.1),
                             "NOT_ENOUGH": math.log(0.1 if self._enough(c) else 0.9)},
                            prompt_tokens=100, cached_tokens=60) for c in chats]

    def generate(self, chats, sampling):
        self.calls.append(len(chats))
        return [Completion("ENOUGH" if self._enough(c) else "not enough, sorry")
                for c in chats]


def make_rows():
    rows = []
    for n, key_at in [(12, 5), (3, 1), (40, 33), (7, None), (25, 25)]:
        sentences = [("KEY." if i + 1 == key_at else f"Step {i + 1} is 1.5 times x.")
                     for i in range(n)]
        rows.append({"id": f"r{n}", "question": "Q?", "answer": "1",
                     "cot": " ".join(sentences), "key_at": key_at, "n": n})
    return rows


def check(rows, outcomes, judge):
    longest = max(len(o.record["probes"]) for o in outcomes)
    # In rounds (no engine server here): one engine call per round, as many as the longest search.
    assert len(judge.calls) == longest <= max(max_probes(r["n"]) for r in rows)
    assert sum(judge.calls) == sum(len(o.record["probes"]) for o in outcomes)
    assert judge.calls[0] == len(rows)  # the first round judges every row at once
    for row, out in zip(rows, outcomes):
        rec = out.record
        assert len(sentence_ends(row["cot"])) == rec["sentences_total"] == row["n"]
        expected = row["key_at"] or row["n"]
        assert rec["sentences_kept"] == expected
        assert rec["sufficient"] is (row["key_at"] is not None)
        assert rec["prefix"] == row["cot"][:rec["prefix_offset"]]
        assert rec["prefix"].endswith("KEY.") or row["key_at"] is None
        assert 1 <= len(rec["probes"]) <= max_probes(row["n"])


def test_score_verdicts_many_searches_in_flight():
    rows, judge = make_rows(), ScriptedJudge()
    outcomes = truncate_rows(rows, judge, TruncateSection(verdict="score", search="lockstep"))
    check(rows, outcomes, judge)
    rec = outcomes[0].record
    assert all(p["score"] is not None for p in rec["probes"])
    assert rec["judge_cached_tokens"] == 60 * len(rec["probes"])


def test_generated_verdicts_and_baselines():
    rows, judge = make_rows(), ScriptedJudge()
    outcomes = truncate_rows(rows, judge, TruncateSection(verdict="generate",
                                                          search="lockstep"))
    check(rows, outcomes, judge)
    full = truncate_rows(rows, None, TruncateSection(strategy="full"))  # no engine to call
    assert all(o.record["prefix"] == r["cot"] and not o.record["probes"]
               for o, r in zip(full, rows))
    fixed = truncate_rows(rows, None, TruncateSection(strategy="fixed_ratio", ratio=0.25))
    assert [o.record["sentences_kept"] for o in fixed] == [3, 1, 10, 2, 7]


def test_rows_without_cot_are_rejected_others_go_on():
    rows = make_rows()[:2] + [{"id": "empty", "question": "Q?", "answer": "1", "cot": "  "}]
    outcomes = truncate_rows(rows, ScriptedJudge(), TruncateSection(search="lockstep"))
    assert [o.ok for o in outcomes] == [True, True, False]
    assert "no CoT" in outcomes[2].reason


@pytest.mark.parametrize("verdict", ["score", "generate"])
def test_per_row_search_takes_the_lockstep_probes(verdict):
    """Each row's coroutine asks the same probes in the same order as the rounds did, so the
    same prefixes come out; the engine saw the probes as they came, not round by round."""
    rows = make_rows()
    cfg = TruncateSection(verdict=verdict)
    in_rounds = ScriptedJudge()
    lockstep = truncate_rows(rows, in_rounds, cfg.model_copy(update={"search": "lockstep"}))
    rounds = len(in_rounds.calls)
    judge = ScriptedJudge()
    server = EngineServer(judge, max_in_flight=3)
    try:
        per_row = truncate_rows(rows, GuardedEngine(server), cfg)
        stats = server.stats()
    finally:
        server.close()
    assert [o.record for o in per_row] == [o.record for o in lockstep]
    assert sum(len(o.record["probes"]) for o in per_row) == sum(judge.calls)
    assert max(judge.calls) <= 3 and stats["peak_in_flight"] <= 3  # engine.max_in_flight
    assert rounds < len(judge.calls)
    if verdict == "score":  # the scripted scores say 100 prompt tokens a probe
        assert all(o.record["judge_longest_prompt_tokens"] == 100 for o in per_row)


def test_per_row_search_fails_every_row_when_the_engine_raises():
    """A judge that raises is the machinery's failure: it reaches the caller (the worker turns
    it into a retried actor), no row becomes a reject, and the server refuses later work."""

    class Breaks(ScriptedJudge):
        def score_labels(self, chats, labels):
            if len(self.calls) >= 2:
                raise RuntimeError("device lost")
            return super().score_labels(chats, labels)

    server = EngineServer(Breaks(), max_in_flight=2)
    try:
        with pytest.raises(Exception, match="device lost"):
            truncate_rows(make_rows(), GuardedEngine(server), TruncateSection())
        with pytest.raises(RuntimeError, match="has failed"):
            server.submit("score", [[{"role": "user", "content": "x"}]], ("A", "B"))
    finally:
        server.close()


def test_server_answers_many_threads_at_once():
    """Batches from several threads share one server; each gets its own answers back."""
    judge = ScriptedJudge()
    server = EngineServer(judge, max_in_flight=64)
    results = {}

    def batch(n):
        rows = make_rows()
        for r in rows:
            r["id"] = f"{r['id']}-{n}"
        results[n] = truncate_rows(rows, GuardedEngine(server), TruncateSection())

    try:
        threads = [threading.Thread(target=batch, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.close()
    expected = truncate_rows(make_rows(), ScriptedJudge(), TruncateSection(search="lockstep"))
    for n in range(4):
        outcomes = results[n]
        assert [o.record["sentences_kept"] for o in outcomes] == \
            [o.record["sentences_kept"] for o in expected]
