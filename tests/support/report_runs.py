"""Run folders for the run report's tests, written with the real shard writers and the real
stages' index columns: a small one whose truncate records come from the real prefix search
(``truncate_rows`` on ``ScriptedJudge``), and a big one of indexed rows written fast."""

from __future__ import annotations

import io
import json
from pathlib import Path

from scripted_engines import ScriptedJudge
from synthetic_rows import rows_with_curve

from palign.data.shards import ShardWriter, reject_row, write_digests, write_shard
from palign.report.summary_file import summary_record, write_summary
from palign.stages.align import Align
from palign.stages.truncate import Truncate, TruncateSection, truncate_rows

SCRIPT = "<script>alert('cot')</script>"
CURVES = [
    [0.1, 0.2, 0.6, 0.9, 0.95],  # enough at k=3
    [0.1, 0.1, 0.1, 0.1, 0.3],  # never enough: the whole CoT kept
    [0.9, 0.9, 0.9, 0.9],  # enough at k=1
    [0.2, 0.7, 0.8],
    [0.05, 0.1, 0.2, 0.4, 0.55, 0.7, 0.9, 0.9],
    [0.3, 0.6],
]


def _png(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    img = Image.new("RGB", (40, 20), color)
    img.putpixel((3, 3), (0, 0, 0))
    img.save(buf, "PNG")
    return buf.getvalue()


def small_run(root: Path) -> dict[str, dict]:
    """A finished run at ``root``: truncate (with its ``_SUMMARY.json``), align (without
    one, as a run from before summaries), rejects in both, evaluate's results.json and a PNG,
    and an audit.json. One CoT holds a ``<script>``. Returns the align records by id."""
    rows = rows_with_curve(CURVES)
    rows[0]["cot"] = rows[0]["cot"].replace("Step 2 works", f"Step 2 {SCRIPT} works")
    rows[3]["question"] += " <img src=x onerror=alert(1)> http://example.com/q"
    outcomes = truncate_rows(rows, ScriptedJudge(), TruncateSection(search="lockstep"))
    truncated = [o.record for o in outcomes]
    kept = truncated[3]["sentences_kept"]  # as truncate.verify records a move (contract 3)
    truncated[3]["verify"] = {"samples": 4, "min_pass": 0.5, "search_k": kept - 1,
                              "moves": [{"k": kept - 1, "passed": 1, "of": 4},
                                        {"k": kept, "passed": 3, "of": 4}],
                              "final_k": kept, "passed": True}
    truncate = Truncate()
    ShardWriter(root / "truncate", shard_rows=4, index=truncate.index_values).write(truncated)
    ShardWriter(root / "truncate" / "rejects").write([
        reject_row("bad-1", "truncate", "judge at k=3: timeout after 60 s", {"id": "bad-1"}),
        reject_row("bad-2", "truncate", "judge at k=7: timeout after 60 s", {"id": "bad-2"}),
        reject_row("bad-3", "truncate", "no CoT to truncate (add the generate stage or a CoT)",
                   {"id": "bad-3", "question": "q?"}),
    ])
    (root / "truncate" / "_DONE").write_text("")
    write_summary(root / "truncate", summary_record(
        "truncate", rows_in=len(rows) + 3, rows_out=len(rows), rejected=3, skipped=0,
        processed=len(rows) + 3, wall_s=12.5,
        engine={"prompt_tokens": 4000, "cached_tokens": 1000, "peak_in_flight": 7,
                "init_s": 2.5, "work_tokens": 4000},
        stats=truncate.stats(truncate.index_values(truncated))))
    aligned = []
    for i, rec in enumerate(truncated[:-1]):
        right = i % 3 != 1
        aligned.append({**rec, "continuation": f"So x is \\boxed{{{42 if right else 7}}}. "
                                                + ("more words " * 300 if i == 4 else ""),
                        "gold_answer": "42", "predicted_answer": "42" if right else "7",
                        "answer_correct": right if i != 2 else None,
                        "grade_status": "ok", "answer_source": "continuation",
                        "continuation_tokens": 10 + 5 * i, "continuation_finish": "stop"})
    ShardWriter(root / "align", shard_rows=2, index=Align().index_values).write(aligned)
    ShardWriter(root / "align" / "rejects").write([reject_row(
        truncated[-1]["id"], "align", "student: engine error <b>boom</b>", truncated[-1])])
    (root / "align" / "_DONE").write_text("")
    evaluate = root / "evaluate"
    evaluate.mkdir()
    (evaluate / "results.json").write_text(json.dumps({
        "format": "palign.results/1", "run_name": "small",
        "models": {"trained": {"math <i>": {"problems": 4, "samples": 8, "n": 2, "pass@1": 0.5,
                                            "pass@2": 0.75, "mean_output_tokens": 31.5,
                                            "no_answer_share": 0.125, "timeouts": 0,
                                            "flexible": {"pass@1": 0.625}}}},
        "prefix_ratio": None, "data": {"align_rows": len(aligned), "train_rows": None}}))
    (evaluate / "pass_at_1.png").write_bytes(_png((200, 40, 40)))
    (root / "audit").mkdir()
    (root / "audit" / "audit.json").write_text(json.dumps(
        {"format": "palign.audit/1", "rows": 6, "breaks": 1, "agreement": {"auc": 0.8}}))
    return {r["id"]: r for r in aligned}


def big_run(root: Path, shards: int = 100, per_shard: int = 2000) -> dict[str, int]:
    """``shards * per_shard`` indexed rows in truncate/ and align/, with digests: align's
    records about 250 bytes each, truncate's data only ids (the report reads its index
    alone). align's grade is right everywhere but for 50 wrong rows in each of two shards and
    one unchecked row in every shard. Returns the grade counts."""
    cots = {n: " ".join(f"Step {k} works." for k in range(n)) for n in range(1, 13)}
    counts = {"right": 0, "wrong": 0, "unchecked": 0}
    for s in range(shards):
        ids, aligned, t_cols, grades, tokens = [], [], [], [], []
        for j in range(per_shard):
            i = s * per_shard + j
            total, cot = 4 + i % 9, cots[4 + i % 9]
            kept = 1 + i % total
            offset = len(cots[kept])  # the first ``kept`` sentences: a prefix of ``cot``
            grade = "unchecked" if j == 0 else (
                "wrong" if s in (17, 61) and 1 <= j <= 50 else "right")
            counts[grade] += 1
            ids.append({"id": f"r{i:07d}"})
            t_cols.append((offset / len(cot), kept / total, 1 + i % 5))
            aligned.append({"id": f"r{i:07d}", "question": f"What is {i} + 1?", "cot": cot,
                            "prefix_offset": offset, "sentences_kept": kept,
                            "sentences_total": total, "continuation": "So \\boxed{1}.",
                            "answer_correct": None if grade == "unchecked" else grade == "right"})
            grades.append(grade)
            tokens.append(20 + i % 50)
        stem = f"part-{s:04d}"
        ratio, sentence, probes = zip(*t_cols)
        write_shard(root / "truncate", stem, ids, "jsonl",
                    {"prefix_ratio": ratio, "sentence_ratio": sentence, "probes": probes,
                     "sufficient": [True] * per_shard})
        write_shard(root / "align", stem, aligned, "jsonl",
                    {"grade": grades, "continuation_tokens": tokens})
    for stage in ("truncate", "align"):
        write_digests(root / stage)
        (root / stage / "_DONE").write_text("")
    return counts
