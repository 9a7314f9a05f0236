"""resolve_model: short names become a converted local folder once; other names pass through."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from palign.engines import models
from palign.engines.models import resolve_model


@pytest.mark.model
def test_short_name_becomes_a_complete_folder() -> None:
    folder = Path(resolve_model("smollm2-135m"))
    assert folder.is_dir()
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file() or list(folder.glob("model-*.safetensors"))
    assert (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
    assert (folder / "tokenizer_config.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    template = folder / "chat_template.jinja"
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert template.is_file() or "chat_template" in tokenizer_config
    assert "<|im_start|>" in (template.read_text() if template.is_file() else "")

    started = time.monotonic()
    again = resolve_model("smollm2-135m")
    assert again == str(folder)
    assert time.monotonic() - started < 1.0


@pytest.mark.model
def test_converted_folder_loads_with_chat_template() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")


def test_directory_is_returned_unchanged(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_hub_id_is_returned_unchanged() -> None:
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_concurrent_resolves_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def fake_materialise(entry: models.GgufWheelModel, dest: Path) -> None:
        calls.append(dest)
        time.sleep(0.3)  # long enough for the other threads to queue on the lock
        staging = dest.with_name(dest.name + ".tmp")
        staging.mkdir()
        (staging / "config.json").write_text("{}")
        staging.rename(dest)

    entry = models.GgufWheelModel(package="none", member="none.gguf")
    monkeypatch.setitem(models.REGISTRY, "fake-model", entry)
    monkeypatch.setattr(models, "_materialise", fake_materialise)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model("fake-model", str(tmp_path))))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [str(tmp_path / "models" / "fake-model")] * 4


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PALIGN_CACHE_DIR", str(tmp_path))
    assert models.default_cache_dir() == tmp_path
