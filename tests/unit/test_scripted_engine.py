"""The scripted judge of tests/support (what the audit and verify tests plug in by import path)
does what its markers say: the label scores give back the scripted P(ENOUGH), rollouts pass
exactly R of every D samples, and every sample's seed is recorded. No Ray, no model."""

import json
import random

import pytest
from scripted_engines import ScriptedJudge, label_logprobs, scripted_score
from synthetic_rows import rows_with_curve

from palign.engines import Backend, EngineSpec, build_engine
from palign.engines.base import Sampling
from palign.method.grading import last_boxed
from palign.method.prompts import align_chat, judge_chat
from palign.method.segment import sentence_ends
from palign.method.verdict import LABELS, enough_probability

CURVE = [0.0, 0.3, 0.25, 0.5, 0.85, 0.6, 1.0]
RATES = [(0, 4), (1, 4), None, (2, 4), (3, 4), (1, 2), (4, 4)]


def prefixes(row):
    ends = sentence_ends(row["cot"])
    return [row["cot"][:e] for e in ends]


def test_label_scores_give_back_the_scripted_p_exactly():
    (row,) = rows_with_curve([CURVE], [RATES])
    judge = ScriptedJudge()
    chats = [judge_chat(row["question"], p) for p in prefixes(row)]
    assert len(chats) == len(CURVE)  # each marker stays in its own sentence
    got = [enough_probability(s.logprobs[LABELS[0]], s.logprobs[LABELS[1]])
           for s in judge.score_labels(chats, list(LABELS))]
    assert got == CURVE  # these floats are reachable: exact, not approximate
    # Any p: the score is scripted_score(p), a few ulps from p at most.
    rng = random.Random(3)
    for p in [rng.random() for _ in range(300)] + [1e-9, 1 - 1e-9]:
        lp = label_logprobs(p)
        assert enough_probability(*lp) == scripted_score(p)
        assert abs(scripted_score(p) - p) <= 1e-15
        assert all(x <= 0 for x in lp)  # log-probabilities, as an engine gives them


def test_rollouts_pass_exactly_r_of_every_d_and_record_distinct_seeds(tmp_path):
    (row,) = rows_with_curve([CURVE], [RATES])
    log = tmp_path / "requests.jsonl"
    spec = EngineSpec(model="none", backend="scripted_engines:ScriptedJudge",
                      engine_kwargs={"log": str(log)})
    engine = build_engine(spec)  # as a worker builds it, by import path
    assert isinstance(engine, ScriptedJudge) and isinstance(engine, Backend)
    k_samples = 8
    for k, prefix in enumerate(prefixes(row), start=1):
        chat = align_chat(row["question"], prefix)
        # Samples one at a time (as per-request seeds send them) and in a batch alike.
        single = [engine.generate([chat], Sampling(temperature=1.0, seed=100 * k + i))[0]
                  for i in range(k_samples // 2)]
        batch = engine.generate([chat] * (k_samples // 2),
                                Sampling(temperature=1.0, seed=100 * k + 50))
        passed = sum(last_boxed(c.text) == row["answer"] for c in single + batch)
        rate = next((r for r in reversed(RATES[:k]) if r is not None), (0, 1))
        assert passed == k_samples * rate[0] // rate[1]
        assert all(last_boxed(c.text) in (row["answer"], "-1") for c in single + batch)
        assert all(c.completion_tokens > 0 and not c.error for c in single + batch)
    seeds = [r["seed"] for r in engine.requests if r["kind"] == "rollout"]
    assert len(seeds) == k_samples * len(CURVE) == len(set(seeds))
    assert [json.loads(line) for line in log.read_text().splitlines()] == engine.requests


def test_generated_verdicts_and_other_prompts():
    (row,) = rows_with_curve([CURVE])
    judge = ScriptedJudge()
    chats = [judge_chat(row["question"], p) for p in prefixes(row)]
    texts = [c.text for c in judge.generate(chats, Sampling(temperature=0.0))]
    assert [t == "ENOUGH" for t in texts] == [p >= 0.5 for p in CURVE]
    # No r marker anywhere: every rollout fails; an unknown prompt is an error, not a guess.
    (c,) = judge.generate([align_chat(row["question"], row["cot"])], Sampling())
    assert last_boxed(c.text) == "-1"
    (bad,) = judge.generate([[{"role": "user", "content": "Write a poem."}]], Sampling())
    assert bad.error
    (bad_score,) = judge.score_labels([[{"role": "user", "content": "hi"}]], list(LABELS))
    assert bad_score.error
    with pytest.raises(ValueError):
        rows_with_curve([[0.1, 0.2]], [[(1, 2)]])
