"""Attention for packed training rows that keeps each document to itself without an S x S mask.

A packed row (``palign.train.data.collate_packs``) holds several documents, told apart by
position ids that restart at each document. Hugging Face's ``sdpa`` and ``eager`` attention turn
restarting position ids into a dense ``[batch, 1, S, S]`` block-diagonal mask, and with an
explicit mask SDPA leaves its flash kernel for one that computes the full S x S scores: memory
and time grow with the square of the bin length, whatever the documents' lengths.

``train.attention`` chooses how a packed row is attended:

- ``documents`` (registered with transformers as ``palign_documents``): each document's span
  is cut out of the row and given to ``torch.nn.functional.scaled_dot_product_attention`` alone
  with ``is_causal=True`` and no mask, which SDPA serves with its flash (or memory-efficient)
  kernel on CPU and GPU. Memory is linear in the bin length; the work is the sum of the
  documents' squares, not the row's. The spans are found once per forward from the position
  ids (a new span wherever the position does not go up by one, as transformers finds packed
  sequences), cached for the model's other layers. A row that is one document (padded
  batches: right padding never reaches a real token under a causal mask) is one call.
- ``flash_varlen``: transformers' ``flash_attention_2`` (the ``flash-attn`` package's varlen
  kernel, given the documents' boundaries from the position ids); GPU only.
- ``flex``: transformers' ``flex_attention`` with a document block mask (a compressed mask of
  128 x 128 blocks, compiled by ``torch.compile``).
- ``dense``: transformers' ``sdpa`` with its dense mask (the behaviour before this module; kept
  for comparison in ``benchmarks/train_throughput.py``).
- ``auto`` (the default): ``flash_varlen`` on a GPU where ``flash_attn`` imports, else
  ``documents``.

Nothing here imports Ray or DeepSpeed.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

DOCUMENTS = "palign_documents"
# train.attention -> the attn_implementation the model is loaded with
IMPLEMENTATIONS = {"documents": DOCUMENTS, "flash_varlen": "flash_attention_2",
                   "flex": "flex_attention", "dense": "sdpa"}


def implementation(attention: str, device: torch.device) -> str:
    """The transformers ``attn_implementation`` for ``train.attention`` on ``device``
    (registering palign's own first when it is the one)."""
    if attention == "auto":
        on_gpu = device.type == "cuda"
        attention = ("flash_varlen" if on_gpu and importlib.util.find_spec("flash_attn")
                     else "documents")
    if attention == "flash_varlen" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError("train.attention=flash_varlen needs the flash-attn package (GPU only); "
                         "use documents")
    name = IMPLEMENTATIONS[attention]
    if name == DOCUMENTS:
        register()
    return name


def register() -> None:
    """Make ``palign_documents`` an attention implementation transformers can load. It has no
    entry among transformers' mask functions, so the model builds no mask for it."""
    from transformers import AttentionInterface

    AttentionInterface.register(DOCUMENTS, document_attention)


class _Spans:
    """The documents' spans of the last position-id tensor seen (one entry: a forward's layers
    all see the same tensor, so the spans are computed, and the host synchronised, once)."""

    def __init__(self) -> None:
        self.key: torch.Tensor | None = None
        self.spans: list[list[tuple[int, int]]] = []

    def of(self, position_ids: torch.Tensor | None, batch: int,
           length: int) -> list[list[tuple[int, int]]]:
        if position_ids is None or self.key is not position_ids:
            self.key, self.spans = position_ids, document_spans(position_ids, batch, length)
        return self.spans


_SPANS = _Spans()


def document_spans(position_ids: torch.Tensor | None, batch: int,
                   length: int) -> list[list[tuple[int, int]]]:
    """Per row, the ``(start, end)`` of each document: a new one wherever the position id does
    not follow the previous one by exactly one."""
    if position_ids is None:
        return [[(0, length)]] * batch
    pos = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    breaks = (pos[:, 1:] - pos[:, :-1]) != 1
    rows: list[list[int]] = [[] for _ in range(batch)]
    for r, c in breaks.nonzero().tolist():  # one transfer to the host
        rows[r].append(c + 1)
    return [list(zip([0, *cuts], [*cuts, length])) for cuts in rows]


def document_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, attention_mask: torch.Tensor | None,
                       dropout: float = 0.0, scaling: float | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention within each document of each row. ``query`` is ``[batch, heads, S,
    dim]``, ``key`` and ``value`` ``[batch, kv_heads, S, dim]`` (grouped-query attention is
    left to SDPA); returns ``[batch, S, heads, dim]`` as transformers' attention functions do."""
    if attention_mask is not None:
        raise ValueError("palign_documents attention takes no mask (right-padded or packed "
                         "rows only)")
    if query.shape[2] != key.shape[2]:
        raise ValueError("palign_documents attention is for training (no KV cache)")
    batch, _, length, _ = query.shape
    gqa = key.shape[1] != query.shape[1]
    drop = dropout if module.training else 0.0

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True,
                                              scale=scaling, enable_gqa=gqa)

    spans = _SPANS.of(kwargs.get("position_ids"), batch, length)
    if all(len(row) == 1 for row in spans):
        out = attend(query, key, value)
    else:
        rows = []
        for b, row in enumerate(spans):
            q, k, v = query[b:b + 1], key[b:b + 1], value[b:b + 1]
            rows.append(torch.cat([attend(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e])
                                   for s, e in row], dim=2))
        out = torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None
