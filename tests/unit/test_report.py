import json

import pytest

from palign.cli import main
from palign.data.shards import ShardWriter, reject_row
from palign.method.targets import BEGIN_DRAFT, END_DRAFT
from palign.report import benchmark_metrics, compare, write_results
from palign.stages.registry import REGISTRY

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DRAFTED = f"{BEGIN_DRAFT}key idea{END_DRAFT}\nso \\boxed{{1}}"
RUNAWAY = f"{BEGIN_DRAFT}and then and then"
PLAIN = "no draft, \\boxed{1}"


SAME = "same"


def sample(i, correct, status="ok", tokens=10, output=DRAFTED, flexible=SAME):
    """An evaluate sample. ``flexible``: its flexible grade as (correct, status); SAME copies the
    strict one; None leaves it out, as in rows written before flexible grading existed."""
    rec = {"sample": i, "output": output, "extracted": "1" if status == "ok" else None,
           "correct": correct, "status": status, "output_tokens": tokens,
           "finish_reason": "length" if output == RUNAWAY else "stop"}
    if flexible is not None:
        f_correct, f_status = (correct, status) if flexible == SAME else flexible
        rec.update(flexible_extracted="1" if f_status == "ok" else None,
                   flexible_correct=f_correct, flexible_status=f_status)
    return rec


def row(pid, bench, model, samples):
    return {"id": pid, "benchmark": bench, "model": model, "model_path": f"/m/{model}",
            "question": "q", "answer": "1", "samples": samples}


# student on "math": p1 right once in three; p2 never right (one no_answer, one timeout that
# claims to be correct but must count wrong). Tokens 10..60, so the mean is 35. Flexible: the
# same, except that it finds the right answer in the runaway draft that has no box.
STUDENT_MATH = [
    [sample(0, True, tokens=10), sample(1, False, tokens=20), sample(2, False, tokens=30)],
    [sample(0, False, tokens=40),
     sample(1, False, "no_answer", tokens=50, output=RUNAWAY, flexible=(True, "ok")),
     sample(2, True, "timeout", tokens=60, output=PLAIN)],
]
# base on "math": p1 always right, p2 right once in three; never writes a draft.
BASE_MATH = [
    [sample(i, True, tokens=100, output=PLAIN) for i in range(3)],
    [sample(0, False, tokens=200, output=PLAIN), sample(1, True, tokens=200, output=PLAIN),
     sample(2, False, tokens=200, output=PLAIN)],
]
# student on "aime": two samples per problem.
STUDENT_AIME = [[sample(0, True), sample(1, False)], [sample(0, False), sample(1, False)]]


def make_run(root, models, ratios=None):
    """An output_dir with evaluate/<model>/<bench>/ shards (and truncate rows if ratios)."""
    for (model, bench), problems in models.items():
        folder = root / "evaluate" / model / bench
        rows = [row(f"{bench}-{i}", bench, model, s) for i, s in enumerate(problems)]
        ShardWriter(folder, "jsonl", shard_rows=1).write(rows)
        ShardWriter(folder / "rejects").write([reject_row("bad", "evaluate", "why")])
    if ratios is not None:
        ShardWriter(root / "truncate", index=REGISTRY["truncate"].index_values).write(
            [{"id": str(i), "prefix_ratio": r, "sentences_kept": i + 1, "sentences_total": 4}
             for i, r in enumerate(ratios)])
    return root


def test_benchmark_metrics_exact_values():
    m = benchmark_metrics([row(str(i), "math", "student", s) for i, s in enumerate(STUDENT_MATH)])
    assert (m["problems"], m["samples"], m["n"]) == (2, 6, 3)
    assert m["pass@1"] == pytest.approx((1 / 3 + 0) / 2)
    assert m["pass@2"] == pytest.approx((2 / 3 + 0) / 2)  # 1 - C(2,2)/C(3,2) on p1
    assert m["pass@3"] == pytest.approx(0.5)
    assert m["mean_output_tokens"] == pytest.approx(35.0)
    assert m["no_end_of_draft_share"] == pytest.approx(2 / 6)  # the runaway and the plain one
    assert m["unclosed_draft_share"] == pytest.approx(1 / 6)
    assert m["no_answer_share"] == pytest.approx(1 / 6)
    assert (m["timeouts"], m["errors"]) == (1, 0)
    # The flexible figures: p2's runaway sample is right, its time-out still counts wrong.
    assert m["flexible"] == {
        "pass@1": pytest.approx((1 / 3 + 1 / 3) / 2), "pass@2": pytest.approx(2 / 3),
        "pass@3": pytest.approx(1.0), "no_answer_share": 0.0, "timeouts": 1, "errors": 0}


def test_benchmark_metrics_n_is_the_smallest_sample_count():
    rows = [row("a", "b", "m", [sample(0, True), sample(1, False)]),
            row("b", "b", "m", [sample(0, True)]), row("c", "b", "m", [])]
    m = benchmark_metrics(rows)
    assert m["n"] == 1 and "pass@2" not in m
    assert m["pass@1"] == pytest.approx(0.75) and m["problems_without_samples"] == 1
    with pytest.raises(ValueError):
        benchmark_metrics([row("c", "b", "m", [])])


def test_write_results_scores_only_the_pairs_it_is_given(tmp_path):
    """The evaluate stage passes its config's models and benchmarks: a folder an earlier
    config left (another model, another benchmark) is not scored with this one's."""
    run = make_run(tmp_path / "run", {("student", "math"): STUDENT_MATH,
                                      ("base", "math"): BASE_MATH,
                                      ("student", "aime"): STUDENT_AIME})
    res = write_results(run, pairs=[("student", "math")])
    assert {m: set(b) for m, b in res.metrics.items()} == {"student": {"math"}}
    samples = (run / "evaluate" / "samples.jsonl").read_text().splitlines()
    assert {(json.loads(x)["model"], json.loads(x)["benchmark"]) for x in samples} == {
        ("student", "math")}


