"""palign fetch-data on small datasets folders made here (no hub on this machine): each set's
columns become the paper preset's, numeric answers text, ids unique, and the preset's data and
benchmark fields read the files it writes."""

from __future__ import annotations

import pyarrow.parquet as pq

from palign.cli import main
from palign.config import load_config
from palign.data.ingest import read_problems

S1K = {"question": ["Find x.", "Prove it."], "solution": ["So $x=\\boxed{2}$.", "By induction."],
       "cot_type": ["math", "math"], "deepseek_thinking_trajectory": ["Hmm, x is 2.", "Base case."],
       "deepseek_attempt": ["The answer is 2.", "Done."], "gemini_attempt": ["2", "ok"]}
AMC = {"id": [0, 0], "problem": ["What is 1+1?", "What is 2*71?"], "answer": [2.0, 142.0],
       "url": ["a", "b"]}


def save(tmp_path, name, columns, split):
    import datasets

    folder = tmp_path / f"hub-{name}"
    datasets.DatasetDict({split: datasets.Dataset.from_dict(columns)}).save_to_disk(str(folder))
    return str(folder)


def test_fetch_data_writes_the_presets_columns(tmp_path, capsys):
    out = tmp_path / "paper-data"
    assert main(["fetch-data", "s1k-1.1", "--to", str(out),
                 "--source", save(tmp_path, "s1k", S1K, "train")]) == 0
    assert main(["fetch-data", "amc12", "--to", str(out),
                 "--source", save(tmp_path, "amc", AMC, "train")]) == 0
    s1k = pq.read_table(out / "s1k-1.1.parquet").to_pylist()
    assert s1k[0] == {"id": "s1k-1.1-0000", "question": "Find x.",
                      "solution": "So $x=\\boxed{2}$.", "cot": "Hmm, x is 2.",
                      "attempt": "The answer is 2."}
    amc = pq.read_table(out / "amc12.parquet").to_pylist()
    assert [(r["id"], r["answer"]) for r in amc] == [("amc12-0000", "2"), ("amc12-0001", "142")]

    # the preset reads them: its data fields and its benchmark's
    preset = load_config("configs/paper/palign.yaml", {"data.path": str(out / "s1k-1.1.parquet")})
    rows, rejects = read_problems(preset.data)
    assert not rejects and rows[0]["cot"] == "Hmm, x is 2." and rows[0]["attempt"]
    assert rows[0]["answer"] == "So $x=\\boxed{2}$."  # the worked solution: align.gold finds 2
    amc12 = next(b for b in preset.evaluate.benchmarks if b.name == "amc12")
    bench_rows, _ = read_problems(amc12.as_data(str(out / "amc12.parquet")))
    assert [r["answer"] for r in bench_rows] == ["2", "142"]
    # --limit: the first N rows only
    assert main(["fetch-data", "amc12", "--to", str(tmp_path / "one"), "--limit", "1",
                 "--source", save(tmp_path, "amc1", AMC, "train")]) == 0
    one = pq.read_table(tmp_path / "one/amc12.parquet").to_pylist()
    assert one == [{"id": "amc12-0000", "question": "What is 1+1?", "answer": "2"}]


def test_fetch_data_names_what_is_wrong(tmp_path, capsys):
    assert main(["fetch-data", "gsm8k", "--to", str(tmp_path)]) == 2
    assert "unknown dataset gsm8k" in capsys.readouterr().err
    wrong = save(tmp_path, "wrong", {"question": ["q"]}, "test")
    assert main(["fetch-data", "math500", "--to", str(tmp_path), "--source", wrong]) == 1
    assert "no column problem" in capsys.readouterr().err
