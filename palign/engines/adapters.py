"""LoRA adapter folders (PEFT's format) as models an engine can serve.

A LoRA run (``train.lora``) writes its adapter to ``<output_dir>/train/adapter/``: PEFT's
``adapter_config.json`` and ``adapter_model.safetensors``, with the base model it was trained
on in ``base_model_name_or_path``. Wherever palign takes a model folder (``models.*``,
``evaluate.models``), an adapter folder works too: ``palign.engines.models.resolve_model``
merges it into its base once per machine (cached under ``<cache_dir>/merged/``) and serves
the merged folder, like the export in
``<output_dir>/train/model/``. (vLLM can also serve the adapter itself beside its base with
``--enable-lora``; docs/training.md shows how.)

Merging: the base is loaded in float32, the adapter merged into it with PEFT
(``merge_and_unload``), and the result written in the base's own dtype.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from palign.data import storage

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
EXPORT_INFO = "palign_train.json"  # how an exported or merged model was made


def is_adapter_folder(path: str) -> bool:
    """Whether ``path`` (local or a URI) holds a PEFT adapter rather than a whole model."""
    return storage.is_file(storage.join(path, ADAPTER_CONFIG)) and not storage.is_file(
        storage.join(path, "config.json"))


def adapter_base(adapter: str | Path) -> str:
    """The base model an adapter folder names (``base_model_name_or_path``)."""
    config = json.loads(storage.read_text(storage.join(str(adapter), ADAPTER_CONFIG)))
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter}: {ADAPTER_CONFIG} names no base model "
                         "(base_model_name_or_path)")
    return str(base)


def merge_adapter(base_path: str, adapter: str | Path, out: Path, tokenizer: Any = None,
                  extra: dict[str, Any] | None = None) -> Any:
    """Write base + adapter, merged, to ``out`` as a plain Hugging Face folder in the base's
    dtype (the base loaded in float32 for the merge), with ``tokenizer`` (default: the
    adapter folder's, else the base's) and ``extra`` as ``palign_train.json``. Returns the
    dtype written."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(base_path)
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().to(dtype)
    merged.config.dtype = dtype
    merged.save_pretrained(out, safe_serialization=True)
    if tokenizer is None:
        has_own = Path(adapter, "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(str(adapter) if has_own else base_path)
    tokenizer.save_pretrained(out)
    if extra is not None:
        (out / EXPORT_INFO).write_text(json.dumps(extra, indent=1, default=str))
    return dtype
