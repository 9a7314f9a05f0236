"""The paper's experiment at demo scale (configs/paper/demo/) on a real local Ray with SmolLM2 as
judge and student: every arm (the untrained student evaluated; plain SFT on the teacher's
text, fixed ratio 0.5 and P-ALIGN end to end through truncate, align, LoRA training with rows
per step, and evaluation under the paper's protocol, n = 3), then
`palign compare --reference paper` puts the runs beside the paper's numbers. Shrunk to stay
within the suite's time: fixed ratios 0.25 and 0.75 run their truncate stage only (they differ
from 0.5, which runs end to end, in `truncate.ratio` alone: test_paper_preset), 4 rows,
48-token continuations, one optimizer step of 2 rows, 1 benchmark problem (and a broken and an
over-long one). Plain SFT and P-ALIGN run on vLLM; the fixed ratios on the transformers engine
(the other real backend, quicker to start), which the configs' `engine.backend: auto` would not
pick here; the untrained student is evaluated through vLLM's own OpenAI-compatible server
(`evaluate.engine.backend: openai`, the suite's `openai_server`), as a model under test served
elsewhere is. The P-ALIGN arm's training reports to TensorBoard and MLflow
(`train.report_to`): their local stores hold the loss of its step.

What each arm's rows must be: plain SFT's targets are the teacher's text, no markers; a fixed
ratio keeps its share of the sentences; P-ALIGN (drop_wrong, Eq. 9) keeps exactly the rows
graded right and its counts add up. A config that sets only the benchmarks and models
evaluates and scores (with the default budget: up to the context), and resumes."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
from tb_events import scalars

from palign.cli import main as palign_main
from palign.config import load_config, parse_config
from palign.data.shards import read_rows
from palign.method.targets import BEGIN_DRAFT, END_DRAFT
from palign.pipeline import run_pipeline

pytestmark = [pytest.mark.ray, pytest.mark.model]
ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs/paper/demo"
ARMS = ("base", "sft", "fixed_ratio_50", "palign")  # end to end
TRUNCATE_ONLY = ("fixed_ratio_25", "fixed_ratio_75")
TRAINED = ARMS[1:]
ON_VLLM = ("sft", "palign")
PROBLEMS, ROWS, CONTEXT = 1, 4, 4096
REPORT_SECTIONS = ("overview", "stages", "rejects", "distributions", "rows", "evaluation",
                   "audit", "files")


def write_benchmark(path: Path) -> None:
    rows = [json.loads(line) for line in (ROOT / "data/demo/eval.jsonl").read_text().splitlines()]
    rows = rows[:PROBLEMS] + [
        {"id": "bad-empty-question", "question": " ", "answer": "1"},
        {"id": "bad-too-long", "question": "Add these. " + "1 + " * 2500 + "1", "answer": "2501"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def overrides(tmp: Path, arm: str) -> dict:
    return {
        "run.output_dir": str(tmp / arm),
        "ray.progress_bars": False,
        "data.path": str(ROOT / "data/demo/problems.jsonl"),
        "data.limit": ROWS,
        "align.sampling.max_tokens": 48,
        "align.max_reject_share": 1.0,  # Eq. 9 may drop most of SmolLM2's rows
        "train.num_workers": 1,
        "train.cpus_per_worker": 2,
        "train.rows_per_step": 2,
        "train.max_steps": 1,
        "train.seq_len": 1024,
        "train.gradient_checkpointing": False,
        "evaluate.benchmarks": [{"name": "demo-eval", "path": str(tmp / "bench.jsonl")}],
        "evaluate.sampling.max_tokens": 64,  # the default (up to the context): the last test
    }


@pytest.fixture(scope="module")
def arms(ray_cluster, openai_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paper-demo")
    write_benchmark(tmp / "bench.jsonl")
    runs = {}
    # the untrained student last: vLLM's server starts in the background meanwhile
    for arm in (*ARMS[1:], *TRUNCATE_ONLY, ARMS[0]):
        over = overrides(tmp, arm)
        if arm.startswith("fixed_ratio"):
            # 48 tokens of SmolLM2 after part of a CoT almost never reach the right answer, so
            # Eq. 9 would leave nothing to train on; it is checked on the palign arm below
            over["align.policy"] = "keep_all"
        if arm == "base":  # served by vLLM's OpenAI server, which knows the student by its name
            over.update({"evaluate.engine.backend": "openai",
                         "evaluate.engine.base_url": openai_server.url,
                         "evaluate.engine.api_key_env": openai_server.key_env,
                         "evaluate.engine.cpus_per_replica": 0.5,
                         "evaluate.models": [{"label": "base", "model": openai_server.model}]})
        if arm == "palign":
            over["train.report_to"] = ["tensorboard", "mlflow"]
            # strict grading: a short continuation has no box, so a row whose CoT the judge
            # kept whole is graded on the CoT's own box (right) and a cut one has none (wrong):
            # some rows pass Eq. 9 and some do not
            over.update({"align.extract": "strict", "data.limit": 8})
        if arm not in (*ON_VLLM, "base"):
            over["engine.backend"] = "transformers"
        if arm in TRUNCATE_ONLY:
            over["run.stages"] = ["truncate"]
        cfg = load_config(DEMO / f"{arm}.yaml", over)
        with openai_server.serving() if arm == "base" else contextlib.nullcontext():
            runs[arm] = (cfg, {s.stage: s for s in run_pipeline(cfg)})
    return tmp, runs


@pytest.mark.timeout(900)
def test_arms_train_evaluate_and_compare_with_the_paper(arms, capsys):
    tmp, runs = arms
    for arm in ARMS:
        cfg, summaries = runs[arm]
        assert cfg.run.name == arm
        out = tmp / arm
        label = "base" if arm == "base" else "trained"
        if arm in TRAINED:
            train = summaries["train"].stats
            assert train["steps"] == 1 and train["trainable_params"] < 0.1 * train["total_params"]
            assert (out / "train/adapter/adapter_config.json").is_file()
        else:
            assert list(summaries) == ["evaluate"]
        rows = list(read_rows(out / f"evaluate/{label}/demo-eval"))
        assert [r["id"] for r in rows] == ["eval-001"]
        assert [s["sample"] for s in rows[0]["samples"]] == [0, 1, 2]
        assert all(0 < s["output_tokens"] <= 64 for s in rows[0]["samples"])
        rejects = {r["id"]: r["reason"]
                   for r in read_rows(out / f"evaluate/{label}/demo-eval/rejects")}
        assert list(rejects) == ["bad-too-long"]
        too_long = "maximum context length" if arm == "base" else "prompt too long"  # vLLM's 400
        assert too_long in rejects["bad-too-long"], rejects
        ingest_rejects = {r["id"] for r in read_rows(out / "evaluate/_ingest/demo-eval/rejects")}
        assert ingest_rejects == {"bad-empty-question"}
        results = json.loads((out / "evaluate/results.json").read_text())
        metrics = results["models"][label]["demo-eval"]
        assert metrics["n"] == 3 and {"pass@1", "pass@3"} <= metrics["flexible"].keys()
        assert (out / "evaluate/results.md").read_text().count(f"| {label} |") == 1
        assert (out / "evaluate/pass_at_1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert len((out / "evaluate/samples.jsonl").read_text().splitlines()) == 3
        # the run's page: every section, the evaluation's plots inlined, each row (and reject)
        # of the last row stage shown, since there are fewer than the page samples
        page = (out / "report.html").read_text()
        assert all(f'<section id="{s}">' in page for s in REPORT_SECTIONS)
        assert "data:image/png;base64," in page and "pass@1" in page
        if arm in TRAINED:
            shown = summaries["align"].rows_in
            assert page.count('<details class="row"') == shown
        if arm in TRAINED:
            assert results["data"]["train_rows"] == summaries["train"].rows_out
            prefix = results["prefix_ratio"]  # in characters and in sentences
            assert prefix["count"] == summaries["truncate"].rows_out
            assert 0 < prefix["sentence_mean"] <= 1
            assert (out / "evaluate/prefix_ratio.png").is_file()

    capsys.readouterr()
    assert palign_main(["compare", *[str(tmp / a) for a in ARMS], "--reference", "paper",
                        "--json", str(tmp / "compare.json"), "--plot", str(tmp / "ref.png")]) == 0
    printed = capsys.readouterr().out
    assert "# Against P-ALIGN" in printed
    assert f"No reference numbers for: {', '.join(sorted(ARMS))}" in printed  # the demo's benchmark
    trained_on = {line.split("|")[1].strip(): line for line in
                  printed.split("## Rows each arm trained on")[1].splitlines()
                  if line.startswith("| ")}
    for arm in TRAINED:
        assert f"| {runs[arm][1]['train'].rows_out} |" in trained_on[arm]
    merged = json.loads((tmp / "compare.json").read_text())
    pass1 = {(r["arm"], r["model"]): r["pass@1"] for r in merged["rows"]}
    assert set(pass1) == {("base", "base"), *((a, "trained") for a in TRAINED)}
    expected = json.loads((tmp / "palign/evaluate/results.json").read_text())
    assert pass1[("palign", "trained")] == expected["models"]["trained"]["demo-eval"]["pass@1"]


def test_the_palign_arms_training_logs_reach_tensorboard_and_mlflow(arms, monkeypatch):
    """`train.report_to: [tensorboard, mlflow]` on the demo's train stage: the event file and
    MLflow's local store hold the loss of every step as the train summary has it, and the run
    is tagged with the export's folder."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as rank 0 did to write it
    tmp, _ = arms
    train = tmp / "palign/train"
    summary = json.loads((train / "summary.json").read_text())
    losses = summary["losses"]
    assert len(losses) == 1  # the demo's one step
    tb = scalars(train / "tensorboard")["loss"]
    assert [tb[s] for s in sorted(tb)] == pytest.approx(losses, rel=1e-6)  # float32
    state = json.loads((train / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(state["tracking_uri"])
    history = client.get_metric_history(state["run_id"], "loss")
    assert [(m.step, m.value) for m in history] == list(enumerate(losses, 1))
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["export_dir"] == summary["model_dir"]


def test_each_arms_targets_are_what_the_paper_trains_on(arms):
    tmp, runs = arms
    sft = list(read_rows(tmp / "sft/align"))
    assert len(sft) == ROWS  # keep_all: the teacher's text of every row
    for r in sft:
        assert BEGIN_DRAFT not in r["target"] and END_DRAFT not in r["target"]
        assert r["target"] == r["prefix"] and r["prefix_ratio"] == 1.0  # the whole CoT
        assert r["cot"].startswith(r["prefix"]) and r["continuation"] is None
    for arm, ratio in (("fixed_ratio_25", 0.25), ("fixed_ratio_50", 0.5),
                       ("fixed_ratio_75", 0.75)):
        truncated = list(read_rows(tmp / arm / "truncate"))
        assert len(truncated) == ROWS
        for r in truncated:
            assert r["sentences_kept"] == max(1, math.ceil(ratio * r["sentences_total"]))
            assert r["cot"].startswith(r["prefix"]) and r["strategy"] == "fixed_ratio"
    # P-ALIGN: Eq. 9 keeps exactly the rows graded right; kept + dropped = rows in
    align = runs["palign"][1]["align"]
    n_rows = align.rows_in
    kept = list(read_rows(tmp / "palign/align"))
    dropped = list(read_rows(tmp / "palign/align/rejects"))
    assert kept and dropped  # both outcomes happened, so the checks below say something
    assert all(r["answer_correct"] is True for r in kept)
    assert all(r["reason"].startswith("wrong answer") for r in dropped)
    assert len(kept) + len(dropped) == n_rows == 8
    assert align.stats["dropped_wrong"] == len(dropped)
    assert align.stats["kept_right"] == len(kept)
    assert align.stats["retention"] == pytest.approx(len(kept) / n_rows)
    assert all(r["target"].startswith(BEGIN_DRAFT) for r in kept)


def test_only_benchmarks_and_models_set_evaluates_and_scores(arms):
    tmp, _ = arms
    cfg = parse_config({
        "run": {"output_dir": str(tmp / "minimal"), "stages": ["evaluate"]},
        "ray": {"progress_bars": False},
        "data": {"path": str(ROOT / "data/demo/problems.jsonl")},
        "models": {"student": "smollm2-135m"},
        "evaluate": {"benchmarks": [{"name": "demo", "path": str(ROOT / "data/demo/eval.jsonl"),
                                     "limit": 1}],
                     "models": [{"label": "base", "model": "student"}]},
    })
    summary = run_pipeline(cfg)[-1]
    assert summary.rows_out == 1 and summary.rejected == 0  # nothing rejected for length
    assert "base.demo.pass@1" in summary.stats
    for row in read_rows(tmp / "minimal/evaluate/base/demo"):  # the budget includes the prompt
        assert all(0 < s["output_tokens"] <= CONTEXT - row["prompt_tokens"]
                   for s in row["samples"])
    # evaluate again: every problem is done, nothing is redone or written twice
    again = run_pipeline(cfg, ["evaluate"])[-1]
    assert again.processed == 0 and again.skipped == again.rows_in == 1
    assert len(list(read_rows(tmp / "minimal/evaluate/base/demo"))) == 1


@pytest.mark.timeout(600)
def test_plan_on_a_sample_projects_the_arms_stage_times_within_2x(arms, tmp_path):
    """`palign plan --sample 2 --stages truncate,align` on the P-ALIGN arm's own config (into a
    scratch folder of its own) projects each stage's time for the arm's 8 rows within [0.5x,
    2x] of what the arm's run measured (its _SUMMARY.json)."""
    import argparse

    import yaml

    from palign.report.summary_file import read_summary
    from palign.runtime import costplan

    tmp, runs = arms
    raw = runs["palign"][0].model_dump(mode="json")
    raw["run"]["output_dir"] = str(tmp_path / "plan")
    config = tmp_path / "palign.yaml"
    config.write_text(yaml.safe_dump(raw))
    parser = argparse.ArgumentParser()
    costplan.add_arguments(parser)
    out = tmp_path / "plan.json"
    args = parser.parse_args([str(config), "--sample", "2", "--stages", "truncate,align",
                              "--json", str(out)])
    assert costplan.main(args) == 0
    plan = json.loads(out.read_text())
    assert plan["rows_total"]["value"] == 8
    assert [s["stage"] for s in plan["stages"]] == ["truncate", "align"]
    for s in plan["stages"]:
        measured = read_summary(tmp / "palign" / s["stage"])["wall_s"]
        assert 0.5 <= s["time_s"]["value"] / measured <= 2.0, (s, measured)
