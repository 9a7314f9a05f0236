"""The transformers backend: plain PyTorch, CPU or one GPU.

Slower than vLLM (no paged KV cache, no prefix cache) but with no extra dependency; it feeds
the model the same token ids as the vLLM backend, so greedy texts and label scores agree.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from palign.engines.base import (
    BackendBase,
    Chat,
    Completion,
    EngineSpec,
    LabelScores,
    Sampling,
    fit_prompts,
    label_first_tokens,
    new_token_budget,
    prompt_token_ids,
)
from palign.engines.dtypes import torch_dtype

logger = logging.getLogger(__name__)

class TransformersEngine(BackendBase):
    """A :class:`~palign.engines.base.Backend` on ``AutoModelForCausalLM``, driven in batches
    (no paged KV cache to share out)."""

    name = "transformers"

    def __init__(self, spec: EngineSpec) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per actor start says nothing to a reader
        started = time.monotonic()
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch_dtype(spec.dtype, self.device.type == "cuda")
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model)
        model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        # Stop on every end token the model declares, as vLLM does (tokenizer's and
        # generation_config's), and drop the checkpoint's sampling defaults (top_k, min_p, ...):
        # only what a Sampling says may shape the output.
        eos = {self.tokenizer.eos_token_id}
        declared = self.model.generation_config.eos_token_id
        eos.update(declared if isinstance(declared, list) else [declared])
        self.eos_ids = sorted(int(t) for t in eos if t is not None)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]
        self.model.generation_config = GenerationConfig(
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id
        )
        torch.manual_seed(spec.seed)
        logger.info(
            "transformers engine: %s on %s (%s) in %.1f s",
            spec.model,
            self.device,
            self.dtype,
            time.monotonic() - started,
        )

    # -- generation ---------------------------------------------------------------------

    def generate(self, chats: list[Chat], sampling: Sampling) -> list[Completion]:
        results = [Completion() for _ in chats]
        rows = fit_prompts(self.tokenizer, chats, sampling.max_tokens, self.spec.max_model_len,
                           results, self.spec.chat_template_kwargs)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)  # the same call then draws the same samples
        for chunk in self._chunks(rows):
            # each row's own budget (up to the context: what its prompt leaves); the chunk runs
            # to the largest, and each row is cut to its own
            budgets = [new_token_budget(sampling, len(ids), self.spec.max_model_len)
                       for _, ids in chunk]
            config = self._generation_config(sampling, max(budgets))
            new_tokens = self._generate_chunk([ids for _, ids in chunk], config)
            for (i, _), tokens, budget in zip(chunk, new_tokens, budgets):
                self._fill(results[i], tokens[:budget], budget)
        return results

    def _generation_config(self, sampling: Sampling, max_new_tokens: int) -> Any:
        from transformers import GenerationConfig

        sample = sampling.temperature > 0
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=sampling.temperature if sample else 1.0,
            top_p=sampling.top_p if sample else 1.0,
            top_k=0 if sample else None,  # transformers samples top-50 by default, vLLM all
            repetition_penalty=sampling.repetition_penalty,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
        )

    @torch.inference_mode()
    def _generate_chunk(self, prompts: list[list[int]], config: Any) -> list[list[int]]:
        input_ids, mask = self._left_pad(prompts)
        out = self.model.generate(
            input_ids=input_ids, attention_mask=mask, generation_config=config
        )
        return out[:, input_ids.shape[1] :].tolist()

    def _fill(self, result: Completion, tokens: list[int], budget: int) -> None:
        # A finished row is padded to the batch's length; its own tokens end at the first
        # end token (kept in the count, as vLLM counts it) or pad.
        ends = set(self.eos_ids) | {self.pad_id}
        cut = next((k for k, t in enumerate(tokens) if t in ends), None)
        hit_eos = cut is not None and tokens[cut] in self.eos_ids
        own = tokens[:cut] if cut is not None else tokens
        if hit_eos:
            result.completion_tokens = len(own) + 1
            result.finish_reason = "stop"
        else:
            result.completion_tokens = len(own)
            result.finish_reason = "length" if len(own) >= budget else "stop"
        result.text = self.tokenizer.decode(own, skip_special_tokens=True)

    # -- label scores -------------------------------------------------------------------

    def score_labels(self, chats: list[Chat], labels: list[str]) -> list[LabelScores]:
        firsts = label_first_tokens(self.tokenizer, labels)
        results = [LabelScores() for _ in chats]
        rows = fit_prompts(self.tokenizer, chats, 1, self.spec.max_model_len, results,
                           self.spec.chat_template_kwargs)
        index = torch.tensor(firsts, device=self.device)
        for chunk in self._chunks(rows):
            logprobs = self._last_logprobs([ids for _, ids in chunk])[:, index].tolist()
            for (i, _), values in zip(chunk, logprobs):
                results[i].logprobs = dict(zip(labels, values))
        return results

    @torch.inference_mode()
    def _last_logprobs(self, prompts: list[list[int]]) -> torch.Tensor:
        input_ids, mask = self._left_pad(prompts)
        # Left padding shifts positions, which generate() corrects itself; a bare forward
        # pass needs them given.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1
        )
        return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)

    # -- shared -------------------------------------------------------------------------

    def count_tokens(self, chat: Chat) -> int:
        """The prompt tokens ``chat`` takes, rendered as ``generate`` renders it."""
        return len(prompt_token_ids(self.tokenizer, chat, self.spec.chat_template_kwargs))

    def _chunks(self, rows: list[tuple[int, list[int]]]) -> list[list[tuple[int, list[int]]]]:
        # Similar lengths together waste less padding.
        ordered = sorted(rows, key=lambda row: len(row[1]), reverse=True)
        size = max(1, self.spec.max_num_seqs)
        return [ordered[k : k + size] for k in range(0, len(ordered), size)]

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def close(self) -> None:
        import gc

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
