import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from palign.config import DataSection
from palign.ingest import question_id, read_problems

GOOD = [
    {"id": "a", "question": "What is 1+1?", "answer": "2", "cot": "One plus one. It is 2."},
    {"question": "What is 2+2?", "answer": 4},  # no id, numeric answer, no CoT
]
BAD = [
    ({"id": "b1", "answer": "3"}, "missing question"),
    ({"id": "b2", "question": "   ", "answer": "3"}, "is empty"),
    ({"id": "b3", "question": ["not", "text"], "answer": "3"}, "not a string"),
    ({"id": "b4", "question": "Q?", "answer": "3", "cot": 17}, "'cot' is not a string"),
    ({"id": "b5", "question": "Q?", "answer": "3", "cot": "x" * 500}, "over data.max_cot_chars"),
    ({"id": "b6", "question": "Q?"}, "missing answer"),
    ({"id": "a", "question": "Again?", "answer": "1"}, "duplicate id"),
    ({"id": {"x": 1}, "question": "Q?", "answer": "1"}, "non-empty string or integer"),
    ([1, 2, 3], "not an object"),
]


def write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def test_jsonl_good_and_bad_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, GOOD + [row for row, _ in BAD], extra_lines=["{broken json", ""])
    problems, rejects = read_problems(DataSection(path=str(path), max_cot_chars=100))
    assert [p["id"] for p in problems] == ["a", question_id("What is 2+2?")]
    assert problems[1] == {"id": question_id("What is 2+2?"), "question": "What is 2+2?",
                           "answer": "4", "cot": None}
    assert len(rejects) == len(BAD) + 1
    for rej, (_, reason) in zip(rejects, BAD):
        assert reason in rej.reason
    assert rejects[0].id == "b1"
    assert rejects[-1].id == "p.jsonl:12" and "invalid JSON" in rejects[-1].reason


def test_hash_id_is_stable_and_field_names_configurable(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"problem": "Find x.", "solution": "5", "trace": "x is 5."}])
    data = DataSection(path=str(path),
                       fields={"id": "uid", "question": "problem", "answer": "solution",
                               "cot": "trace"})
    problems, rejects = read_problems(data)
    assert not rejects
    assert problems[0]["id"] == question_id("Find x.") == read_problems(data)[0][0]["id"]
    assert problems[0]["cot"] == "x is 5."


def test_parquet_and_datasets_folder(tmp_path):
    rows = [{"id": str(i), "question": f"Q{i}?", "answer": str(i), "cot": None} for i in range(5)]
    rows[3]["question"] = ""
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    problems, rejects = read_problems(DataSection(path=str(tmp_path / "p.parquet")))
    assert [p["id"] for p in problems] == ["0", "1", "2", "4"]
    assert [r.id for r in rejects] == ["3"]

    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
    dd.save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="data.split"):
        read_problems(DataSection(path=str(tmp_path / "hf")))
    problems, rejects = read_problems(DataSection(path=str(tmp_path / "hf"), split="train",
                                                  limit=3))
    assert len(problems) + len(rejects) == 3


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path"):
        read_problems(DataSection(path=str(tmp_path / "nope.jsonl")))
