"""palign.train.data: loss masks from the chat template, packing, attention isolation, the loss."""

from __future__ import annotations

import math
import random
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from palign.data import procmem
from palign.engines.models import resolve_model
from palign.method.prompts import student_question
from palign.method.targets import training_target
from palign.train import attention
from palign.train.data import (
    IGNORE_INDEX,
    Example,
    Untrainable,
    build_example,
    collate_packs,
    example_from_row,
    pack,
    packing_efficiency,
    pad_batch,
    token_loss_sum,
)

LOSS_ATOL = 1e-5  # packed vs padded mean loss, fp32 (measured: 0 to 1.5e-6)
GRAD_RTOL = 1e-4  # packed vs padded gradient norm, relative (measured: <3e-8)
QUESTION = "What is the sum of the first 10 positive integers?"
TARGET = training_target("Pair 1 with 10, 2 with 9: five pairs.", "Each is 11, so \\boxed{55}.")


# ---------------------------------------------------------------- the real template (SmolLM2)


def supervised(ex: Example) -> list[int]:
    return [tok for tok, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX]


@pytest.mark.model
def test_labels_are_the_target_and_the_end_of_turn_token(tokenizer):
    ex = build_example(tokenizer, QUESTION, TARGET, max_len=1024, example_id="x")
    assert isinstance(ex, Example) and ex.span == "tokens"  # ChatML: the prompt is a token prefix
    # Supervised: the target and <|im_end|>; ChatML's "\n" after <|im_end|> is in the input but
    # not supervised (generation stops at <|im_end|>, the model never writes that newline).
    assert tokenizer.decode(supervised(ex)) == TARGET + "<|im_end|>"
    assert tokenizer.decode(ex.input_ids[-1:]) == "\n" and ex.labels[-1] == IGNORE_INDEX
    # The input is exactly the template's rendering, with no second BOS.
    chat = [
        {"role": "user", "content": student_question(QUESTION)},
        {"role": "assistant", "content": TARGET},
    ]
    assert tokenizer.decode(ex.input_ids) == tokenizer.apply_chat_template(chat, tokenize=False)
    # Nothing before the assistant turn (system, user, the assistant header) is supervised, and
    # the supervised tokens are one contiguous run.
    prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert all(label == IGNORE_INDEX for label in ex.labels[:n_prompt])
    where = [i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX]
    assert where == list(range(n_prompt, n_prompt + len(where)))
    assert "sum of the first" not in tokenizer.decode(supervised(ex))


@pytest.mark.model
def test_offsets_fallback_when_the_prompt_is_no_token_prefix():
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    # A template whose generation prompt ends in a space: " <" merges into one token in the full
    # rendering, so the prompt's tokens are not a prefix of it.
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    ex = build_example(tok, QUESTION, TARGET, max_len=1024)
    assert isinstance(ex, Example) and ex.span == "offsets"
    # The straddling token (space + "<") is supervised; no end marker in this template.
    assert tok.decode(supervised(ex)) == " " + TARGET


@pytest.mark.model
def test_overlong_rows_are_rejected_with_their_length_or_truncated(tokenizer):
    row = {"id": "long", "question": QUESTION, "target": TARGET + " more words" * 50}
    full = example_from_row(tokenizer, row, max_len=10_000)
    assert isinstance(full, Example) and len(full) > 100
    rejected = example_from_row(tokenizer, row, max_len=100)
    assert rejected == Untrainable("long", f"{len(full)} tokens > max_len 100")
    cut = example_from_row(tokenizer, row, max_len=100, overlong="truncate")
    assert isinstance(cut, Example) and cut.truncated and len(cut) == 100
    assert cut.input_ids == full.input_ids[:100] and cut.labels == full.labels[:100]
    # A prompt alone over max_len leaves nothing to learn: rejected even when truncating.
    nothing = build_example(tokenizer, QUESTION * 40, TARGET, 100, "truncate", example_id="q")
    assert isinstance(nothing, Untrainable) and "no supervised token" in nothing.reason
    assert re.match(r"^\d+ tokens > max_len 100", nothing.reason)


# ---------------------------------------------------------------- packing


