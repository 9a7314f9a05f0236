"""Pipeline metrics for Prometheus/Grafana, through Ray's metrics agent (``ray.util.metrics``).

Every function here is a no-op unless Ray is initialised in this process (the driver after
``ray.init``, any Ray actor or task), so pure unit tests and ``torchrun`` training record nothing
and never import Ray. A metric that fails to record logs one warning per process and is dropped:
telemetry never raises into the pipeline. The metric objects are made once per process, on first
use.

What to call, and where (``stage`` is the stage name; it becomes the ``stage`` label):

- ``rows(stage, rows_in=, rows_out=, rejected=)``  rows through a stage
- ``judge_probes(stage, n)``                       truncate: judge verdicts asked for
- ``prefix_ratios(stage, values)``                 truncate: each row's kept share of its CoT
- ``engine_tokens(stage, tokens, seconds)``        tokens an engine call processed, and its time
- ``engine_requests(stage, in_flight, prompt_tokens, cached_tokens)``  an actor's engine:
  requests in flight now, prompt tokens answered and how many came from its prefix cache
- ``prefill_ratios(stage, values)``                truncate: each row's computed judge prompt
  tokens over its longest judge prompt
- ``train_step(loss, tokens_per_s)``               train, rank 0, per reported step
- ``stage_batch(stage, rows_in, rows_out, rejected, seconds, tokens, probes, ratios)``  all of
  the above that apply, for one actor batch
- ``EngineReport(stage, engine)()``                an actor's engine after a batch: records
  ``engine_requests`` and returns the tallies the driver adds to the stage's summary

Exported names, measured with Ray 2.60 (its default OpenTelemetry exporter; see
``tests/integration/test_telemetry.py``): Ray prefixes ``ray_``, counters get ``_total`` and
histograms ``_bucket`` (label ``le``), ``_sum`` and ``_count``; gauges keep their name::

    ray_palign_rows_in_total{stage}            counter
    ray_palign_rows_out_total{stage}           counter
    ray_palign_rows_rejected_total{stage}      counter
    ray_palign_judge_probes_total{stage}       counter
    ray_palign_prefix_ratio_bucket{stage,le}   histogram (also _sum, _count), le 0.1 .. 1.0
    ray_palign_engine_tokens_total{stage}      counter (rate() of it: tokens/s of the pool)
    ray_palign_engine_tokens_per_s{stage}      gauge, per actor (the last batch's rate)
    ray_palign_engine_requests_in_flight{stage}  gauge, per actor
    ray_palign_engine_prompt_tokens_total{stage}  counter
    ray_palign_engine_cached_tokens_total{stage}  counter (over the above: prefix-cache hit share)
    ray_palign_prefill_ratio_bucket{stage,le}  histogram (also _sum, _count), le 1 .. 8
    ray_palign_train_loss{stage="train"}       gauge
    ray_palign_train_tokens_per_s{stage="train"}  gauge

Besides ``stage`` every series carries Ray's labels ``Component``, ``NodeAddress``,
``SessionName``, ``Version``, ``WorkerId`` (one series per process: sum over them) and
``otel_scope_*``. Values reach the metrics endpoint (``ray.init(_metrics_export_port=...)``, or
each node's ``metrics_export_port``) within about 10-15 s; an actor that exits before its
next report may lose its last increments.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec

log = logging.getLogger(__name__)

PREFIX = "palign_"  # our names; Ray adds "ray_" on export
TRAIN_STAGE = "train"
PREFIX_RATIO_BOUNDARIES = [round(0.1 * i, 1) for i in range(1, 11)]  # 0.1 .. 1.0
PREFILL_RATIO_BOUNDARIES = [1.0, 1.1, 1.3, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0]
ENV_DISABLE = "PALIGN_METRICS"  # "0": record nothing even under Ray

# Every Prometheus series name the metrics above export (what the Grafana dashboard may use).
EXPORTED_NAMES = (
    "ray_palign_rows_in_total",
    "ray_palign_rows_out_total",
    "ray_palign_rows_rejected_total",
    "ray_palign_judge_probes_total",
    "ray_palign_prefix_ratio_bucket",
    "ray_palign_prefix_ratio_sum",
    "ray_palign_prefix_ratio_count",
    "ray_palign_engine_tokens_total",
    "ray_palign_engine_tokens_per_s",
    "ray_palign_engine_requests_in_flight",
    "ray_palign_engine_prompt_tokens_total",
    "ray_palign_engine_cached_tokens_total",
    "ray_palign_prefill_ratio_bucket",
    "ray_palign_prefill_ratio_sum",
    "ray_palign_prefill_ratio_count",
    "ray_palign_train_loss",
    "ray_palign_train_tokens_per_s",
)

@dataclass
class _Metrics:
    rows_in: Any
    rows_out: Any
    rows_rejected: Any
    judge_probes: Any
    prefix_ratio: Any
    engine_tokens: Any
    engine_tokens_per_s: Any
    requests_in_flight: Any
    prompt_tokens: Any
    cached_tokens: Any
    prefill_ratio: Any
    train_loss: Any
    train_tokens_per_s: Any


_metrics: _Metrics | None = None
_lock = threading.Lock()
_warned = False

P = ParamSpec("P")


def enabled() -> bool:
    """True when this process is connected to Ray (and ``PALIGN_METRICS`` is not ``0``).

    Looks Ray up in ``sys.modules`` rather than importing it: a process that never imported Ray
    cannot be connected, and importing it would cost torchrun workers a second."""
    if os.environ.get(ENV_DISABLE) == "0":
        return False
    ray = sys.modules.get("ray")
    is_initialized = getattr(ray, "is_initialized", None)
    return bool(is_initialized and is_initialized())


def _build() -> _Metrics:
    from ray.util.metrics import Counter, Gauge, Histogram

    tags = ("stage",)

    def counter(name: str, doc: str) -> Any:
        return Counter(PREFIX + name, doc, tag_keys=tags)

    def gauge(name: str, doc: str) -> Any:
        return Gauge(PREFIX + name, doc, tag_keys=tags)

    return _Metrics(
        rows_in=counter("rows_in", "Rows a stage received"),
        rows_out=counter("rows_out", "Rows a stage finished"),
        rows_rejected=counter("rows_rejected", "Rows a stage sent to rejects"),
        judge_probes=counter("judge_probes", "Judge verdicts asked for (truncate)"),
        prefix_ratio=Histogram(PREFIX + "prefix_ratio", "Share of each CoT kept as prefix",
                               boundaries=PREFIX_RATIO_BOUNDARIES, tag_keys=tags),
        engine_tokens=counter("engine_tokens", "Tokens engines processed"),
        engine_tokens_per_s=gauge("engine_tokens_per_s", "Engine tokens/s of the last batch"),
        requests_in_flight=gauge("engine_requests_in_flight", "Requests an actor's engine holds"),
        prompt_tokens=counter("engine_prompt_tokens", "Prompt tokens engines answered"),
        cached_tokens=counter("engine_cached_tokens",
                              "Prompt tokens served from engines' prefix caches"),
        prefill_ratio=Histogram(PREFIX + "prefill_ratio",
                                "Judge prompt tokens computed per row over its longest prompt",
                                boundaries=PREFILL_RATIO_BOUNDARIES, tag_keys=tags),
        train_loss=gauge("train_loss", "Training loss of the last reported step"),
        train_tokens_per_s=gauge("train_tokens_per_s", "Training tokens/s, all workers"),
    )


def _get() -> _Metrics | None:
    global _metrics
    if not enabled():
        return None
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = _build()
    return _metrics


def _safe(fn: Callable[Concatenate[_Metrics, P], None]) -> Callable[P, None]:
    """Run ``fn`` with the metrics only under Ray, and never let it raise: warn once per process
    instead."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        global _warned
        try:
            metrics = _get()
            if metrics is not None:
                fn(metrics, *args, **kwargs)
        except Exception:  # noqa: BLE001 - telemetry must never fail a stage
            if not _warned:
                _warned = True
                log.warning("palign telemetry: recording %s failed; metrics may be missing "
                            "(further failures are not logged)", fn.__name__, exc_info=True)

    return wrapper


