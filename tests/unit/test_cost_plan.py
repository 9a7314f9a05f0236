"""``palign plan``: the projection's arithmetic and the tag on every figure
(``palign.report.plan``), and the driver (``palign.runtime.costplan``) reading a finished run
with ``--from``: a synthetic run projected to its own row count gives back its own stage times.
The fast tests start no Ray; the demo check at the end runs the sample through Ray and SmolLM2."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from palign.report.plan import (
    DEFAULT_TRAIN_TOKENS_PER_GPU_S,
    Figure,
    StageMeasure,
    Target,
    TrainSetup,
    build_plan,
    format_plan,
    measure_from_summary,
    project,
)
from palign.report.summary_file import summary_record, write_summary
from palign.runtime import costplan

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _measure(stage: str = "align", rows: int = 4, wall_s: float = 30.0, init_s: float = 10.0,
             **kw) -> StageMeasure:
    return StageMeasure(stage, rows=rows, wall_s=wall_s, init_s=init_s,
                        rows_out=kw.pop("rows_out", rows), **kw)


def test_projection_arithmetic():
    m = _measure(prompt_tokens=400, work_tokens=1200)  # 5 s a row on one replica
    p = project(m, 100, Target(replicas=4, gpus_per_replica=2))
    assert p.time_s.value == pytest.approx(10 + 100 / 4 * 5)
    assert p.gpu_hours.value == pytest.approx((10 + 125) * 4 * 2 / 3600)
    assert p.prompt_per_row.value == 100 and p.work_per_row.value == 300
    assert p.prompt_tokens.value == 10_000 and p.work_tokens.value == 30_000
    # a run measured on 2 busy replicas did twice the work per replica-second
    two = project(_measure(replicas=2), 100, Target(4, 1))
    assert two.time_s.value == pytest.approx(10 + 100 / 4 * 10)
    # fewer rows than replicas: the idle replicas neither speed it up nor cost GPU-hours
    few = project(m, 2, Target(8, 1))
    assert few.time_s.value == pytest.approx(10 + 2 / 2 * 5)
    assert few.gpu_hours.value == pytest.approx(few.time_s.value * 2 / 3600)


def test_every_figure_is_tagged():
    p = project(_measure(), 100, Target(2, 1))
    assert {p.init_s.tag, p.prompt_per_row.tag, p.work_per_row.tag} == {"measured"}
    assert {p.rows.tag, p.prompt_tokens.tag, p.work_tokens.tag, p.time_s.tag,
            p.gpu_hours.tag} == {"projected"}
    plan = build_plan([_measure("truncate"), _measure("align", rows_out=3)],
                      {"truncate": Target(2, 1), "align": Target(2, 1)},
                      Figure(400.0, "measured", "counted"), rows_measured=4,
                      train=TrainSetup(workers=8, use_gpu=True, epochs=2),
                      tokens_per_gpu_s=DEFAULT_TRAIN_TOKENS_PER_GPU_S)
    train = plan.train
    assert train is not None
    assert train.time_s.tag == train.gpu_hours.tag == "assumed"
    assert plan.time_s.tag == "assumed"  # a sum resting on one assumption is assumed
    text = format_plan(plan)
    for mark in ("(m)", "(p)", "(a)", "Assumptions:", "| train |", "| **total** |"):
        assert mark in text
    assert "linearly" in text


def test_train_from_align_tokens():
    align = _measure("align", rows=4, rows_out=2, prompt_tokens=800, work_tokens=1200)
    plan = build_plan([align], {"align": Target(1, 1)}, Figure(40.0, "measured"), 4,
                      TrainSetup(workers=4, use_gpu=True, epochs=3), tokens_per_gpu_s=1000.0)
    train = plan.train
    assert train is not None
    assert train.rows.value == 20  # align's rows out, scaled tenfold
    assert train.work_tokens.value == pytest.approx(500 * 20 * 3)
    assert train.time_s.value == pytest.approx(500 * 20 * 3 / (1000 * 4))
    assert train.gpu_hours.value == pytest.approx(train.time_s.value * 4 / 3600)
    capped = build_plan([align], {"align": Target(1, 1)}, Figure(40.0, "measured"), 4,
                        TrainSetup(4, True, 3, max_steps=2, step_tokens=1000), 1000.0).train
    assert capped is not None and capped.work_tokens.value == 2000
    on_cpu = build_plan([align], {"align": Target(1, 0)}, Figure(40.0, "measured"), 4,
                        TrainSetup(2, False), None)
    assert on_cpu.train is not None and on_cpu.train.time_s.value is None
    assert any("--train-tokens-per-gpu-s" in a for a in on_cpu.assumptions)


def test_rows_scale_with_what_reached_the_stage():
    """A stage that got 3 of the 4 sampled rows (generate rejected one) gets 3/4 of the
    input."""
    plan = build_plan([_measure("generate", rows=4), _measure("truncate", rows=3)],
                      {"generate": Target(1, 1), "truncate": Target(1, 1)},
                      Figure(1000.0, "measured"), rows_measured=4)
    assert [s.rows.value for s in plan.stages] == [1000, 750]


def test_device_unlike_the_config_is_flagged():
    cpu = _measure(device="cpu (2 cores, no GPU)")
    plan = build_plan([cpu], {"align": Target(4, 1)}, Figure(8.0, "measured"), 4)
    assert any("measured on cpu (2 cores, no GPU): not representative" in w
               for w in plan.warnings)
    same = build_plan([cpu], {"align": Target(4, 0)}, Figure(8.0, "measured"), 4)
    assert not same.warnings
    assert "Warnings:" in format_plan(plan) and "Warnings:" not in format_plan(same)


def test_summary_contract_is_read():
    record = summary_record("truncate", rows_in=5, rows_out=4, rejected=1, skipped=1,
                            processed=4, wall_s=12.5,
                            engine={"prompt_tokens": 900, "init_s": 2.5, "work_tokens": 880},
                            stats={})
    m = measure_from_summary(record, replicas=3, device="gpu: 1 x H100")
    assert (m.rows, m.wall_s, m.init_s, m.prompt_tokens, m.work_tokens, m.replicas) == \
        (4, 12.5, 2.5, 900, 880, 3)
    with pytest.raises(ValueError, match="palign.summary/1"):
        measure_from_summary({"format": "other"})


# ---------------------------------------------------------------------------- the driver


def _config(tmp_path: Path, data: Path, **changes) -> Path:
    raw = yaml.safe_load(DEMO.read_text())
    raw["run"]["output_dir"] = str(tmp_path / "out")
    raw["data"]["path"] = str(data)
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _args(config: Path, **kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    costplan.add_arguments(parser)
    argv = [str(config)]
    for key, value in kw.items():
        argv += [f"--{key.rstrip('_').replace('_', '-')}", str(value)]
    return parser.parse_args(argv)


def _source(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "question": f"What is {i}+1?",
                                        "answer": str(i + 1), "cot": "One. Two."}) + "\n"
                            for i in range(n)) + "\n")
    return path


STAGE_TIMES = {"generate": (32, 32, 3.0, 0.5), "truncate": (32, 30, 40.0, 6.0),
               "align": (30, 30, 95.0, 7.5)}  # rows in, out, wall_s, init_s


def _finished_run(run: Path) -> None:
    for stage, (rows_in, rows_out, wall, init) in STAGE_TIMES.items():
        write_summary(str(run / stage), summary_record(
            stage, rows_in=rows_in, rows_out=rows_out, rejected=rows_in - rows_out, skipped=0,
            processed=rows_in, wall_s=wall,
            engine={"prompt_tokens": 100 * rows_in, "init_s": init,
                    "work_tokens": 50 * rows_in}, stats={}))


def test_from_a_run_reproduces_its_own_times(tmp_path, capsys):
    """Projected to the run's own rows, on the replicas it ran with, each stage takes the
    time it took; nothing is started (no Ray: this test would hang on one)."""
    run = tmp_path / "run"
    _finished_run(run)
    config = _config(tmp_path, _source(tmp_path, 32),
                     **{"truncate.engine.replicas": {"min": 2, "max": 2}})
    out = tmp_path / "plan.json"
    assert costplan.main(_args(config, from_=run, json=out)) == 0
    plan = json.loads(out.read_text())
    assert plan["format"] == "palign.plan/1"
    assert plan["rows_total"] == {"value": 32.0, "tag": "measured",
                                  "note": "the source's non-blank lines, counted"}
    stages = {s["stage"]: s for s in plan["stages"]}
    assert set(stages) == {"generate", "truncate", "align"}
    for stage, (rows_in, _, wall, _) in STAGE_TIMES.items():
        assert stages[stage]["time_s"]["value"] == pytest.approx(wall), stage
        assert stages[stage]["rows"]["value"] == pytest.approx(rows_in)
    assert stages["truncate"]["target"] == {"replicas": 2, "gpus_per_replica": 0.0}
    assert plan["stages"][0]["measure"]["device"] == "not recorded"
    printed = capsys.readouterr().out
    assert "| truncate |" in printed and "assumed to have run with the config's" in printed
    # ten times the input: the fixed start stays, the rest grows tenfold
    assert costplan.main(_args(config, from_=run, json=out, rows=320)) == 0
    align = next(s for s in json.loads(out.read_text())["stages"] if s["stage"] == "align")
    assert align["time_s"]["value"] == pytest.approx(7.5 + 10 * (95.0 - 7.5))
    assert align["rows"]["value"] == pytest.approx(300)


def test_from_a_folder_without_summaries_fails(tmp_path, capsys):
    config = _config(tmp_path, _source(tmp_path, 4))
    (tmp_path / "empty").mkdir()
    assert costplan.main(_args(config, from_=tmp_path / "empty")) == 1
    assert "no stage summary" in capsys.readouterr().err


def test_bad_stage_names_fail_as_config_errors(tmp_path, capsys):
    config = _config(tmp_path, _source(tmp_path, 4))
    assert costplan.main(_args(config, stages="truncate,nope")) == 2
    assert "--stages: no stage 'nope'" in capsys.readouterr().err
    assert costplan.main(_args(config, stages="train")) == 2
    assert "runs no engine" in capsys.readouterr().err


def test_input_rows_counted_or_estimated(tmp_path):
    from palign.config import load_config

    cfg = load_config(_config(tmp_path, _source(tmp_path, 7)))
    assert costplan.input_rows(cfg, None, 0.0).value == 7
    assert costplan.input_rows(cfg, 1000, 0.0) == Figure(1000.0, "assumed", "given with --rows")
    limited = costplan.input_rows(load_config(_config(tmp_path, _source(tmp_path, 7),
                                                      **{"data.limit": 5})), None, 0.0)
    assert limited.value == 5 and "data.limit" in limited.note
    table = pa.table({"id": [f"p{i}" for i in range(11)], "question": ["q"] * 11,
                      "answer": ["a"] * 11})
    pq.write_table(table, tmp_path / "problems.parquet", row_group_size=4)
    cfg = load_config(_config(tmp_path, tmp_path / "problems.parquet"))
    assert costplan.input_rows(cfg, None, 0.0) == Figure(11.0, "measured",
                                                         "counted from the Parquet metadata")
    big = _source(tmp_path, 9)
    cfg = load_config(_config(tmp_path, big))
    costplan.COUNT_LINES_MAX_BYTES, keep = 10, costplan.COUNT_LINES_MAX_BYTES
    try:
        estimate = costplan.input_rows(cfg, None, big.stat().st_size / 9)
    finally:
        costplan.COUNT_LINES_MAX_BYTES = keep
    assert estimate.tag == "projected" and estimate.value == pytest.approx(9)
    assert estimate.note.startswith("estimated")


def test_sample_is_the_first_rows_of_any_format(tmp_path):
    from palign.config import load_config

    table = pa.table({"id": [f"p{i}" for i in range(50)], "question": ["q"] * 50,
                      "answer": ["a"] * 50})
    pq.write_table(table, tmp_path / "problems.parquet", row_group_size=8)
    cfg = load_config(_config(tmp_path, tmp_path / "problems.parquet"))
    rows, size = costplan.write_sample(cfg, str(tmp_path / "s.jsonl"), 3)
    lines = (tmp_path / "s.jsonl").read_text().splitlines()
    assert rows == 3 and [json.loads(ln)["id"] for ln in lines] == ["p0", "p1", "p2"]
    assert size == len((tmp_path / "s.jsonl").read_bytes())


# ------------------------------------------------------------------- the demo, through Ray
