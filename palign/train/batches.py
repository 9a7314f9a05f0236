"""What a rank trains on at each optimizer step: its micro-batches, collated.

``StepSource`` reads them from the prepared units (``palign.train.units.UnitReader``) by the
step plan (``palign.train.steps``):

- a step of bins (the default): ``StepPlan`` names this rank's ``grad_accum`` micro-batches of
  ``micro_batch_size`` prepared units (packs, or single padded examples with ``packing:
  false``);
- a step of rows (``train.rows_per_step``): ``RowPlan`` names the step's rows (the same on every
  rank); their lengths come from the unit table, they are packed best-fit-decreasing into bins of
  ``seq_len`` (``pack_lengths``, or one row per bin without packing), and the bins are dealt to
  the data-parallel ranks (``deal``); a rank reads only its own bins' rows. Every rank runs as
  many micro-batches; a slot no bin fills is an empty unit (all padding, no label).

Under sequence parallelism each micro-batch is cut to this rank's slice (``sequence_shard``).
Nothing here grows with the corpus: a step reads the unit-table row groups and units it needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from palign.stages.train import TrainSection
from palign.train.data import (
    IGNORE_INDEX,
    Example,
    Pack,
    collate_packs,
    make_pack,
    pack_lengths,
    pad_batch,
)
from palign.train.steps import RowPlan, StepPlan, deal
from palign.train.units import UnitReader


@dataclass
class MicroBatch:
    batch: dict[str, torch.Tensor]
    supervised: int  # tokens with a label (the loss's terms)
    real: int  # non-padding input tokens
    rows: int = 0  # training examples (rows) in it


def collate(units: Sequence[Any], pad_id: int) -> MicroBatch:
    """A micro-batch of packs (``collate_packs``) or of examples (right-padded)."""
    if isinstance(units[0], Pack):
        batch = collate_packs(units)
        real = sum(u.n_real for u in units)
        rows = sum(len(u.seq_lens) for u in units)
    else:
        batch = pad_batch(units, pad_id)
        real = sum(len(u) for u in units)
        rows = len(units)
    return MicroBatch(batch, int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), real, rows)


def empty_unit(packed: bool, width: int, pad_id: int) -> Pack | Example:
    """A unit with nothing to learn (all padding, no label): fills a rank's empty slot of a
    ``rows_per_step`` step, so that every rank runs as many micro-batches (DeepSpeed's
    collectives). ``width`` tokens: ``seq_len`` (packs) or at least the sequence-parallel size."""
    if packed:
        return Pack([], [pad_id] * width, [IGNORE_INDEX] * width, list(range(width)), [])
    return Example("", [pad_id] * width, [IGNORE_INDEX] * width)


def sequence_shard(m: MicroBatch, sp: int, sp_rank: int) -> MicroBatch:
    """Rank ``sp_rank``'s slice of a packed micro-batch under sequence parallelism: an equal
    share of every row's positions, with the targets shifted before slicing (a slice's last
    position predicts the next slice's first token). Its real tokens and rows count on the
    group's first rank only, so that sums over ranks count each once."""
    labels = m.batch["labels"]
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    width = labels.shape[1] // sp
    cut = slice(sp_rank * width, (sp_rank + 1) * width)
    batch = {"input_ids": m.batch["input_ids"][:, cut].contiguous(),
             "position_ids": m.batch["position_ids"][:, cut].contiguous(),
             "shift_labels": shifted[:, cut].contiguous()}
    first = sp_rank == 0
    return MicroBatch(batch, int((batch["shift_labels"] != IGNORE_INDEX).sum()),
                      m.real if first else 0, m.rows if first else 0)




@dataclass(frozen=True)
class StepBatches:
    """This rank's micro-batches of one step, and what the step holds on all ranks."""

    micro: list[MicroBatch]
    rows_planned: int | None  # rows_per_step: the step's rows (all ranks); None: a step of bins
    bins: int  # packed bins (or padded rows) of the whole step, all ranks (rows_per_step)


class StepSource:
    """The micro-batches of any step for one rank (``dp_rank`` of ``dp_world`` data-parallel
    ranks; ``sp_rank``: its place in its sequence-parallel group)."""

    def __init__(self, tc: TrainSection, data: UnitReader, dp_world: int, dp_rank: int,
                 sp_rank: int = 0) -> None:
        self.tc, self.data = tc, data
        self.dp_world, self.dp_rank, self.sp_rank = dp_world, dp_rank, sp_rank
        self.pad_id = data.prepared.pad_id
        self.plan: StepPlan | RowPlan
        if tc.rows_per_step is not None:
            self.plan = RowPlan(len(data), tc.rows_per_step, tc.epochs, tc.max_steps, tc.seed)
        else:
            self.plan = StepPlan(len(data), dp_world, tc.micro_batch_size, tc.grad_accum,
                                 tc.epochs, tc.max_steps, tc.seed)

    @property
    def by_rows(self) -> bool:
        return isinstance(self.plan, RowPlan)

    def step(self, step: int) -> StepBatches:
        if isinstance(self.plan, RowPlan):
            out = self._rows_step(step)
        else:
            units = self.plan.micro_batches(step, self.dp_rank)
            out = StepBatches([collate([self.data.unit(i) for i in idx], self.pad_id)
                               for idx in units], None, 0)
        sp = self.tc.sequence_parallel_size
        if sp > 1:
            return StepBatches([sequence_shard(m, sp, self.sp_rank) for m in out.micro],
                               out.rows_planned, out.bins)
        return out

    def _rows_step(self, step: int) -> StepBatches:
        assert isinstance(self.plan, RowPlan)
        tc = self.tc
        rows = self.plan.rows(step)
        if tc.packing:
            bins = pack_lengths([self.data.real_tokens(u) for u in rows], tc.seq_len)
        else:
            bins = [[i] for i in range(len(rows))]
        micro = []
        for slots in deal(len(bins), self.dp_world, tc.micro_batch_size)[self.dp_rank]:
            filled = [b for b in slots if b is not None]
            if not filled:  # nothing for this rank here: the smallest empty batch
                micro.append(collate([empty_unit(tc.packing, tc.sequence_parallel_size,
                                                 self.pad_id)], self.pad_id))
                continue
            units: list[Pack | Example] = []
            for b in slots:
                if b is None:
                    units.append(empty_unit(tc.packing, tc.seq_len if tc.packing else 1,
                                            self.pad_id))
                    continue
                members = [self.data.unit(rows[i]) for i in bins[b]]
                units.append(make_pack(members, tc.seq_len, self.pad_id) if tc.packing
                             else members[0])
            micro.append(collate(units, self.pad_id))
        return StepBatches(micro, len(rows), len(bins))
