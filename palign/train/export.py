"""Write the trained student as a plain Hugging Face folder.

``export_model`` is collective: every rank calls it. Under ZeRO-3 the parameters are sharded
across ranks; they are gathered one module at a time with ``deepspeed.zero.GatheredParameters``
(so at most one module's full weights exist on a rank at once, beside the growing state dict on
rank 0), tied weights staying tied. Under ZeRO-2 (or without DeepSpeed) every rank holds the
full weights and rank 0 simply reads them. Rank 0 then writes safetensors, the model and
generation configs, the tokenizer and its chat template into a temporary folder next to the
destination and renames it into place (a previous export is swapped out and removed after the
new one is in place), so readers see a whole model or the previous one. The weights keep the
training dtype (fp32 on CPU, bf16 when trained in bf16).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from palign.core import storage

logger = logging.getLogger(__name__)

EXPORT_INFO = "palign_train.json"


def _is_zero3(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def gather_state_dict(module: torch.nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """The module's full state dict on CPU at rank 0 (``None`` elsewhere); collective.

    Works for ZeRO-3-partitioned modules (gathered module by module) and for ordinary ones.
    Tensors shared between keys (tied embeddings) stay one tensor.
    """
    if not _is_zero3(module):
        if rank != 0:
            return None
        state: dict[str, torch.Tensor] = {}
        by_ptr: dict[tuple[int, torch.device], torch.Tensor] = {}
        for key, tensor in module.state_dict().items():
            ptr = (tensor.data_ptr(), tensor.device)
            if ptr not in by_ptr:
                by_ptr[ptr] = tensor.detach().to("cpu", copy=True)
            state[key] = by_ptr[ptr]
        return state

    import deepspeed

    gathered = deepspeed.zero.GatheredParameters
    out: dict[str, torch.Tensor] | None = {} if rank == 0 else None
    shared: dict[int, str] = {}

    def visit(mod: torch.nn.Module, prefix: str) -> None:
        params = list(mod.parameters(recurse=False))
        with gathered(params, modifier_rank=None):
            if out is not None:
                for name, p in mod.named_parameters(recurse=False):
                    key = prefix + name
                    if p.ds_id in shared:
                        out[key] = out[shared[p.ds_id]]
                    else:
                        out[key] = p.detach().to("cpu", copy=True)
                        shared[p.ds_id] = key
                for name, buf in mod.named_buffers(recurse=False):
                    if buf is not None and name not in mod._non_persistent_buffers_set:
                        out[prefix + name] = buf.detach().to("cpu", copy=True)
        for name, child in mod.named_children():
            visit(child, prefix + name + ".")

    visit(module, "")
    return out


def export_model(model: torch.nn.Module, tokenizer: Any, out_dir: str | Path, rank: int,
                 extra: dict[str, Any] | None = None) -> str:
    """Gather ``model`` (a transformers causal LM, possibly ZeRO-3 partitioned) and write it.

    Every rank must call this; rank 0 writes ``out_dir`` atomically: ``model.safetensors``,
    ``config.json``, ``generation_config.json``, tokenizer files with the chat template, and
    ``palign_train.json`` (``extra``: how it was trained). The folder loads with
    ``AutoModelForCausalLM.from_pretrained(out_dir)``. Returns ``out_dir``.
    """
    import torch.distributed as dist

    target = storage.absolute(out_dir)
    state = gather_state_dict(model, rank)
    if rank == 0:
        assert state is not None
        if storage.is_uri(target):
            # Object storage: written here first, then uploaded with config.json last, so a
            # reader that finds config.json finds the whole folder.
            with tempfile.TemporaryDirectory(prefix="palign-export-") as work:
                local = Path(work) / "model"
                _write(model, tokenizer, state, local, extra or {})
                storage.upload_dir(local, target, last=("config.json",))
        else:
            _write(model, tokenizer, state, Path(target), extra or {})
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return target


def _write(model: Any, tokenizer: Any, state: dict[str, torch.Tensor], out_dir: Path,
           extra: dict[str, Any]) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        dtype = next(iter(state.values())).dtype if state else torch.float32
        model.config.dtype = dtype
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_INFO).write_text(json.dumps(extra, indent=1, default=str))
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported the model to %s (%d tensors, %s)", out_dir, len(state), dtype)