def _inc(counter: Any, value: float, stage: str) -> None:
    if value > 0:  # Ray's Counter.inc rejects 0 and negative values
        counter.inc(float(value), tags={"stage": stage})


@_safe
def rows(m: _Metrics, stage: str, rows_in: int = 0, rows_out: int = 0,
         rejected: int = 0) -> None:
    """Count rows a stage received, finished, and rejected."""
    _inc(m.rows_in, rows_in, stage)
    _inc(m.rows_out, rows_out, stage)
    _inc(m.rows_rejected, rejected, stage)


@_safe
def judge_probes(m: _Metrics, stage: str, n: int) -> None:
    """Count judge verdicts (probes) asked for."""
    _inc(m.judge_probes, n, stage)


@_safe
def prefix_ratios(m: _Metrics, stage: str, values: Iterable[float]) -> None:
    """Observe each row's prefix ratio (share of the CoT kept), 0..1."""
    for value in values:
        if value is not None and math.isfinite(value):
            m.prefix_ratio.observe(float(value), tags={"stage": stage})


@_safe
def engine_tokens(m: _Metrics, stage: str, tokens: int, seconds: float) -> None:
    """Count ``tokens`` an engine processed in ``seconds``, and set its tokens/s gauge."""
    _inc(m.engine_tokens, tokens, stage)
    if seconds > 0 and tokens > 0:
        m.engine_tokens_per_s.set(tokens / seconds, tags={"stage": stage})


