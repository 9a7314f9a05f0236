"""What a training process says about its steps: the running tally the final summary is made
from, one log line per reported step, and the rank's logging set up so those lines (and not
every library's chatter) reach the console. No Ray, no DeepSpeed engine: the loop
(``palign.train.loop``) fills the tally and decides when to log."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

from palign.common.logs import setup_rank_logging

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """The run so far, as the summary and the checkpoints' state report it."""

    params: dict[str, int] = field(default_factory=dict)  # trainable and total parameters
    losses: list[float] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # rows each step took (all ranks)
    tokens: int = 0  # real tokens trained on by this process's run (all ranks)
    seconds: float = 0.0
    slots: int = 0  # token positions computed (rows_per_step: what packing efficiency is of)


def log_step(rank: int, metrics: dict[str, Any], step: int, short: bool) -> None:
    """One line for step ``step`` from rank 0 (the others stay quiet); ``short``: the step
    took fewer rows than ``rows_per_step`` (the epoch's last)."""
    if rank == 0:
        note = " (the epoch's last step: the rest of its rows)" if short else ""
        logger.info("train step %d/%s: loss %.4f, lr %.3g, grad norm %.3g, %.0f tokens/s, "
                    "%d rows, %d tokens%s", step, metrics.get("total_steps", "?"),
                    metrics.get("loss", float("nan")), metrics.get("lr", float("nan")),
                    metrics.get("grad_norm") or float("nan"), metrics.get("tokens_per_s", 0.0),
                    metrics.get("rows", 0), metrics.get("tokens", 0), note)


def setup_logging() -> None:
    """palign's INFO lines on this rank's console; DeepSpeed, torch and transformers quieted."""
    setup_rank_logging()
    # Said once per rank and about DeepSpeed's own calls into torch, not about this run.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass
