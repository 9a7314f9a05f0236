"""A stage added from outside palign (tests/support/toy_stage.py, registered only here) is a
stage like the built-in ones: the config has its section, ``validate --explain`` lists it, the
CLI has its subcommand, and the real runner runs it on Ray, writing its shards, its rejects and
its summary. docs/extending.md shows that very file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from toy_stage import Shout, ShoutSection

from palign.cli import main as palign_main
from palign.config import ConfigError, config_model, parse_config, registered, stage_names
from palign.data.shards import REJECTS, read_rows
from palign.report.summary_file import SUMMARY_FILE, read_summary

ROOT = Path(__file__).resolve().parents[2]
TOY = ("shout", "toy_stage:Shout")
ROWS = [
    {"id": "a", "question": "What is two plus two?", "answer": "4", "cot": "2 + 2 = 4."},
    {"id": "b", "question": "Is 7 prime?", "answer": "yes", "cot": "No divisor."},
    {"id": "c", "question": "Compute 3 + 4.", "answer": "7", "cot": "3 + 4 = 7."},
]


def toy_config(tmp_path: Path) -> dict:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {
        "run": {"output_dir": str(tmp_path / "out"), "stages": ["shout"]},
        "ray": {"progress_bars": False},
        "data": {"path": str(data)},
        "models": {"student": "smollm2-135m"},
        "shout": {"suffix": "!!", "engine": {"cpus_per_replica": 1, "batch_size": 2}},
        "output": {"shard_rows": 1},
    }


def test_the_config_has_a_registered_stage_section_only_while_it_is_registered(tmp_path):
    raw = toy_config(tmp_path)
    with registered(*TOY, after="align"):
        assert stage_names() == ("generate", "truncate", "align", "shout", "train", "evaluate")
        field = config_model().model_fields["shout"]
        assert field.annotation is ShoutSection and field.description == Shout.description
        cfg = parse_config(raw)
        assert cfg.shout.suffix == "!!" and cfg.shout.engine.batch_size == 2
        assert cfg.shout.max_reject_share == 0.5  # the fields every stage section has
        assert list(type(cfg).model_fields)[-1] == "output"
    assert "shout" not in config_model().model_fields
    with pytest.raises(ConfigError, match="run.stages.0: Input should be"):
        parse_config(raw)


def test_validate_explain_lists_the_toy_section(tmp_path, capsys):
    path = tmp_path / "shout.yaml"
    path.write_text(yaml.safe_dump(toy_config(tmp_path)))
    with registered(*TOY, after="align"):
        assert palign_main(["validate", "--explain", "--skip-paths", str(path)]) == 0
    out = capsys.readouterr().out
    paths = [line.split(" ", 1)[0] for line in out.splitlines() if line.strip()]
    assert f"shout -- {Shout.description}" in out
    description = ShoutSection.model_fields["suffix"].description
    assert f'shout.suffix = "!!" (default: "!") -- {description}' in out
    assert "shout.max_reject_share" in paths and "shout.engine.batch_size" in paths
    assert paths.index("align") < paths.index("shout") < paths.index("train")


def test_the_cli_has_the_toy_stage_subcommand(capsys):
    with registered(*TOY, after="align"), pytest.raises(SystemExit) as exit_:
        palign_main(["shout", "--help"])
    assert exit_.value.code == 0
    assert "usage: palign shout" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        palign_main(["shout", "config.yaml"])  # not registered: no such command
    assert exit_.value.code == 2


def test_docs_extending_shows_the_tested_toy_stage():
    doc = (ROOT / "docs" / "extending.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    toy = (ROOT / "tests" / "support" / "toy_stage.py").read_text()
    assert toy in blocks, "docs/extending.md's first example must be tests/support/toy_stage.py"
    assert 'registered("shout", "toy_stage:Shout", after="align")' in doc


@pytest.mark.ray
def test_the_toy_stage_runs_through_the_real_runner(tmp_path, ray_cluster):
    from palign.pipeline import run_pipeline

    with registered(*TOY, after="align"):
        cfg = parse_config(toy_config(tmp_path))
        summaries = run_pipeline(cfg)
    ingest, shout = summaries
    assert ingest.stage == "ingest" and ingest.rows_out == 3
    assert shout.stage == "shout" and shout.rows_in == 3
    assert (shout.rows_out, shout.rejected) == (2, 1)
    out = tmp_path / "out" / "shout"
    shouts = {r["id"]: r["shout"] for r in read_rows(out)}
    assert shouts == {"a": "WHAT IS TWO PLUS TWO?!!", "b": "IS 7 PRIME?!!"}
    assert shout.stats["mean_length"] == pytest.approx((23 + 13) / 2)
    [reject] = list(read_rows(out / REJECTS))
    assert reject["id"] == "c" and "no question to shout" in reject["reason"]
    assert shout.reasons and "no question to shout" in shout.reasons[0]
    # What the run leaves for the report and `palign plan`: its counts and costs, no reasons.
    kept = read_summary(out)
    assert kept["stage"] == "shout" and (kept["rows_in"], kept["rows_out"]) == (3, 2)
    assert (kept["rejected"], kept["processed"]) == (1, 3)
    assert 0 < kept["wall_s"] == pytest.approx(shout.wall_s, abs=1e-3)
    assert 0 < kept["engine"]["init_s"] < kept["wall_s"]  # each actor's start, timed by itself
    assert kept["engine"]["work_tokens"] == 0  # no engine, no tokens
    assert kept["stats"]["mean_length"] == shout.stats["mean_length"]
    assert "no question to shout" not in (out / SUMMARY_FILE).read_text()