@_safe
def engine_requests(m: _Metrics, stage: str, in_flight: int, prompt_tokens: int,
                    cached_tokens: int) -> None:
    """An actor's engine: its requests in flight now, and prompt tokens answered since the
    last call, with how many of them its prefix cache served."""
    m.requests_in_flight.set(float(in_flight), tags={"stage": stage})
    _inc(m.prompt_tokens, prompt_tokens, stage)
    _inc(m.cached_tokens, cached_tokens, stage)


@_safe
def prefill_ratios(m: _Metrics, stage: str, values: Iterable[float | None]) -> None:
    """Observe each truncated row's judge prefill ratio (1.0: every probe after the first was
    served from the prefix cache up to where it grew)."""
    for value in values:
        if value is not None and math.isfinite(value):
            m.prefill_ratio.observe(float(value), tags={"stage": stage})


@_safe
def train_step(m: _Metrics, loss: float | None, tokens_per_s: float | None) -> None:
    """The loss and tokens/s of a reported training step (call on rank 0 only)."""
    tags = {"stage": TRAIN_STAGE}
    if loss is not None and math.isfinite(loss):
        m.train_loss.set(float(loss), tags=tags)
    if tokens_per_s is not None and math.isfinite(tokens_per_s):
        m.train_tokens_per_s.set(float(tokens_per_s), tags=tags)


@_safe
def stage_batch(m: _Metrics, stage: str, rows_in: int, rows_out: int, rejected: int,
                seconds: float, tokens: int = 0, probes: int = 0,
                ratios: Iterable[float] = (), prefill: Iterable[float] = ()) -> None:
    """Everything one actor batch says: rows in, out and rejected, the engine tokens its
    finished records account for (in ``seconds``), and any judge probes and prefix ratios.
    What a stage's records hold is its own definition's business
    (``palign.stages.base.Stage.metrics``)."""
    rows(stage, rows_in=rows_in, rows_out=rows_out, rejected=rejected)
    if probes:
        judge_probes(stage, probes)
    ratios = list(ratios)
    if ratios:
        prefix_ratios(stage, ratios)
    if tokens:
        engine_tokens(stage, tokens, seconds)
    prefill = list(prefill)
    if prefill:
        prefill_ratios(stage, prefill)


# An engine's counters that add up over its reports (EngineServer.stats: tokens; a remote
# backend's counters: HTTP requests and retries); the summary sums them over the replicas.
ADDITIVE = ("prompt_tokens", "cached_tokens", "completion_tokens", "requests", "retries")


class EngineReport:
    """An actor's engine after each batch: its prompt and cached tokens since the last report
    (batches in flight share one engine: each token is reported once) and its requests in
    flight (the most since the last report, and the most ever); recorded as metrics and
    returned to the driver for the stage's summary. ``engine`` None: an actor without one
    reports zeros."""

    def __init__(self, stage: str, engine: Any) -> None:
        self.stage = stage
        self.engine = engine
        # additive counters: completion tokens, and a remote engine's HTTP requests and retries
        self._reported = {key: 0 for key in ADDITIVE}
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, list[int]]:
        with self._lock:
            stats = self.engine.stats(window=True) if self.engine is not None else {}
            delta = {k: stats.get(k, 0) - self._reported[k] for k in self._reported}
            self._reported = {k: stats.get(k, 0) for k in self._reported}
        # The gauge shows the most requests in flight since the last report (a batch's end
        # alone would often catch a quiet moment).
        engine_requests(self.stage, in_flight=stats.get("window_peak", 0),
                        prompt_tokens=delta["prompt_tokens"],
                        cached_tokens=delta["cached_tokens"])
        return {**{key: [delta[key]] for key in ADDITIVE},
                "peak_in_flight": [stats.get("peak_in_flight", 0)]}
