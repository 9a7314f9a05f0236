"""models.chat_template_kwargs (Qwen3's enable_thinking: false) reach every place the student's
template renders a chat: an engine's prompt (the transformers backend, for real) and the
training tokens (``build_example`` and a whole preparation), and only the student's engines
get them. The model is a tiny random Llama whose template branches on the flag as Qwen3's
does: without thinking, an empty think block opens the assistant's turn."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from palign.config import EngineConfig, parse_config
from palign.data.shards import ShardWriter
from palign.engines.base import prompt_token_ids

pytestmark = pytest.mark.model

TEMPLATE = (
    "{%- set think = enable_thinking is defined and not enable_thinking -%}"
    "{%- for m in messages -%}"
    "<|im_start|>{{ m.role }}\n"
    "{%- if m.role == 'assistant' and think %}<think>\n\n</think>\n\n{% endif -%}"
    "{{ m.content }}<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if think %}<think>\n\n</think>\n\n{% endif -%}{%- endif -%}")
NO_THINK = {"enable_thinking": False}
CHAT = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def thinking_model(tiny_model, tmp_path_factory) -> str:
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("thinking") / "model"
    shutil.copytree(tiny_model, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return str(folder)


def test_the_flag_reaches_the_engines_prompt(thinking_model):
    from transformers import AutoTokenizer

    from palign.engines import EngineSpec, Sampling, build_engine

    tok = AutoTokenizer.from_pretrained(thinking_model)
    plain, no_think = prompt_token_ids(tok, CHAT), prompt_token_ids(tok, CHAT, NO_THINK)
    assert "<think>" in tok.decode(no_think) and "<think>" not in tok.decode(plain)
    engine = build_engine(EngineSpec.of(EngineConfig(backend="transformers", max_model_len=256),
                                        thinking_model, template_kwargs=NO_THINK))
    try:
        out = engine.generate([CHAT], Sampling(max_tokens=2))[0]
    finally:
        engine.close()
    assert out.error is None and out.prompt_tokens == len(no_think) != len(plain)


def test_the_flag_reaches_the_training_tokens(thinking_model, tmp_path):
    from transformers import AutoTokenizer

    from palign.method.prompts import student_question
    from palign.method.targets import training_target
    from palign.train.data import IGNORE_INDEX, build_example
    from palign.train.prepare import prepare
    from palign.train.units import UnitReader

    tok = AutoTokenizer.from_pretrained(thinking_model)
    target = training_target("We add 2 and 3.", "So \\boxed{5}.")
    ex = build_example(tok, "What is 2 + 3?", target, 512, template_kwargs=NO_THINK)
    served = prompt_token_ids(tok, [{"role": "user", "content": student_question(
        "What is 2 + 3?")}], NO_THINK)
    # the model trains on the text it is served with, and learns only the answer
    served_text, trained_text = tok.decode(served), tok.decode(ex.input_ids)
    assert "<think>" in served_text and trained_text.startswith(served_text)
    assert trained_text[len(served_text):].startswith(target)
    first = next(i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX)
    assert "<think>" not in tok.decode(ex.input_ids[first:])
    assert "<think>" not in tok.decode(build_example(tok, "What is 2 + 3?", target,
                                                     512).input_ids)

    # a whole preparation: the config's flag is in the units the workers read
    out = tmp_path / "out"
    ShardWriter(out / "align", "jsonl", 8).write(
        [{"id": "r1", "question": "What is 2 + 3?", "answer": "5", "target": target}])
    cfg = parse_config({"run": {"output_dir": str(out), "stages": ["train"]},
                        "data": {"path": "x.jsonl"},
                        "models": {"student": thinking_model, "chat_template_kwargs": NO_THINK},
                        "train": {"seq_len": 256}})
    unit = UnitReader(prepare(cfg, use_ray=False).folder).unit(0)
    assert unit.input_ids[:unit.seq_lens[0]] == ex.input_ids


def test_only_the_students_engines_get_the_flag(tmp_path):
    cfg = parse_config({"run": {"output_dir": str(tmp_path)}, "data": {"path": "x.jsonl"},
                        "models": {"student": "org/student", "teacher": "org/teacher",
                                   "chat_template_kwargs": NO_THINK}})
    for model in ("org/student", cfg.trained_model_dir(), cfg.trained_adapter_dir()):
        assert cfg.template_kwargs_for(model) == NO_THINK
    assert cfg.template_kwargs_for("org/teacher") == {}
    assert cfg.template_kwargs_for(str(Path(tmp_path) / "elsewhere")) == {}