def synthetic(lengths: list[int], seed: int = 0, vocab: int = 128) -> list[Example]:
    """Examples with a random 'prompt' third (unsupervised) and a supervised rest."""
    rng = random.Random(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = [rng.randrange(vocab) for _ in range(n)]
        cut = max(1, n // 3)
        out.append(Example(f"e{i}", ids, [IGNORE_INDEX] * cut + ids[cut:]))
    return out


def next_fit(lengths: list[int], seq_len: int) -> int:
    bins, room = 0, 0
    for n in lengths:
        if n > room:
            bins, room = bins + 1, seq_len
        room -= n
    return bins


@settings(max_examples=150, deadline=None)
@given(
    seq_len=st.integers(8, 256),
    fractions=st.lists(st.floats(0.0, 1.0), min_size=0, max_size=60),
)
def test_pack_properties(seq_len, fractions):
    lengths = [max(1, round(f * seq_len)) for f in fractions]
    examples = synthetic(lengths)
    packs = pack(examples, seq_len, pad_id=0)
    by_id = {ex.id: ex for ex in examples}
    assert sorted(i for p in packs for i in p.ids) == sorted(by_id)  # each exactly once
    for p in packs:
        assert len(p.input_ids) == len(p.labels) == len(p.position_ids) == seq_len
        assert p.n_real <= seq_len and p.seq_lens == [len(by_id[i]) for i in p.ids]
        at = 0
        for i in p.ids:  # contents in place, positions restart, first label masked
            ex = by_id[i]
            assert p.input_ids[at : at + len(ex)] == ex.input_ids
            assert p.position_ids[at : at + len(ex)] == list(range(len(ex)))
            assert p.labels[at : at + len(ex)] == [IGNORE_INDEX, *ex.labels[1:]]
            at += len(ex)
        assert p.position_ids[at:] == list(range(seq_len - at))  # padding: its own sequence
        assert set(p.labels[at:]) <= {IGNORE_INDEX}
    total = sum(lengths)
    assert len(packs) >= math.ceil(total / seq_len)
    # Any-fit guarantee: a new bin opens only when nothing fits, so at most one bin is half empty.
    assert sum(2 * p.n_real <= seq_len for p in packs) <= 1
    expected = total / (len(packs) * seq_len) if packs else 0.0
    assert packing_efficiency(packs) == pytest.approx(expected)


def test_best_fit_uses_no_more_bins_than_sequential_packing():
    for seed in range(5):
        rng = random.Random(seed)
        lengths = [rng.randint(1, 700) for _ in range(300)]
        packs = pack(synthetic(lengths), 1024)
        assert len(packs) <= next_fit(lengths, 1024)
        assert packing_efficiency(packs) == sum(lengths) / (len(packs) * 1024)


def test_pack_rejects_an_example_longer_than_seq_len():
    with pytest.raises(ValueError, match="9 tokens > seq_len 8"):
        pack(synthetic([9]), 8)


# ---------------------------------------------------------------- isolation and the loss

LENGTHS = [5, 17, 29, 38, 47, 60]  # six sequences, 196 tokens, into rows of 128


def tiny_model(attn: str, max_positions: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        attn_implementation=attn, initializer_range=0.2,
    )  # fmt: skip
    # initializer_range 0.2 (not 0.02): a model that depends on its context clearly enough for
    # the negative control (leaky attention) to move the mean loss by ~0.1
    return LlamaForCausalLM(config).float().eval()


def mean_loss_and_grad_norm(model, batches) -> tuple[float, float, int]:
    model.zero_grad()
    sums, counts = zip(*(token_loss_sum(model, b) for b in batches))
    loss = sum(sums) / sum(counts)
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
    return loss.item(), norm.item(), sum(counts)


@pytest.mark.model
@pytest.mark.parametrize("attn", ["sdpa", "eager", "documents"])
def test_packed_equals_padded_and_the_control_fails(attn):
    model = tiny_model(attention.implementation(attn, torch.device("cpu"))
                       if attn == "documents" else attn)
    examples = synthetic(LENGTHS, seed=1)
    packs = pack(examples, 128)
    assert len(packs) == 2 and sum(len(p.ids) > 1 for p in packs) == 2
    packed = collate_packs(packs)
    assert set(packed) == {"input_ids", "labels", "position_ids"}
    padded = pad_batch(examples, pad_id=0)
    loss_pk, norm_pk, n_pk = mean_loss_and_grad_norm(model, [packed])
    loss_pd, norm_pd, n_pd = mean_loss_and_grad_norm(model, [padded])
    assert n_pk == n_pd == sum(n - max(1, n // 3) for n in LENGTHS)
    assert abs(loss_pk - loss_pd) < LOSS_ATOL
    assert abs(norm_pk - norm_pd) <= GRAD_RTOL * norm_pd
    # Also in training mode (where config.use_cache=True would switch the isolation off).
    model.train()
    assert abs(mean_loss_and_grad_norm(model, [packed])[0] - loss_pd) < LOSS_ATOL
    model.eval()
    # Negative control: one running position range and no mask lets the sequences see each other.
    leaky = dict(packed, position_ids=torch.arange(128).expand(len(packs), -1))
    assert abs(mean_loss_and_grad_norm(model, [leaky])[0] - loss_pd) > 1e-2


LONG_BIN = 32768  # one packed row of 4 documents of 8192 tokens
# What the packed forward and backward may add to the process (measured: about 450 MiB, the
# activations, linear in the bin), below what transformers' dense mask alone would take.
MEMORY_CAP = 768 * 2**20


def _long_row_run(attn: str) -> tuple[float, float, int, float]:
    """In a fresh process: the mean loss and gradient norm of the long packed row (``documents``)
    or of its documents as a padded batch (``sdpa``), and the peak RSS the forward and backward
    added over the RSS before them."""
    name = attention.implementation(attn, torch.device("cpu")) if attn == "documents" else attn
    model = tiny_model(name, max_positions=LONG_BIN)
    examples = synthetic([LONG_BIN // 4] * 4, seed=5)
    for e in examples:  # a few supervised tokens per document: the attention is what is measured
        e.labels[:] = [IGNORE_INDEX] * (len(e) - 64) + e.labels[-64:]
    if attn == "documents":
        packs = pack(examples, LONG_BIN)
        assert len(packs) == 1 and len(packs[0].seq_lens) == 4
        batch = collate_packs(packs)
    else:
        batch = pad_batch(examples, pad_id=0)
    # The peak of this address space (VmHWM; getrusage's ru_maxrss would carry over the forking
    # parent's peak), reset to the current RSS first where the kernel allows it.
    procmem.reset_peak()
    before = procmem.rss_mib()
    loss, norm, n = mean_loss_and_grad_norm(model, [batch])
    return loss, norm, n, (procmem.peak_rss_mib() - before) * procmem.MIB


@pytest.mark.model
def test_documents_attention_equals_padded_at_a_bin_a_dense_mask_would_not_fit():
    import multiprocessing

    # transformers' dense mask for this row alone: LONG_BIN^2 booleans (1 GiB), over the cap
    assert LONG_BIN * LONG_BIN > MEMORY_CAP
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        loss_pk, norm_pk, n_pk, added = pool.apply(_long_row_run, ("documents",))
        loss_pd, norm_pd, n_pd, _ = pool.apply(_long_row_run, ("sdpa",))
    assert n_pk == n_pd == 4 * 64
    assert added < MEMORY_CAP, f"the packed row added {added / 2**20:.0f} MiB"
    assert abs(loss_pk - loss_pd) < LOSS_ATOL
    assert abs(norm_pk - norm_pd) <= GRAD_RTOL * norm_pd


@pytest.mark.model
def test_pack_boundary_never_supervises_across_sequences():
    # Fully supervised examples (label 0 set): packed, the last token of one sequence must not be
    # trained to predict the first token of the next.
    rng = random.Random(3)
    examples = []
    for i, n in enumerate([6, 9, 12]):
        ids = [rng.randrange(128) for _ in range(n)]
        examples.append(Example(f"s{i}", ids, list(ids)))
    packed = collate_packs(pack(examples, 32))
    starts = (packed["position_ids"] == 0).nonzero()[:, 1]
    assert (packed["labels"][0, starts] == IGNORE_INDEX).all()
    model = tiny_model("sdpa")
    with torch.no_grad():
        loss_pk, n_pk = token_loss_sum(model, packed)
        loss_pd, n_pd = token_loss_sum(model, pad_batch(examples, pad_id=0))
    assert n_pk == n_pd == 6 + 9 + 12 - 3
    assert abs(loss_pk.item() / n_pk - loss_pd.item() / n_pd) < LOSS_ATOL


def sparse_labels(batch: dict, keep: int, seed: int = 0) -> dict:
    """The batch with all but ``keep`` of its supervised labels masked (-100)."""
    labels = batch["labels"].clone()
    supervised = (labels != IGNORE_INDEX).flatten().nonzero().flatten()
    drop = supervised[torch.randperm(len(supervised), generator=torch.Generator().manual_seed(
        seed))[keep:]]
    labels.view(-1)[drop] = IGNORE_INDEX
    return dict(batch, labels=labels)


@pytest.mark.model
@pytest.mark.parametrize("kind", ["packed", "padded", "sparse"])
def test_chunked_loss_equals_the_plain_one(kind):
    model = tiny_model("sdpa")
    examples = synthetic(LENGTHS, seed=2)
    batch = collate_packs(pack(examples, 128)) if kind == "packed" else pad_batch(examples, 0)
    if kind == "sparse":  # 3 supervised tokens in 2 x 127 positions: most chunks are empty
        batch = sparse_labels(collate_packs(pack(examples, 128)), keep=3)
    grads = {}
    for chunk in (None, 7, (7, 4096)):  # None: plain model(**batch).logits; (size, positions)
        model.zero_grad()
        size, positions = chunk if isinstance(chunk, tuple) else (chunk, None)
        loss_sum, n = token_loss_sum(model, batch, chunk_size=size, positions=positions)
        (loss_sum / n).backward()
        grads[chunk] = (loss_sum.item() / n, [p.grad.clone() for p in model.parameters()])
    assert n == (3 if kind == "sparse" else sum(n - max(1, n // 3) for n in LENGTHS))
    for chunk in (7, (7, 4096)):
        assert abs(grads[None][0] - grads[chunk][0]) < LOSS_ATOL
        for plain, chunked in zip(grads[None][1], grads[chunk][1]):
            torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-5)


def count_head_calls(model, batch, chunk_size, positions=None) -> tuple[list[int], list[int]]:
    """Rows of every LM-head call in the forward pass and in the backward recomputation."""
    calls: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        model.zero_grad()
        loss_sum, _ = token_loss_sum(model, batch, chunk_size, positions)
        forward = list(calls)
        calls.clear()
        loss_sum.backward()
    finally:
        hook.remove()
    return forward, calls


@pytest.mark.model
def test_head_calls_do_not_depend_on_the_labels():
    # Under ZeRO-3 every head call is a collective: ranks with different supervised counts must
    # still call it equally often, in the forward pass and in the backward recomputation.
    model = tiny_model("sdpa")
    full = collate_packs(pack(synthetic(LENGTHS, seed=2), 128))  # 2 x 128, 128 supervised
    n_full = int((full["labels"] != IGNORE_INDEX).sum())
    expected = math.ceil(2 * 127 / 16)
    counts = {}
    for keep in (n_full, 1, 0):
        fwd, bwd = count_head_calls(model, sparse_labels(full, keep), chunk_size=16)
        assert len(fwd) == len(bwd) == expected, (keep, fwd, bwd)
        assert sum(fwd) == sum(bwd) == keep and max(fwd) <= 16
        counts[keep] = len(fwd)
    assert n_full > 100 and len(set(counts.values())) == 1
    # Right-padded batches of different widths: a shared ``positions`` fixes the count.
    narrow = pad_batch(synthetic([5, 9], seed=4), 0)
    wide = pad_batch(synthetic([60, 47], seed=4), 0)
    assert narrow["labels"].shape != wide["labels"].shape
    for batch in (narrow, wide):
        fwd, bwd = count_head_calls(model, batch, chunk_size=16, positions=2 * 128)
        assert len(fwd) == len(bwd) == 2 * 128 // 16 and max(fwd) <= 16
    with pytest.raises(ValueError, match="positions"):
        token_loss_sum(model, wide, 16, positions=10)


@pytest.mark.model
def test_nothing_supervised_gives_zero_loss_with_a_graph():
    model = tiny_model("sdpa")
    ex = Example("none", [1, 2, 3, 4], [IGNORE_INDEX] * 4)
    loss_sum, n = token_loss_sum(model, collate_packs(pack([ex], 8)))
    assert n == 0 and loss_sum.item() == 0.0
    loss_sum.backward()  # does not raise
