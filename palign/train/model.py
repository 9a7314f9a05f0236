"""The student as training sees it: its dtype, its attention, its partitioning.

``load_student`` loads ``models.student`` (``palign.engines.models.resolve_model``) in
``train.dtype``
(``auto``: bf16 on a GPU that has it, fp32 otherwise) with the attention ``train.attention``
picks (``palign.train.attention``), gradient checkpointing per config, and, with
``train.sequence_parallel_size`` > 1, the Ulysses wrapping around its attention.
"""

from __future__ import annotations

from typing import Any

import torch

from palign.config import Config
from palign.engines.dtypes import torch_dtype
from palign.stages.train import TrainSection
from palign.train import attention


def train_dtype(tc: TrainSection, device: torch.device) -> torch.dtype:
    """The dtype ``train.dtype`` loads the student in on ``device``; ``auto``: bf16 on a GPU
    that supports it, fp32 otherwise."""
    bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch_dtype(tc.dtype, on_gpu=bf16_gpu)


def load_student(cfg: Config, dtype: torch.dtype, device: torch.device,
                 world: int = 1) -> tuple[Any, Any]:
    """Tokenizer and model of ``models.student`` (resolved to a local folder or a hub id); with
    ``train.lora`` the model is PEFT's ``PeftModel`` around it (``palign.train.lora``).

    Under ZeRO-3 the model is built already partitioned (``deepspeed.zero.Init``, through
    transformers' ``HfDeepSpeedConfig`` with the config the engine will get): no rank ever holds
    the whole model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from palign.engines.models import resolve_model
    from palign.train.engine import deepspeed_config

    tc = cfg.train
    path = resolve_model(cfg.models.student, cfg.models.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    partitioned = None
    if tc.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        partitioned = HfDeepSpeedConfig(deepspeed_config(tc, world, dtype == torch.bfloat16))
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attention.implementation(tc.attention, device)
    )
    # transformers holds the DeepSpeed config by a weak reference: it lives with the model
    model._palign_zero3_config = partitioned
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tc.lora is not None:  # base frozen, adapters added (under ZeRO-3: to the partitioned base)
        from palign.train.lora import apply_lora

        model = apply_lora(model, tc.lora, base_name=cfg.models.student)
    model.train()
    return tokenizer, model


def sequence_parallel(tc: TrainSection, model: Any) -> Any:
    """With ``train.sequence_parallel_size`` > 1: DeepSpeed's Ulysses attention wrapped around the
    model's own (each rank holds a slice of every row; before attention the ranks of a group
    exchange slices for heads, so each attends over whole rows with some of the heads, and
    back); the sequence-parallel groups (``mpu``) for ``deepspeed.initialize``. None at 1."""
    if tc.sequence_parallel_size == 1:
        return None
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    from palign.train.lora import base_model

    model = base_model(model)  # under a LoRA wrapper: the transformers model it wraps
    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=model.config._attn_implementation,
        sequence_parallel_size=tc.sequence_parallel_size, micro_batch_size=tc.micro_batch_size,
        seq_length=tc.seq_len, seq_length_is_variable=False)
