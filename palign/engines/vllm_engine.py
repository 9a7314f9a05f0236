"""The vLLM backend: paged KV cache, prefix caching, tensor parallel; GPU or vLLM's CPU build.

Prompts are rendered and tokenised here exactly as in the transformers backend and handed to
vLLM as token ids, so both backends see identical inputs.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
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
    fit_prompt,
    fit_prompts,
    label_first_tokens,
    new_token_budget,
    prompt_token_ids,
)
from palign.engines.dtypes import torch_dtype

logger = logging.getLogger(__name__)

_GIB = 1 << 30


def cpu_id_list(cpus: set[int]) -> str:
    """``{0, 1, 2, 5}`` -> ``"0-2,5"``, the form VLLM_CPU_OMP_THREADS_BIND takes."""
    ordered = sorted(cpus)
    parts: list[str] = []
    start = prev = ordered[0]
    for cpu in ordered[1:] + [None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(parts)


def prepare_cpu_environment(spec: EngineSpec) -> None:
    """Settings vLLM's CPU build reads from the environment; values already set are kept.

    Must run before vLLM is imported (it reads several of them at import time).
    """
    from palign.engines.models import default_cache_dir

    cache = default_cache_dir()
    cpus = os.sched_getaffinity(0)
    defaults = {
        # In-process engine: starts in seconds instead of ~40 s, no shared-memory leftovers,
        # and its threads count against the Ray actor that owns it.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        # Only read by the multiprocess executor (in-process, the thread count below decides);
        # its default "auto" leaves one core to the scheduler process.
        "VLLM_CPU_OMP_THREADS_BIND": cpu_id_list(cpus),
    }
    if os.path.isdir(spec.model):
        defaults["HF_HUB_OFFLINE"] = "1"
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    # In-process, vLLM runs on torch's intra-op pool: size it to every core this process may
    # use. An OMP_NUM_THREADS already set (Ray sets it to an actor's CPUs) wins; when unset,
    # vLLM would try to cut torch to one thread "for serving".
    threads = int(os.environ.setdefault("OMP_NUM_THREADS", str(len(cpus))))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class VLLMEngine(BackendBase):
    """A :class:`~palign.engines.base.Backend` on ``vllm.LLM`` (offline, synchronous), driven
    in steps: requests join the running batch as they arrive (``open_request``)."""

    name = "vllm"
    drive = "steps"

    def __init__(self, spec: EngineSpec) -> None:
        started = time.monotonic()
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            prepare_cpu_environment(spec)
        from transformers import AutoTokenizer
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        self.on_cpu = on_cpu
        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model)
        dtype = torch_dtype(spec.dtype, on_gpu=not on_cpu)
        enforce_eager = spec.enforce_eager if spec.enforce_eager is not None else on_cpu
        kwargs: dict[str, Any] = dict(
            model=spec.model,
            tokenizer=spec.model,
            dtype=str(dtype).removeprefix("torch."),
            max_model_len=spec.max_model_len,
            tensor_parallel_size=spec.tensor_parallel_size,
            enable_prefix_caching=spec.enable_prefix_caching,
            enforce_eager=enforce_eager,
            seed=spec.seed,
            max_num_seqs=spec.max_num_seqs,
            # Label scores read the unprocessed distribution (before temperature, penalties or
            # allowed_token_ids masks): the model's own log-probabilities.
            logprobs_mode="raw_logprobs",
            # Caps top-k `logprobs=` requests only; score_labels asks for its ids by
            # logprob_token_ids, which is bounded by vLLM's own limit (128 ids) instead.
            max_logprobs=20,
            use_tqdm_on_load=False,  # a progress bar per actor start says nothing to a reader
        )
        if spec.executor_backend:  # tensor parallel: rank actors in the replica's placement group
            kwargs["distributed_executor_backend"] = spec.executor_backend
        if on_cpu:
            # The engine argument takes fractions of a GiB; vLLM's legacy whole-GiB variable
            # VLLM_CPU_KVCACHE_SPACE still overrides it where a user has set one.
            kwargs["kv_cache_memory_bytes"] = int(spec.cpu_kv_cache_gib * _GIB)
        else:
            kwargs["gpu_memory_utilization"] = spec.gpu_memory_utilization
        # engine.engine_kwargs: checked by name before any work, and never one set above
        # (palign.engines.engine_args.RESERVED).
        kwargs.update(spec.engine_kwargs)
        self.llm: Any = None
        self._start(kwargs)
        self._request_ids = itertools.count()
        self._open: dict[str, tuple[str, Any, Any]] = {}  # request id -> (kind, arg, result)
        self._label_ids: dict[tuple[str, ...], list[int]] = {}
        self.start_seconds = time.monotonic() - started
        logger.info(
            "vllm engine: %s on %s (%s, eager=%s, threads=%d) in %.1f s",
            spec.model,
            "cpu" if on_cpu else "gpu",
            kwargs["dtype"],
            enforce_eager,
            torch.get_num_threads(),
            self.start_seconds,
        )

    def _start(self, kwargs: dict[str, Any]) -> None:
        from vllm import LLM

        self.llm = LLM(**kwargs)

    def _run(self, fitting: list[tuple[int, list[int]]], params: list[Any]) -> list[Any]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids) for _, ids in fitting]
        return self.llm.generate(prompts, params, use_tqdm=False)

    def generate(self, chats: list[Chat], sampling: Sampling) -> list[Completion]:
        if self.on_cpu and sampling.seed is not None:
            torch.manual_seed(sampling.seed)  # the in-process engine samples from this RNG
        results = [Completion() for _ in chats]
        fitting = fit_prompts(self.tokenizer, chats, sampling.max_tokens,
                              self.spec.max_model_len, results, self.spec.chat_template_kwargs)
        if not fitting:
            return results
        params = [self._sampling_params(sampling, i, len(ids)) for i, ids in fitting]
        for (i, _), out in zip(fitting, self._run(fitting, params)):
            _fill_completion(results[i], out)
        return results

    def _sampling_params(self, sampling: Sampling, index: int, prompt_tokens: int) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
            repetition_penalty=sampling.repetition_penalty,
            # max_tokens None: what the prompt leaves of the context
            max_tokens=new_token_budget(sampling, prompt_tokens, self.spec.max_model_len),
            # One seed per row: the call is reproducible, yet duplicated prompts (pass@k)
            # still draw different samples. Not on CPU: there, a seeded request whose
            # prefill is split across steps crashes vLLM 0.32 ("CPU Generator does not use
            # offset"), so sampling follows the engine's own seed (spec.seed) instead.
            seed=None if sampling.seed is None or self.on_cpu else sampling.seed + index,
        )

    def _score_params(self, labels: tuple[str, ...]) -> tuple[Any, list[int]]:
        from vllm import SamplingParams

        firsts = self._label_ids.get(labels)
        if firsts is None:
            firsts = self._label_ids[labels] = label_first_tokens(self.tokenizer, list(labels))
        params = SamplingParams(
            temperature=0.0, max_tokens=1, logprob_token_ids=firsts, detokenize=False
        )
        return params, firsts

    def score_labels(self, chats: list[Chat], labels: list[str]) -> list[LabelScores]:
        """Each label's first-token log-probability, from one engine step per prompt.

        ``logprob_token_ids`` makes vLLM gather exactly these ids from the full-vocabulary
        log-softmax (``raw_logprobs`` mode: before any temperature, penalty or mask), so every
        label's exact value comes back whatever its rank; a top-k ``logprobs=`` request would
        miss labels outside the top k, and ``allowed_token_ids`` only masks what is sampled.
        """
        results = [LabelScores() for _ in chats]
        fitting = fit_prompts(self.tokenizer, chats, 1, self.spec.max_model_len, results,
                              self.spec.chat_template_kwargs)
        if not fitting:
            return results
        params, firsts = self._score_params(tuple(labels))
        for (i, _), out in zip(fitting, self._run(fitting, [params] * len(fitting))):
            _fill_scores(results[i], out, labels, firsts)
        return results

    # -- continuous batching: palign.engines.server drives these from one thread ----------

    def open_request(self, kind: str, chat: Chat, arg: Any, index: int = 0
                     ) -> tuple[Completion | LabelScores, str | None]:
        """Queue one request in the running engine. Returns its result object and request id;
        the id is None when the row cannot be served (its ``error`` says why)."""
        result, prompt, params = self._prepare(kind, chat, arg, index)
        if prompt is None:
            return result, None
        render = getattr(self.llm, "_preprocess_cmpl_one", None)  # what LLM.generate does
        if callable(render):
            prompt = render(prompt)
        # Outputs carry the id given here (vLLM makes its own internal one unique).
        request_id = str(next(self._request_ids))
        self.llm.llm_engine.add_request(request_id, prompt, params)
        self._open[request_id] = (kind, arg, result)
        return result, request_id

    def _prepare(self, kind: str, chat: Chat, arg: Any, index: int) -> tuple[Any, Any, Any]:
        """(result, prompt, params) of one request; prompt None: refused (result.error set)."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        result: Completion | LabelScores
        if kind == "score":
            result = LabelScores()
            params, _ = self._score_params(arg)
            new_tokens = 1
        else:
            result = Completion()
            new_tokens = arg.max_tokens
        ids = fit_prompt(self.tokenizer, chat, new_tokens, self.spec.max_model_len, result,
                         self.spec.chat_template_kwargs)
        if ids is None:
            return result, None, None
        if kind != "score":
            params = self._sampling_params(arg, index, len(ids))
        params.output_kind = RequestOutputKind.FINAL_ONLY  # one output, when it is done
        return result, TokensPrompt(prompt_token_ids=ids), params

    def _fill(self, kind: str, arg: Any, result: Any, out: Any) -> None:
        if kind == "score":
            _fill_scores(result, out, list(arg), self._label_ids[arg])
        else:
            _fill_completion(result, out)

    def _vllm_config(self) -> Any:
        return self.llm.llm_engine.vllm_config

    def count_tokens(self, chat: Chat) -> int:
        """The prompt tokens ``chat`` would take (as ``open_request`` renders it)."""
        return len(prompt_token_ids(self.tokenizer, chat, self.spec.chat_template_kwargs))

    def kv_cache_tokens(self) -> int | None:
        """Tokens the engine's KV cache holds (blocks x block size), as vLLM sized it."""
        cache = self._vllm_config().cache_config
        blocks = getattr(cache, "num_gpu_blocks", None)
        return int(blocks) * int(cache.block_size) if blocks else None

    def step_requests(self) -> list[tuple[str, Completion | LabelScores]]:
        """One engine step; the requests it finished, with their results filled in."""
        done: list[tuple[str, Completion | LabelScores]] = []
        for out in self.llm.llm_engine.step():
            if not out.finished:
                continue
            kind, arg, result = self._open.pop(out.request_id)
            self._fill(kind, arg, result, out)
            done.append((out.request_id, result))
        return done

    def close(self) -> None:
        self._open.clear()
        llm, self.llm = self.llm, None
        if llm is not None:
            engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            shutdown = getattr(engine_core, "shutdown", None)
            if callable(shutdown):
                shutdown()
            del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class AsyncVLLMEngine(VLLMEngine):
    """The vLLM backend on ``AsyncLLM`` (``engine.vllm_driver: async_llm``): requests are
    coroutines (``serve``) on the engine server's event loop. vLLM always runs this engine's
    core in a child process; the default driver (``step``) runs it in process instead."""

    drive = "coroutines"

    def _start(self, kwargs: dict[str, Any]) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.aengine: Any = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

    def _vllm_config(self) -> Any:
        return self.aengine.vllm_config

    async def serve(self, kind: str, chat: Chat, arg: Any, index: int = 0
                    ) -> Completion | LabelScores:
        """One request, awaited until vLLM finishes it."""
        result, prompt, params = self._prepare(kind, chat, arg, index)
        if prompt is None:
            return result
        final = None
        async for out in self.aengine.generate(prompt, params, str(next(self._request_ids))):
            final = out
        if final is None or not final.finished:
            raise RuntimeError("vLLM's AsyncLLM ended a request without a final output")
        self._fill(kind, arg, result, final)
        return result

    def generate(self, chats: list[Chat], sampling: Sampling) -> list[Completion]:
        raise RuntimeError("the async_llm driver serves through palign.engines.server only")

    score_labels = generate  # type: ignore[assignment]

    def close(self) -> None:
        engine, self.aengine = getattr(self, "aengine", None), None
        if engine is not None:
            engine.shutdown()
        gc.collect()


def _fill_completion(row: Completion, out: Any) -> None:
    best = out.outputs[0]
    row.text = best.text
    row.completion_tokens = len(best.token_ids)
    row.finish_reason = best.finish_reason or ""
    row.cached_tokens = out.num_cached_tokens or 0


def _fill_scores(row: LabelScores, out: Any, labels: list[str], firsts: list[int]) -> None:
    step = out.outputs[0].logprobs[0]  # token id -> Logprob at the first answer slot
    missing = [label for label, t in zip(labels, firsts) if t not in step]
    if missing:
        raise RuntimeError(f"vLLM returned no log-probability for labels {missing}")
    row.logprobs = {label: step[t].logprob for label, t in zip(labels, firsts)}
    row.cached_tokens = out.num_cached_tokens or 0
