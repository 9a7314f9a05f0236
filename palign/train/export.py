"""Write the trained student as a plain Hugging Face folder.

``export_model`` is collective: every rank calls it. Under ZeRO-3 the parameters are sharded
across ranks; they are gathered one module at a time with ``deepspeed.zero.GatheredParameters``
(so at most one module's full weights exist on a rank at once, beside the growing state dict on
rank 0), tied weights staying tied. Under ZeRO-2 (or without DeepSpeed) every rank holds the
full weights and rank 0 simply reads them. Rank 0 then writes safetensors, the model and
generation configs, the tokenizer and its chat template into a temporary folder and installs it
(``writing_folder``: renamed into place beside a previous export, which is removed after; on
object storage uploaded with config.json last), so readers see a whole model or the previous
one. The weights keep the
training dtype (fp32 on CPU, bf16 when trained in bf16).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from palign.data import storage, transfer
from palign.engines.adapters import EXPORT_INFO

logger = logging.getLogger(__name__)


def _is_zero3(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def gather_state_dict(module: torch.nn.Module, rank: int, trainable_only: bool = False
                      ) -> dict[str, torch.Tensor] | None:
    """The module's full state dict on CPU at rank 0 (``None`` elsewhere); collective.

    Works for ZeRO-3-partitioned modules (gathered module by module) and for ordinary ones.
    Tensors shared between keys (tied embeddings) stay one tensor. ``trainable_only``: only the
    parameters that need gradients (a LoRA run's adapters), no buffers; nothing else is
    gathered.
    """
    if not _is_zero3(module):
        if rank != 0:
            return None
        state: dict[str, torch.Tensor] = {}
        by_ptr: dict[tuple[int, torch.device], torch.Tensor] = {}
        items = ((k, p) for k, p in module.named_parameters() if p.requires_grad) \
            if trainable_only else module.state_dict().items()
        for key, tensor in items:
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
        params = [p for p in mod.parameters(recurse=False)
                  if p.requires_grad or not trainable_only]
        with gathered(params, modifier_rank=None):
            if out is not None:
                for name, p in mod.named_parameters(recurse=False):
                    if trainable_only and not p.requires_grad:
                        continue
                    key = prefix + name
                    if p.ds_id in shared:
                        out[key] = out[shared[p.ds_id]]
                    else:
                        out[key] = p.detach().to("cpu", copy=True)
                        shared[p.ds_id] = key
                for name, buf in mod.named_buffers(recurse=False):
                    if trainable_only:
                        break
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
        dtype = next(iter(state.values())).dtype if state else torch.float32
        with writing_folder(target, last="config.json") as local:
            model.config.dtype = dtype
            model.save_pretrained(local, state_dict=state)
            tokenizer.save_pretrained(local)
            (local / EXPORT_INFO).write_text(json.dumps(extra or {}, indent=1, default=str))
        logger.info("exported the model to %s (%d tensors, %s)", target, len(state), dtype)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return target


@contextlib.contextmanager
def writing_folder(target: str, last: str) -> Iterator[Path]:
    """A local folder to write a whole folder into; when the block ends without an error it is
    put at ``target`` so that readers see the whole new folder or the previous one. On a file
    system it is a sibling of ``target``, renamed into place (a previous folder is swapped out
    and removed after); on object storage a temporary folder, uploaded with ``last`` (the file
    readers look for) last."""
    if storage.is_uri(target):
        with tempfile.TemporaryDirectory(prefix="palign-export-") as work:
            local = Path(work) / "out"
            local.mkdir()
            yield local
            transfer.upload_dir(local, target, last=(last,))
        return
    out_dir = Path(target)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
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
