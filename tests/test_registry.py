"""One definition per engine stage, one registry: what the generic worker and runner ask."""

from __future__ import annotations

from palign.core.config import ENGINE_STAGES, STAGES, parse_config
from palign.stages.registry import REGISTRY

MINIMAL = {"data": {"path": "x.jsonl"}, "models": {"student": "student-m", "teacher": "t-m"}}


def test_every_engine_stage_has_one_definition():
    assert set(REGISTRY) == set(ENGINE_STAGES) == set(STAGES) - {"train"}
    for name, stage in REGISTRY.items():
        assert stage.name == name


def test_models_and_engines_per_stage():
    cfg = parse_config(MINIMAL)
    assert REGISTRY["generate"].model(cfg) == "t-m"
    assert REGISTRY["truncate"].model(cfg) == "student-m"  # the student judges by default
    assert REGISTRY["align"].model(cfg) == "student-m"
    assert REGISTRY["evaluate"].model(cfg) is None  # one per model under test, named per run
    full = parse_config({**MINIMAL, "truncate": {"strategy": "full"}})
    assert REGISTRY["truncate"].needs_engine(cfg) and not REGISTRY["truncate"].needs_engine(full)
    no_teacher = parse_config({**MINIMAL, "models": {"student": "s"}})
    assert not REGISTRY["generate"].needs_engine(no_teacher)
    # A teacher is loaded only for rows that need one.
    assert not REGISTRY["generate"].engine_for({"has_cot": [True, True]})
    assert REGISTRY["generate"].engine_for({"has_cot": [True, False]})
    assert [n for n, s in REGISTRY.items() if s.grades] == ["align", "evaluate"]


def test_summary_statistics_come_from_the_index_columns():
    truncate = REGISTRY["truncate"]
    rows = [{"prefix_ratio": 0.5, "sentences_kept": 1, "sentences_total": 2, "probes": [{}, {}],
             "sufficient": True, "judge_prompt_tokens": 100, "judge_cached_tokens": 60,
             "cot": "a long text the index never holds"}]
    columns = truncate.index_values(rows)
    assert set(columns) == set(truncate.index_columns) and columns["probes"] == [2]
    stats = truncate.stats(columns)
    assert stats["mean_prefix_ratio"] == 0.5 and stats["prompt_cache_share"] == 0.6
    assert stats["mean_sentence_ratio"] == 0.5 and stats["probes_per_example"] == 2
    align = REGISTRY["align"]
    assert align.stats(align.index_values([{"answer_correct": True, "continuation_tokens": 8},
                                           {"answer_correct": False},
                                           {"answer_correct": None}])) == {
        "answer_correct_share": 1 / 3, "kept_right": 1, "kept_wrong": 1, "kept_unchecked": 1,
        "mean_continuation_tokens": 8 / 3}
    assert align.reject_stats(["wrong answer: predicted '1', gold '2'", "uncheckable: ...",
                               "student: prompt too long"], 7) == {
        "dropped_wrong": 1, "rejected_uncheckable": 1, "retention": 0.7}
    assert all(s.stats(s.index_values([])) == {} for s in REGISTRY.values())
