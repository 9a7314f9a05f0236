"""One class per stage, one list of them: what the generic worker, runner, config and CLI ask."""

from __future__ import annotations

import asyncio

import pytest

from palign.config import (
    ConfigError,
    engine_stage_names,
    parse_config,
    registered,
    stage_names,
)
from palign.config.base import Strict
from palign.stages import registry
from palign.stages.base import Context, Outcome, RowStage
from palign.stages.registry import REGISTRY

MINIMAL = {"data": {"path": "x.jsonl"}, "models": {"student": "student-m", "teacher": "t-m"}}


def test_every_stage_has_one_definition():
    assert list(REGISTRY) == list(stage_names()) == [
        "generate", "truncate", "align", "train", "evaluate"]
    assert set(engine_stage_names()) == set(stage_names()) - {"train"}
    for name, stage in REGISTRY.items():
        assert stage.name == name
    assert [n for n in stage_names() if registry.get(n).driver == "rows"] == [
        "generate", "truncate", "align"]
    assert registry.get("train").driver == "train"
    assert registry.get("evaluate").driver == "evaluate"


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


def test_models_and_prompts_per_stage():
    cfg = parse_config({**MINIMAL, "models": {**MINIMAL["models"], "judge": "j-m"}})
    assert registry.get("generate").models_used(cfg) == [("models.teacher", "t-m")]
    assert registry.get("truncate").models_used(cfg) == [("models.judge", "j-m")]
    assert registry.get("align").models_used(cfg) == [("models.student", "student-m")]
    assert registry.get("train").models_used(cfg) == [("models.student", "student-m")]
    assert set(registry.get("truncate").prompts()) == {"judge", "labels"}
    assert registry.get("train").prompts() == {}


class _Section(Strict):
    pass


class Echo(RowStage):
    """A toy stage: its rows wait for each other, so they finish only when run together."""

    name = "echo"
    Section = _Section

    async def process_row(self, row, ctx):
        ctx.section.setdefault("started", 0)
        ctx.section["started"] += 1
        while ctx.section["started"] < ctx.section["rows"]:
            await asyncio.sleep(0.001)
        return Outcome(row["id"], {**row, "echo": row["id"]})


def test_a_row_stage_runs_its_rows_together():
    rows = [{"id": str(i)} for i in range(5)]
    outcomes = Echo().process(rows, Context(None, None, {"rows": len(rows)}))
    assert [o.record["echo"] for o in outcomes] == ["0", "1", "2", "3", "4"]


def test_a_stage_registered_for_a_test_joins_the_list_in_place():
    with registered("echo", f"{__name__}:Echo", after="align"):
        assert stage_names() == ("generate", "truncate", "align", "echo", "train", "evaluate")
        assert isinstance(registry.get("echo"), Echo) and "echo" in REGISTRY
        assert "echo" not in engine_stage_names()
        assert parse_config({**MINIMAL, "run": {"stages": ["align", "echo"]}})
        with pytest.raises(ConfigError, match="keep the order"):
            parse_config({**MINIMAL, "run": {"stages": ["echo", "align"]}})
        with pytest.raises(ValueError, match="already registered"):
            with registered("echo", f"{__name__}:Echo"):
                pass
    assert "echo" not in stage_names()
    with pytest.raises(ConfigError, match="Input should be 'generate', 'truncate', 'align', "
                                          "'train' or 'evaluate'"):
        parse_config({**MINIMAL, "run": {"stages": ["echo"]}})
