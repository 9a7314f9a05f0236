"""The DeepSpeed engine: the module it wraps, ZeRO config, the optimizer and the schedule.

``deepspeed_engine(cfg, model, world, total_steps)`` wraps ``LossModule(model)`` (its forward
is the summed token loss) with ``deepspeed.initialize``: ZeRO stage ``train.zero_stage``, with
optimizer (and ZeRO-3 parameter) offload per config; bf16 mixed precision with fp32 master
weights exactly when the model is loaded in bf16; a torch ``AdamW`` as client optimizer (betas
(0.9, 0.95), eps 1e-8, no weight decay on norms and biases), fused when
``train.fused_optimizer`` says so (``auto``: wherever torch has a fused kernel for the device);
a ``LambdaLR`` with linear warm-up then cosine decay to ``lr * min_lr_ratio``;
``train.deepspeed`` merged over the result (``palign.config.merge.deep_merge``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from palign.config import Config
from palign.config.merge import deep_merge
from palign.stages.train import TrainSection
from palign.train.data import token_loss_sum


class LossModule(torch.nn.Module):
    """What DeepSpeed wraps: the causal LM, whose forward returns the summed token loss.

    Calling the loss through ``engine(...)`` keeps DeepSpeed's forward bookkeeping (ZeRO-3
    parameter fetching, backward hooks) while ``token_loss_sum`` gets the bare model it needs for
    its chunked path. Packed batches are run with ``use_cache=False`` by ``token_loss_sum``.

    Under ZeRO-3 every call of the LM head gathers its sharded weight with a collective, so all
    ranks must call it equally often, although their micro-batches hold different numbers of
    supervised tokens (and, unpacked, different widths). ``positions`` (``micro_batch x
    seq_len``, the same on every rank) fixes ``token_loss_sum``'s chunk count at
    ``ceil(positions / chunk_size)`` head calls forward and as many in the backward
    recomputation, on every rank, with at most ``chunk_size`` rows of fp32 logits at a time.
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int | None,
                 positions: int | None = None, trainable_state_only: bool = False) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.positions = positions
        self.trainable_state_only = trainable_state_only

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        loss_sum, _ = token_loss_sum(self.model, batch, self.chunk_size, self.positions)
        return loss_sum

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """With ``trainable_state_only`` (a LoRA run) the frozen base's weights are left out
        of what DeepSpeed checkpoints, under every name they have: DeepSpeed's own exclusion
        misses a tied weight's second name (``lm_head.weight`` of tied embeddings)."""
        state = super().state_dict(*args, **kwargs)
        if self.trainable_state_only:
            prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
            for name, p in self.named_parameters(remove_duplicate=False):
                if not p.requires_grad:
                    state.pop(prefix + name, None)
        return state


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> Any:
    """Linear warm-up over ``ceil(warmup_ratio * total)`` steps, then cosine to ``min_lr_ratio``.

    The factor for optimizer step ``i`` (0-based) is ``f(i)``.
    """
    warmup = math.ceil(warmup_ratio * total_steps)

    def f(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = min(1.0, (i - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def deepspeed_config(tc: TrainSection, world: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config the engine is built with (batch sizes, clipping, ZeRO, precision),
    with ``train.deepspeed`` merged over it."""
    zero: dict[str, Any] = {"stage": tc.zero_stage}
    sp = tc.sequence_parallel_size
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.micro_batch_size * tc.grad_accum * (world // sp),
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # a client torch optimizer with ZeRO
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if sp > 1:
        config["sequence_parallel_size"] = sp
    if tc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": tc.use_gpu}
    if tc.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": tc.use_gpu}
    if tc.offload_optimizer or tc.offload_params:
        # the client optimizer (torch AdamW) steps on the CPU copy: no DeepSpeed CPU Adam to build
        config["zero_force_ds_cpu_optimizer"] = False
    return deep_merge(config, tc.deepspeed)


def gradient_divisor(tc: TrainSection, world: int) -> int:
    """How many ranks DeepSpeed divides the summed gradients by: the data-parallel size
    (``world / sequence_parallel_size``), except under ZeRO-3 with sequence parallelism, whose
    reduce-scatter (DeepSpeed 0.19, ``reduce_scatter: true``, its default and the only setting
    palign takes there) averages over every rank of the group, sequence-parallel ones
    included. The loss is scaled by it, so the gradients (and their norm) are the global
    batch's mean whatever the layout."""
    sp = tc.sequence_parallel_size
    return world if sp > 1 and tc.zero_stage == 3 else world // sp


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: none on norms and biases."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def optimizer_elements(engine: Any) -> int:
    """The parameter elements this rank's optimizer holds (its fp32 partitions under ZeRO):
    summed over ranks, what the optimizer trains (a LoRA run: the adapters alone, plus
    ZeRO's alignment padding)."""
    opt = engine.optimizer
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        groups = getattr(opt, name, None)
        if groups:
            return sum(int(t.numel()) for t in groups)
    return sum(int(p.numel()) for g in opt.param_groups for p in g["params"])


def fused_supported(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for ``device``'s type."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return device.type in _get_fused_kernels_supported_devices()


def optimizer(tc: TrainSection, module: torch.nn.Module, device: torch.device) -> Any:
    fused = fused_supported(device) if tc.fused_optimizer == "auto" else tc.fused_optimizer
    return torch.optim.AdamW(param_groups(module, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.95),
                             eps=1e-8, fused=bool(fused) or None)


def deepspeed_engine(cfg: Config, model: torch.nn.Module, world: int, total_steps: int,
                     load_universal: bool = False, mpu: Any = None) -> Any:
    """``deepspeed.initialize`` on ``LossModule(model)`` with the optimizer and schedule;
    ``load_universal``: the checkpoint it will load is a universal one (elastic resume);
    ``mpu``: the sequence-parallel groups (``palign.train.model.sequence_parallel``)."""
    import deepspeed

    tc = cfg.train
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    # the positions a rank's micro-batch holds: a row, or its share of it under sequence parallelism
    positions = tc.micro_batch_size * tc.seq_len // tc.sequence_parallel_size
    module = LossModule(model, tc.loss_chunk_size, positions,
                        trainable_state_only=tc.lora is not None)
    opt = optimizer(tc, module, next(model.parameters()).device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(total_steps, tc.warmup_ratio, tc.min_lr_ratio))
    config = deepspeed_config(tc, world, bf16)
    if load_universal:
        config = deep_merge(config, {"checkpoint": {"load_universal": True}})
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=scheduler,
                                           config=config, mpu=mpu)
    return engine
