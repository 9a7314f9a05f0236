"""The pure data side of student SFT: examples, loss masks, sequence packing and the token loss.

An example is the student's chat (user turn: the question with the solving instruction; assistant
turn: the align stage's target) rendered with the tokenizer's own chat template. Only the
assistant's tokens are supervised: the target and the template's end-of-turn marker
(``<|im_end|>`` for ChatML). Whitespace the template puts after that marker (ChatML's ``"\\n"``)
is not supervised: generation stops at the marker, so the model never has to write it.

Finding the assistant tokens: the prompt (the chat without the assistant turn, with the
generation prompt) is rendered and tokenised on its own; if its tokens are a prefix of the full
rendering's tokens (checked for SmolLM2's ChatML), everything after them is the assistant span
(``span == "tokens"``). Otherwise (a template whose last prompt token merges with the target's
first), the span is every token whose character offsets reach past the prompt text
(``span == "offsets"``); the one straddling token is then supervised too.

Packing and attention isolation: ``pack`` lays several examples end to end in one row of
``seq_len`` tokens with ``position_ids`` restarting at 0 for every sequence (trailing padding is
one more such sequence). transformers (checked with 5.19, ``masking_utils``:
``find_packed_sequence_indices``) turns such position ids into a block-diagonal causal mask for
sdpa, eager and flex attention (the tests check sdpa and eager), and flash attention reads the
same boundaries from them, so no attention mask is passed. The detection only runs when there is
no attention mask AND no KV cache: the model must be called with ``use_cache=False``
(``token_loss_sum`` does), since the default ``config.use_cache=True`` creates an empty cache
even in training mode and silently turns the isolation off, letting packed sequences attend to
each other.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from palign.method.prompts import student_question

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One tokenised chat; ``labels[i]`` is ``input_ids[i]`` where supervised, else -100."""

    id: str
    input_ids: list[int]
    labels: list[int]
    span: str = "tokens"  # how the assistant span was found: "tokens" or "offsets"
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Untrainable:
    """An align row that cannot become a training example (too long, nothing to learn), with
    the reason; the row goes to the train stage's rejects."""

    id: str
    reason: str


@dataclass(frozen=True)
class Pack:
    """Several examples in one row of ``seq_len`` tokens (padding is the last sequence)."""

    ids: list[str]
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    seq_lens: list[int]  # lengths of the real sequences, in order; padding not included

    @property
    def n_real(self) -> int:
        return sum(self.seq_lens)


def build_example(
    tokenizer: Any,
    question: str,
    target: str,
    max_len: int,
    overlong: Literal["reject", "truncate"] = "reject",
    example_id: str = "",
    template_kwargs: Mapping[str, Any] | None = None,
) -> Example | Untrainable:
    """Tokenise one student chat with the tokenizer's chat template and mask all but the answer.

    ``template_kwargs`` are extra variables for the template (``models.chat_template_kwargs``,
    e.g. ``{"enable_thinking": False}``), the same the engines render the student's prompts
    with, so that the model trains on the template it is served with.
    Rows over ``max_len`` tokens are rejected with their length, or with ``overlong="truncate"``
    cut to ``max_len`` (rejected anyway if no supervised token would remain).
    """
    extra = dict(template_kwargs or {})
    user = [{"role": "user", "content": student_question(question)}]
    chat = [*user, {"role": "assistant", "content": target}]
    full_text = tokenizer.apply_chat_template(chat, tokenize=False, **extra)
    prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True,
                                                **extra)
    # The template writes any BOS into the text itself: do not let the tokenizer add it again.
    enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    prompt_ids: list[int] = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    if ids[: len(prompt_ids)] == prompt_ids:
        start, span = len(prompt_ids), "tokens"
    else:
        char_start = (
            len(prompt_text) if full_text.startswith(prompt_text) else full_text.rfind(target)
        )
        if char_start < 0:
            raise ValueError("the chat template renders neither the prompt nor the target verbatim")
        offsets = enc["offset_mapping"]
        start = next((i for i, (_, end) in enumerate(offsets) if end > char_start), len(ids))
        span = "offsets"
        logger.debug("assistant span of %r found by character offsets", example_id)
    end = len(ids)
    while end > start + 1 and not tokenizer.decode(ids[end - 1 : end]).strip():
        end -= 1  # whitespace after the end-of-turn marker
    if end <= start:
        raise ValueError(f"example {example_id!r}: the chat template left no assistant tokens")
    labels = [IGNORE_INDEX] * start + ids[start:end] + [IGNORE_INDEX] * (len(ids) - end)
    labels[0] = IGNORE_INDEX  # never predicted (no token before it); keeps pack boundaries clean
    if len(ids) <= max_len:
        return Example(example_id, ids, labels, span=span)
    reason = f"{len(ids)} tokens > max_len {max_len}"
    if overlong == "reject":
        return Untrainable(example_id, reason)
    if all(label == IGNORE_INDEX for label in labels[:max_len]):
        return Untrainable(example_id, f"{reason}; truncating leaves no supervised token")
    return Example(example_id, ids[:max_len], labels[:max_len], span=span, truncated=True)