def test_write_results_files(tmp_path):
    run = make_run(tmp_path / "run", {("student", "math"): STUDENT_MATH,
                                      ("base", "math"): BASE_MATH,
                                      ("student", "aime"): STUDENT_AIME},
                   ratios=[0.05, 0.25, 0.25, 1.0])
    res = write_results(run, run_name="palign-arm")
    ev = run / "evaluate"

    data = json.loads((ev / "results.json").read_text())
    assert data["run_name"] == "palign-arm"
    base = data["models"]["base"]["math"]
    assert base["pass@1"] == pytest.approx(2 / 3)
    assert base["pass@2"] == pytest.approx((1 + 2 / 3) / 2)
    assert base["mean_output_tokens"] == pytest.approx(150.0)
    assert base["no_end_of_draft_share"] == 1.0
    assert base["flexible"]["pass@1"] == pytest.approx(2 / 3)  # boxed answers: modes agree
    student = data["models"]["student"]["math"]
    assert student["pass@1"] == pytest.approx(1 / 6)
    assert student["flexible"]["pass@1"] == pytest.approx(1 / 3)
    aime = data["models"]["student"]["aime"]
    assert aime["n"] == 2 and aime["pass@1"] == pytest.approx(0.25)
    assert aime["pass@2"] == pytest.approx(0.5)
    assert res.metrics == data["models"]
    prefix = data["prefix_ratio"]
    assert prefix["count"] == 4 and prefix["mean"] == pytest.approx(0.3875)
    assert prefix["median"] == pytest.approx(0.25)
    assert prefix["histogram"] == [1, 0, 2, 0, 0, 0, 0, 0, 0, 1]
    # the same prefixes counted in sentences, as the paper counts: 1, 2, 3 and 4 of 4
    assert prefix["sentence_mean"] == pytest.approx(0.625)
    assert prefix["sentence_median"] == pytest.approx(0.625)

    md = (ev / "results.md").read_text()
    assert md.count("## math") == 1 and md.count("## aime") == 1
    assert md.strip() == res.results_md.read_text().strip()
    math_table = md.split("## math")[1].split("##")[0]
    assert "| base |" in math_table and "| student |" in math_table
    assert "0.1667" in math_table and "0.6667" in math_table and "33.3%" in math_table
    header = math_table.splitlines()[2].split(" | ")
    assert header[3:9] == ["pass@1", "pass@2", "pass@3", "flexible pass@1", "flexible pass@2",
                           "flexible pass@3"]
    assert "| student | 2 | 3 | 0.1667 | 0.3333 | 0.5000 | 0.3333 | 0.6667 | 1.0000 |" in md

    records = [json.loads(line) for line in (ev / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 6 + 6 + 4  # one per sample; the rejects are not read
    assert set(records[0]) >= {"id", "benchmark", "model", "sample", "output", "extracted",
                               "correct", "status", "flexible_extracted", "flexible_correct",
                               "flexible_status", "output_tokens"}
    timed_out = [r for r in records if r["status"] == "timeout"]
    assert len(timed_out) == 1 and timed_out[0]["correct"] is False
    assert timed_out[0]["flexible_correct"] is False  # its flexible check timed out too
    [runaway] = [r for r in records if r["output"] == RUNAWAY]
    assert (runaway["status"], runaway["correct"]) == ("no_answer", False)
    assert (runaway["flexible_status"], runaway["flexible_correct"]) == ("ok", True)
    assert {(r["model"], r["benchmark"]) for r in records} == {
        ("student", "math"), ("base", "math"), ("student", "aime")}

    for png in ("pass_at_1.png", "prefix_ratio.png"):
        assert (ev / png).read_bytes()[:8] == PNG_MAGIC
    assert res.prefix_ratio_png == ev / "prefix_ratio.png"
    assert not list(ev.glob(".tmp-*"))


def test_write_results_without_truncate_rows(tmp_path):
    run = make_run(tmp_path / "base-only", {("base", "math"): BASE_MATH})
    res = write_results(run)
    ev = run / "evaluate"
    assert res.run_name == "base-only" and res.prefix_ratio is None
    assert json.loads((ev / "results.json").read_text())["prefix_ratio"] is None
    assert (ev / "pass_at_1.png").read_bytes()[:8] == PNG_MAGIC
    assert not (ev / "prefix_ratio.png").exists() and res.prefix_ratio_png is None


def test_write_results_without_rows_fails(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_results(tmp_path)
    (tmp_path / "evaluate" / "base" / "math").mkdir(parents=True)
    with pytest.raises(ValueError, match="no scorable"):
        write_results(tmp_path)


def two_arms(tmp_path):
    a = make_run(tmp_path / "a", {("student", "math"): STUDENT_MATH}, ratios=[0.2, 0.4])
    b = make_run(tmp_path / "b", {("student", "math"): BASE_MATH})
    write_results(a, run_name="palign-arm")
    write_results(b, run_name="full-cot-arm")
    return a, b


def test_compare_two_arms(tmp_path):
    a, b = two_arms(tmp_path)
    # One arm by its output_dir, the other by its results.json.
    text = compare([str(a), str(b / "evaluate" / "results.json")])
    tables, prefix = text.split("## Prefix ratio")
    lines = {line.split("|")[1].strip(): line for line in tables.splitlines()
             if line.startswith("| ") and "-arm" in line}
    assert set(lines) == {"palign-arm", "full-cot-arm"}
    # pass@1, pass@n, flexible pass@1, flexible pass@n, tokens, no end, no answer (both modes)
    assert ("| 0.1667 | 0.5000 | 0.3333 | 1.0000 | 35.0 | 33.3% | 16.7% | 0.0% |"
            in lines["palign-arm"])
    assert ("| 0.6667 | 1.0000 | 0.6667 | 1.0000 | 150.0 | 100.0% | 0.0% | 0.0% |"
            in lines["full-cot-arm"])
    # characters: the mean of 0.2 and 0.4; sentences: of 1 and 2 of 4
    assert "| palign-arm | 2 | 0.300 | 0.375 |" in prefix
    assert "full-cot-arm" not in prefix  # that run has no truncate rows


def test_compare_names_a_missing_or_broken_path(tmp_path):
    a, _ = two_arms(tmp_path)
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=str(missing)):
        compare([str(a), str(missing)])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        compare([str(broken)])
    other = tmp_path / "other.json"
    other.write_text('{"pass@1": 0.5}')
    with pytest.raises(ValueError, match="other.json"):
        compare([str(other)])


def test_cli_compare(tmp_path, capsys):
    a, b = two_arms(tmp_path)
    out = tmp_path / "merged.json"
    assert main(["compare", str(a), str(b / "evaluate"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "palign-arm" in printed and "full-cot-arm" in printed
    merged = json.loads(out.read_text())
    assert [arm["name"] for arm in merged["arms"]] == ["palign-arm", "full-cot-arm"]
    assert {(r["arm"], r["benchmark"]) for r in merged["rows"]} == {
        ("palign-arm", "math"), ("full-cot-arm", "math")}
    palign_row = next(r for r in merged["rows"] if r["arm"] == "palign-arm")
    assert palign_row["pass@1"] == pytest.approx(1 / 6)
    assert palign_row["flexible_pass@1"] == pytest.approx(1 / 3) and "flexible" not in palign_row
    assert merged["arms"][0]["models"]["student"]["math"]["flexible"]["pass@3"] == 1.0

    assert main(["compare", str(a), str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_rows_graded_before_flexible_grading_have_no_flexible_figures(tmp_path):
    # Rows an older palign wrote: strict grades only. Their flexible figures are missing, never
    # zeros, in results.json, results.md, samples.jsonl and the comparison.
    old = [[sample(i, i == 0, flexible=None) for i in range(2)],
           [sample(i, False, flexible=None) for i in range(2)]]
    run = make_run(tmp_path / "old", {("base", "math"): old})
    res = write_results(run)
    m = res.metrics["base"]["math"]
    assert m["pass@1"] == pytest.approx(0.25) and m["flexible"] is None
    assert "| base | 2 | 2 | 0.2500 | 0.5000 | - | - |" in res.results_md.read_text()
    records = [json.loads(line) for line in res.samples_jsonl.read_text().splitlines()]
    assert {(r["flexible_correct"], r["flexible_status"]) for r in records} == {(None, None)}
    assert "| 0.2500 | 0.5000 | - | - |" in compare([str(run)])
    # One row with and one without flexible grades: the benchmark has no flexible figure.
    mixed = [row("a", "math", "base", [sample(0, True)]),
             row("b", "math", "base", [sample(0, True, flexible=None)])]
    assert benchmark_metrics(mixed)["flexible"] is None


def test_cli_compare_against_the_papers_numbers(tmp_path, capsys):
    """Two small runs named as the paper preset's arms, on the paper's benchmark names: each
    arm's flexible figures beside the paper's, the differences, the rows each arm trained on,
    where each paper number comes from, and a plot."""
    # palign: aime24 flexible pass@1 1/3, pass@3 1; sft: no reference rows in the paper file
    three = [sample(0, True), sample(1, False), sample(2, False)]
    palign = make_run(tmp_path / "palign", {("trained", "aime24"): [three, three]})
    sft = make_run(tmp_path / "sft", {("trained", "aime24"): [three, three]})
    ShardWriter(palign / "align").write([{"id": str(i)} for i in range(5)])
    (palign / "train").mkdir()
    (palign / "train" / "summary.json").write_text(json.dumps({"rows_used": 4}))
    write_results(palign, "palign")
    write_results(sft, "sft")
    plot, merged = tmp_path / "ref.png", tmp_path / "merged.json"
    assert main(["compare", str(palign), str(sft), "--reference", "paper", "--plot", str(plot),
                 "--json", str(merged)]) == 0
    out = capsys.readouterr().out
    against = out.split("# Against ")[1]
    row = next(line for line in against.splitlines()
               if line.startswith("| palign") and "Table 1" in line)
    # ours pass@1 | paper pass@1 | ours pass@3 | paper pass@3 | diff pass@1 | diff pass@3
    assert "| 0.3333 | 0.1667 | 1.0000 | 0.2667 | +0.1666 | +0.7333 |" in row
    assert "released outputs" in against and "No reference numbers for: sft" in against
    assert "| palign | 5 | 4 |" in against  # aligned rows kept, rows trained on
    assert "not verified against the paper" in against and "Not found:" in against
    assert plot.read_bytes().startswith(PNG_MAGIC)
    rows = json.loads(merged.read_text())["reference"]["rows"]
    assert {r["reference"] for r in rows} == {"P-ALIGN (Table 1, as transcribed)",
                                              "P-ALIGN (authors' released outputs)"}
    assert main(["compare", str(palign), "--reference", "nope"]) == 2
    assert "neither a shipped reference" in capsys.readouterr().err
