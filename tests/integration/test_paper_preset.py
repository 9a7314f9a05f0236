"""configs/paper/: the paper's recipe as a preset that validates, holds the recipe's values,
and says where each comes from; and train.lora's fields checked before any work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from palign.cli import main as palign_main
from palign.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "configs" / "paper"
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


ARMS = ["palign", "sft", "fixed_ratio_25", "fixed_ratio_50", "fixed_ratio_75", "base"]


@pytest.mark.parametrize("name", [f"{arm}.yaml" for arm in ARMS] + ["qwen3-8b.yaml"])
def test_the_paper_presets_validate(name, capsys):
    assert palign_main(["validate", "--skip-paths", str(PAPER / name)]) == 0
    assert "config OK" in capsys.readouterr().out


def test_the_preset_holds_the_papers_recipe():
    cfg = load_config(PAPER / "palign.yaml")
    tc = cfg.train
    assert cfg.models.student == "Qwen/Qwen2.5-7B-Instruct"
    assert cfg.judge_model == cfg.models.student
    assert tc.num_workers == 1 and tc.use_gpu  # one GPU
    assert tc.lora is not None
    assert (tc.lora.r, tc.lora.alpha, tc.lora.dropout) == (16, 16, 0.05)
    assert tc.lora.target_modules == SEVEN
    assert (tc.epochs, tc.lr, tc.rows_per_step) == (3, 5e-5, 32)
    assert tc.adam_betas == (0.9, 0.999) and tc.weight_decay == 0.0
    assert (tc.warmup_ratio, tc.min_lr_ratio) == (0.1, 0.0)  # cosine to 0 after 10% warm-up
    assert tc.seq_len == 32768
    assert cfg.data.path == "paper-data/s1k-1.1.parquet"  # palign fetch-data s1k-1.1
    fields = cfg.data.fields
    assert (fields.answer, fields.cot, fields.attempt) == ("solution", "cot", "attempt")
    qwen3 = load_config(PAPER / "qwen3-8b.yaml")
    assert qwen3.models.student == "Qwen/Qwen3-8B"
    assert qwen3.models.chat_template_kwargs == {"enable_thinking": False}
    assert qwen3.train == tc  # the same recipe


def test_every_recipe_value_says_where_it_comes_from():
    lines = (PAPER / "recipe.yaml").read_text().splitlines()
    start = lines.index("train:")
    section = lines[start:lines.index("", start)]
    tagged = re.compile(r"#.*\[(paper|code|ours)\]")
    keys = [ln for ln in section[1:] if re.match(r"^  [a-z_]+:", ln)]
    assert len(keys) >= 20
    # a key's source is on its line or, for a block, on the line that opens it
    untagged = [ln for ln in keys if not tagged.search(ln)]
    assert not untagged, untagged
    assert yaml.safe_load("\n".join(section))["train"]["lora"]["r"] == 16


def test_a_lora_target_the_student_lacks_fails_at_validate_naming_the_field(
        tiny_model, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "a", "question": "q", "answer": "1", "cot": "c."}\n')
    raw = {"run": {"output_dir": str(tmp_path / "out"), "stages": ["train"]},
           "data": {"path": str(data)}, "models": {"student": tiny_model},
           "train": {"lora": {"target_modules": ["q_proj", "qkv_proj"],
                              "modules_to_save": ["score_head"]}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert palign_main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.lora.target_modules: qkv_proj: the student has no such module" in err
    assert "train.lora.modules_to_save: score_head" in err and "q_proj" in err
    raw["train"]["lora"] = {"target_modules": ["q_proj", "down_proj"]}
    path.write_text(yaml.safe_dump(raw))
    assert palign_main(["validate", str(path)]) == 0


def test_lora_and_rows_fields_are_checked_by_name():
    base = {"data": {"path": "x.jsonl"}, "models": {"student": "m"}}
    for train, field in [({"lora": {"r": 0}}, "train.lora.r"),
                         ({"lora": {"target_modules": []}}, "target_modules"),
                         ({"lora": {"rank": 8}}, "train.lora.rank"),
                         ({"rows_per_step": 32, "grad_accum": 4}, "train.grad_accum"),
                         ({"adam_betas": [0.9, 1.5]}, "train.adam_betas")]:
        with pytest.raises(ConfigError, match=re.escape(field)):
            parse_config({**base, "train": train})
    cfg = parse_config({**base, "train": {"lora": {}}})
    assert cfg.train.lora is not None and cfg.train.lora.target_modules == "all-linear"
    assert parse_config(base).train.lora is None  # full fine-tuning by default


def test_the_preset_aligns_filters_and_evaluates_as_the_paper():
    cfg = load_config(PAPER / "palign.yaml")
    assert cfg.run.stages == ["truncate", "align", "train", "evaluate"]
    assert (cfg.truncate.strategy, cfg.truncate.verdict) == ("binary", "generate")
    align = cfg.align
    assert (align.target, align.policy, align.extract) == ("draft", "drop_wrong", "flexible")
    assert (align.gold, align.uncheckable) == ("solution", "keep")  # Eq. 9 on s1K's solutions
    s = align.sampling
    assert (s.temperature, s.top_p, s.repetition_penalty) == (0.6, 0.9, 1.05)
    ev = cfg.evaluate
    assert [b.name for b in ev.benchmarks] == ["aime24", "aime25", "amc12", "math500"]
    assert ev.n == 3 and ev.grade_timeout_s == 10
    s = ev.sampling
    assert (s.temperature, s.top_p, s.repetition_penalty) == (0.6, 0.9, 1.05)
    assert s.max_tokens is None and ev.engine.max_model_len == 4096  # 4,096 tokens in all


def test_each_arm_differs_from_palign_only_where_its_method_does():
    palign = load_config(PAPER / "palign.yaml").model_dump()
    differs = {"sft": {"truncate": {"strategy": "full"},
                       "align": {"target": "teacher", "policy": "keep_all"}},
               "base": {}}
    for ratio in (25, 50, 75):
        differs[f"fixed_ratio_{ratio}"] = {"truncate": {"strategy": "fixed_ratio",
                                                        "ratio": ratio / 100}}
    for arm, changes in differs.items():
        cfg = load_config(PAPER / f"{arm}.yaml")
        dumped = cfg.model_dump()
        assert cfg.run.name == arm and cfg.run.output_dir == f"runs/paper/{arm}"
        for section in ("data", "models", "engine", "train", "truncate", "align"):
            expected = {**palign[section], **changes.get(section, {})}
            assert dumped[section] == expected, (arm, section)
        if arm == "base":  # the student as released, on the same protocol
            assert cfg.run.stages == ["evaluate"]
            assert [m.model for m in cfg.evaluate.models] == ["student"]
        else:
            assert dumped["evaluate"] == palign["evaluate"]


def test_the_demo_arms_mirror_the_real_ones():
    """configs/paper/demo/ runs each arm's method on SmolLM2: the same truncation, targets,
    filter and evaluation protocol; only the scale (model, data, sizes) differs."""
    for arm in ARMS:
        real, demo = load_config(PAPER / f"{arm}.yaml"), load_config(PAPER / "demo" / f"{arm}.yaml")
        assert demo.run.name == real.run.name and demo.run.stages == real.run.stages
        assert demo.models.student == "smollm2-135m" and not demo.train.use_gpu
        assert (demo.truncate.strategy, demo.truncate.ratio) == (
            real.truncate.strategy, real.truncate.ratio)
        assert (demo.align.target, demo.align.policy) == (real.align.target, real.align.policy)
        assert demo.evaluate.n == real.evaluate.n
        assert demo.evaluate.sampling == real.evaluate.sampling
        assert demo.evaluate.engine.max_model_len == real.evaluate.engine.max_model_len
        assert demo.train.lora == real.train.lora
