"""The step plan: which units every rank's micro-batches hold at every optimizer step.

Pure arithmetic in constant memory. An epoch's order is a pseudo-random permutation of the units,
computed one position at a time (``permute``): a 4-round Feistel network keyed by ``(seed,
epoch)`` over the smallest power-of-four domain that holds the units, walked until it lands
inside. So no rank holds a list of every unit, and any position of any epoch is known at once
(a resumed run needs nothing but the step number).

One optimizer step takes ``world x micro x accum`` consecutive positions of the epoch's order;
rank ``r``'s micro-batch ``m`` is the slice at ``(m * world + r) * micro``. The last step of an
epoch is completed by wrapping to the start of that epoch's order, so every rank runs the same
number of micro-batches and every unit is seen at least once per epoch (nothing is dropped).
``max_steps`` caps the total.

With ``train.rows_per_step`` (``RowPlan``) a step is a number of rows instead: the units are
single examples, a step takes the next ``rows_per_step`` positions of the epoch's order (the
epoch's last step the rest, none repeated), and the loop packs them into bins and deals the
bins to the ranks (``deal``): so a step's rows, not its bins, are fixed whatever their lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_ROUNDS = 4
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit finaliser (splitmix64's): every input bit reaches every output bit."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _keys(seed: int, epoch: int) -> list[np.uint64]:
    rng = np.random.default_rng([seed, epoch])
    return [np.uint64(k) for k in rng.integers(0, 2**63, size=_ROUNDS, dtype=np.int64)]


def permute(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """The units at ``positions`` (each in ``0..n-1``) of epoch ``epoch``'s order: a bijection of
    ``0..n-1`` for each ``(seed, epoch)``."""
    if n <= 0:
        raise ValueError("no units to order")
    bits = max(2, math.ceil(math.log2(n)) if n > 1 else 2)
    half = (bits + 1) // 2
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    keys = _keys(seed, epoch)
    with np.errstate(over="ignore"):
        x = np.asarray(positions, np.uint64).copy()
        walking = np.ones(x.shape, bool)
        while walking.any():  # cycle walking: the domain is at most 4n, so a few rounds
            v = x[walking]
            left, right = v >> shift, v & mask
            for key in keys:
                left, right = right, left ^ (_mix(right ^ key) & mask)
            x[walking] = (left << shift) | right
            walking = x >= np.uint64(n)
    return x.astype(np.int64)


class _Epochs:
    """Steps per epoch, total steps and each step's epoch for a plan that takes ``_sizes()``'s
    items per step (the last step of an epoch takes the rest)."""

    epochs: int
    max_steps: int | None

    def _sizes(self) -> tuple[int, int]:
        """(items per epoch, items per step)."""
        raise NotImplementedError

    @property
    def steps_per_epoch(self) -> int:
        items, per_step = self._sizes()
        return max(1, math.ceil(items / per_step))

    @property
    def total_steps(self) -> int:
        total = self.epochs * self.steps_per_epoch
        return min(total, self.max_steps) if self.max_steps else total

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch


@dataclass(frozen=True)
class StepPlan(_Epochs):
    """Which units every rank's micro-batches hold at every optimizer step."""

    n_units: int
    world: int
    micro: int
    accum: int
    epochs: int
    max_steps: int | None
    seed: int

    @property
    def per_step(self) -> int:
        return self.world * self.micro * self.accum

    def _sizes(self) -> tuple[int, int]:
        return self.n_units, self.per_step

    def _units(self, step: int, offsets: np.ndarray) -> list[int]:
        start = (step % self.steps_per_epoch) * self.per_step
        positions = (start + offsets) % self.n_units
        return permute(positions, self.n_units, self.seed, self.epoch_of(step)).tolist()

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Rank ``rank``'s ``accum`` micro-batches (lists of unit indices) at 0-based ``step``:
        computed for this rank alone."""
        return [self._units(step, (m * self.world + rank) * self.micro + np.arange(self.micro))
                for m in range(self.accum)]


@dataclass(frozen=True)
class RowPlan(_Epochs):
    """``train.rows_per_step``: which rows each optimizer step takes, in any world size.

    Epoch ``e``'s order is ``permute(.., seed, e)`` over the rows (the prepared units are single
    examples); step ``i`` of the epoch takes its positions ``i * rows_per_step`` onwards, the
    last step of an epoch the rest (fewer rows, none repeated). The loop packs a step's rows
    into bins (``pack_lengths``) and deals the bins to the data-parallel ranks (``deal``)."""

    n_rows: int
    rows_per_step: int
    epochs: int
    max_steps: int | None
    seed: int

    def _sizes(self) -> tuple[int, int]:
        return self.n_rows, self.rows_per_step

    def rows(self, step: int) -> list[int]:
        """The rows (unit indices) of 0-based ``step``, the same on every rank."""
        start = (step % self.steps_per_epoch) * self.rows_per_step
        stop = min(self.n_rows, start + self.rows_per_step)
        return permute(np.arange(start, stop), self.n_rows, self.seed,
                       self.epoch_of(step)).tolist()


def deal(n_bins: int, world: int, micro: int) -> list[list[list[int | None]]]:
    """Bins ``0..n_bins-1`` of one step dealt to ``world`` data-parallel ranks: ``[rank][m]``
    is micro-batch ``m``'s bins (``micro`` slots each; None: an empty slot). Every rank gets
    the same number of micro-batches, ``ceil(n_bins / (world x micro))`` (at least 1), as
    DeepSpeed's collectives need; bin ``b`` sits at slot ``b`` of the order micro-batch,
    rank, slot, so the bins fill the first micro-batches of every rank first."""
    per_round = world * micro
    rounds = max(1, math.ceil(n_bins / per_round))
    return [[[b if (b := (m * world + r) * micro + j) < n_bins else None
              for j in range(micro)] for m in range(rounds)] for r in range(world)]
