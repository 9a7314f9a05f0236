"""LoRA adapters on the student (``train.lora``), with PEFT: applied, counted, checked and
exported.

- ``apply_lora``: PEFT's ``LoraConfig`` from the config section and ``get_peft_model``; the base
  stays frozen, so only the adapters (and any ``modules_to_save``) have gradients, sit in the
  optimizer and go into checkpoints (``palign.train.checkpoints`` leaves the frozen base out).
  Under ZeRO-3 the base is already partitioned when the adapters are added (PEFT reads the
  layers' shapes from DeepSpeed's ``ds_shape``), and DeepSpeed partitions the adapters.
- ``module_problems``: the student's module names, read from a model built on the ``meta``
  device from its ``config.json`` (no weights), against ``target_modules`` and
  ``modules_to_save``: ``palign validate`` and every run check them before any work.
- ``export_lora``: the adapter in PEFT's own format (``<output_dir>/train/adapter/``: what vLLM's
  LoRA support and ``PeftModel.from_pretrained`` load), then a merged Hugging Face folder
  (``<output_dir>/train/model/``): the base reloaded in float32 on rank 0, the adapter merged
  into it, written in the base's own dtype (``palign.engines.adapters``), so engines load it
  like any model.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any

import torch

from palign.stages.train import LoraSection

logger = logging.getLogger(__name__)


def peft_config(lc: LoraSection) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
        target_modules=lc.target_modules if lc.target_modules == "all-linear"
        else list(lc.target_modules),
        modules_to_save=list(lc.modules_to_save) if lc.modules_to_save else None,
        bias="none", task_type="CAUSAL_LM")


def apply_lora(model: Any, lc: LoraSection, base_name: str | None = None) -> Any:
    """``model`` (a transformers causal LM) with LoRA adapters: PEFT's ``PeftModel``, whose
    base is frozen. ``base_name`` is recorded in the adapter's config as its base model."""
    from peft import get_peft_model

    if getattr(model, "is_gradient_checkpointing", False):
        # the checkpointed blocks' inputs must need gradients, or no gradient reaches the
        # adapters inside them with reentrant checkpointing
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, peft_config(lc))
    if base_name:
        peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def base_model(model: Any) -> Any:
    """The transformers model under a ``PeftModel`` (the model itself otherwise)."""
    return model.get_base_model() if is_peft(model) else model


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a ZeRO-3-partitioned parameter counts whole."""
    trainable = total = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


# -- checked before any work -----------------------------------------------------------------

def module_names(model_path: str) -> list[str]:
    """Every module name of the model in ``model_path`` (a folder or a hub id in the local
    cache), from its config alone: the model is built on the ``meta`` device, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [name for name, _ in model.named_modules() if name]


def _matches(name: str, key: str) -> bool:
    """PEFT's rule for a name in a list: the module's name is ``key`` or ends with ``.key``."""
    return name == key or name.endswith("." + key)


def module_problems(lc: LoraSection, names: list[str]) -> list[str]:
    """What in ``train.lora`` names a module the student does not have, each with its field."""
    problems: list[str] = []
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not re.search(r"\.\d+$", n)})
    shown = ", ".join(leaves[:40]) + (" ..." if len(leaves) > 40 else "")
    for field, wanted in (("target_modules", lc.target_modules),
                          ("modules_to_save", lc.modules_to_save)):
        if not isinstance(wanted, list):
            continue
        missing = [key for key in wanted if not any(_matches(n, key) for n in names)]
        if missing:
            problems.append(f"train.lora.{field}: {', '.join(missing)}: the student has no such "
                            f"module (its modules are named: {shown})")
    return problems


@contextlib.contextmanager
def outside_zero3() -> Iterator[None]:
    """Rank 0's own work after a ZeRO-3 run (saving the adapter, loading the base to merge):
    transformers and PEFT see no ZeRO-3 config meanwhile. Otherwise ``from_pretrained`` would
    build the base partitioned and PEFT would gather parameters, collectives the other ranks
    never join (a hang). transformers keeps the config as a module-level weak reference."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


# -- export -----------------------------------------------------------------------------------

def export_lora(model: Any, tokenizer: Any, base_path: str, adapter_dir: str, merged_dir: str,
                rank: int, extra: dict[str, Any]) -> None:
    """Collective (every rank calls it): gather the adapters (only the trainable parameters)
    to rank 0, which writes the adapter folder (PEFT's format, with the tokenizer), then the
    merged model folder (``palign.engines.adapters.merge_adapter``: in the base's dtype)."""
    import torch.distributed as dist

    from palign.engines.adapters import ADAPTER_CONFIG, merge_adapter
    from palign.train.export import gather_state_dict, writing_folder

    state = gather_state_dict(model, rank, trainable_only=True)
    if rank == 0:
        assert state is not None
        with outside_zero3(), writing_folder(adapter_dir, last=ADAPTER_CONFIG) as adapter:
            # the embeddings are saved only as modules_to_save says (no hub lookup of the base)
            model.save_pretrained(adapter, state_dict=state, save_embedding_layers=False)
            tokenizer.save_pretrained(adapter)
            with writing_folder(merged_dir, last="config.json") as merged:
                dtype = merge_adapter(base_path, adapter, merged, tokenizer, extra)
        logger.info("exported the adapter to %s and the merged model (%s) to %s", adapter_dir,
                    dtype, merged_dir)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