def example_from_row(
    tokenizer: Any,
    row: Mapping[str, Any],
    max_len: int,
    overlong: Literal["reject", "truncate"] = "reject",
    template_kwargs: Mapping[str, Any] | None = None,
) -> Example | Untrainable:
    """``build_example`` for an align-stage output row (``id``, ``question``, ``target``)."""
    return build_example(
        tokenizer, row["question"], row["target"], max_len, overlong, example_id=str(row["id"]),
        template_kwargs=template_kwargs,
    )


def pack(examples: Sequence[Example], seq_len: int, pad_id: int = 0) -> list[Pack]:
    """Best-fit-decreasing packing of examples into rows of exactly ``seq_len`` tokens.

    Every sequence gets position ids 0..n-1 and its first label set to -100 (the token before it
    belongs to another sequence), and the trailing padding is one more sequence of its own.
    """
    for ex in examples:
        if len(ex) > seq_len:
            raise ValueError(f"example {ex.id!r} has {len(ex)} tokens > seq_len {seq_len}")
        if len(ex) == 0:
            raise ValueError(f"example {ex.id!r} is empty")
    bins = pack_lengths([len(ex) for ex in examples], seq_len)
    return [make_pack([examples[i] for i in members], seq_len, pad_id) for members in bins]


def pack_lengths(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing on lengths alone: bins of indices into ``lengths``, each bin's
    lengths summing to at most ``seq_len``. Longest first (stable on ties); each goes to the
    fullest bin that still has room (the earliest such bin on ties), else to a new bin.

    Rooms are kept by value (at most ``seq_len + 1`` distinct ones), each with a heap of its
    bins, so a million lengths pack in seconds, not in the time of a sorted list of every bin.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    rooms: list[int] = []  # distinct rooms that have bins, sorted
    by_room: dict[int, list[int]] = {}  # room -> heap of bin indices
    for i in order:
        n = lengths[i]
        if n > seq_len or n <= 0:
            raise ValueError(f"length {n} of item {i} is not in 1..seq_len {seq_len}")
        slot = bisect.bisect_left(rooms, n)  # the smallest room that fits
        if slot < len(rooms):
            room = rooms[slot]
            b = heapq.heappop(by_room[room])
            if not by_room[room]:
                del by_room[room]
                rooms.pop(slot)
        else:
            room, b = seq_len, len(bins)
            bins.append([])
        bins[b].append(i)
        left = room - n
        if left not in by_room:
            by_room[left] = []
            bisect.insort(rooms, left)
        heapq.heappush(by_room[left], b)
    return bins


def make_pack(members: Sequence[Example], seq_len: int, pad_id: int) -> Pack:
    """``members`` laid end to end, in order, in one row of ``seq_len`` tokens (they must fit)."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for ex in members:
        input_ids += ex.input_ids
        labels += [IGNORE_INDEX, *ex.labels[1:]]
        position_ids += range(len(ex))
    n_pad = seq_len - len(input_ids)
    input_ids += [pad_id] * n_pad
    labels += [IGNORE_INDEX] * n_pad
    position_ids += range(n_pad)
    return Pack(
        [ex.id for ex in members], input_ids, labels, position_ids, [len(ex) for ex in members]
    )


def packing_efficiency(packs: Sequence[Pack]) -> float:
    """Share of real (non-padding) tokens among all token slots of the packs."""
    if not packs:
        return 0.0
    return sum(p.n_real for p in packs) / (len(packs) * len(packs[0].input_ids))


def collate_packs(packs: Sequence[Pack]) -> dict[str, torch.Tensor]:
    """Stack packs into ``input_ids``, ``labels`` and ``position_ids`` ([batch, seq_len]).

    No attention mask: the restarting position ids isolate the sequences, provided the model is
    called with ``use_cache=False`` (see the module docstring).
    """
    return {
        key: torch.tensor([getattr(p, key) for p in packs], dtype=torch.long)
        for key in ("input_ids", "labels", "position_ids")
    }


def pad_batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest: ``input_ids``, ``labels``, ``attention_mask``."""
    width = max(len(ex) for ex in examples)
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
    for ex in examples:
        n_pad = width - len(ex)
        out["input_ids"].append(ex.input_ids + [pad_id] * n_pad)
        out["labels"].append(ex.labels + [IGNORE_INDEX] * n_pad)
        out["attention_mask"].append([1] * len(ex) + [0] * n_pad)
    return {key: torch.tensor(rows, dtype=torch.long) for key, rows in out.items()}


def token_loss_sum(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    chunk_size: int | None = 1024,
    positions: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the supervised tokens, and how many there are.

    Works for packed (``collate_packs``) and padded (``pad_batch``) batches alike; the mean loss
    is ``loss_sum / n_tokens``, summed over micro-batches first when accumulating. With
    ``chunk_size`` the logits are computed (in fp32) only for supervised positions, at most
    ``chunk_size`` rows at a time, each chunk recomputed in the backward pass, so the full
    [batch, seq, vocab] logits never exist. ``chunk_size=None`` uses the model's own logits.
    The chunked path calls the decoder and the LM head directly: pass the bare model (or
    DeepSpeed's ``engine.module``), not a torch DDP wrapper, whose gradient sync needs its forward.

    The number of LM-head calls does not depend on the labels: the supervised positions are
    split into exactly ``ceil(positions / chunk_size)`` near-equal chunks (some of them empty when
    fewer tokens are supervised than there are chunks; the head is called on those too, on zero
    rows), and the backward pass recomputes each chunk once, so forward and backward make that
    many head calls each. Under ZeRO-3 every head call gathers the sharded weight with a
    collective, so every rank must make the same number: ``positions`` is an upper bound on the
    supervised positions that all ranks share (the loop passes ``micro_batch x seq_len``);
    the default, this batch's ``batch x (seq - 1)``, is the same on every rank only when the
    batches have one shape (packed ones do, right-padded ones need not).
    """
    # "shift_labels": the targets already shifted (a sequence-parallel shard of a row: its last
    # position's target is the first token of the next shard), every position predicts one
    shifted = "shift_labels" in batch
    inputs = {key: value for key, value in batch.items()
              if key not in ("labels", "shift_labels")}
    targets = batch["shift_labels"] if shifted else batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    n_tokens = int(keep.sum())
    wanted = targets[keep]
    if chunk_size is None or not _plain_lm_head(model):
        logits = model(**inputs, use_cache=False).logits
        logits = (logits if shifted else logits[:, :-1])[keep]
        return F.cross_entropy(logits.float(), wanted, reduction="sum"), n_tokens
    positions = targets.numel() if positions is None else positions
    if positions < n_tokens:
        raise ValueError(f"positions={positions} is below the {n_tokens} supervised tokens")
    n_chunks = max(1, math.ceil(positions / chunk_size))  # each chunk <= chunk_size rows
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
    hidden = (hidden if shifted else hidden[:, :-1])[keep]
    ce = functools.partial(_chunk_ce, model.get_output_embeddings())
    total = hidden.float().sum() * 0.0  # keeps the graph (and grads) when nothing is supervised
    for h, t in zip(hidden.tensor_split(n_chunks), wanted.tensor_split(n_chunks)):
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(ce, h, t, use_reentrant=False)
        else:
            total = total + ce(h, t)
    return total, n_tokens


def _chunk_ce(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _plain_lm_head(model: Any) -> bool:
    """Whether logits are just ``lm_head(hidden)`` (no soft-capping or scaling after it)."""
    cfg = model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    extra = [k for k in ("final_logit_softcapping", "logit_scale") if getattr(cfg, k, None)]
    if extra:
        logger.warning("model has %s: computing the loss from full logits", ", ".join(extra))
    return not extra
