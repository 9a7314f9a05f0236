"""A cost estimate before the GPUs start: from a few rows measured, the whole input projected.

Pure arithmetic on what a measured run left (each stage's ``_SUMMARY.json``) and on the target
cluster's shape (replicas and GPUs per replica, from the config); ``palign.runtime.costplan``
gathers both. Every figure carries where it comes from, so a reader knows what to trust:

- ``measured``: read from the sample run (its wall time, engine start, tokens per row);
- ``projected``: scaled from a measurement to the whole input, assuming time and tokens grow
  linearly with rows and that replicas share rows evenly;
- ``assumed``: a number nobody measured here (train's tokens per second per GPU, the replicas
  a finished run had), given with where it came from.

A stage's time is ``init_s + rows / replicas * (wall_s - init_s) * replicas_measured /
rows_measured``: the engine starts once per replica, in parallel, and the rest is work per row
(a sample is measured on one replica, so the last factor is 1 there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from palign.report.summary_file import SUMMARY_FORMAT

Tag = Literal["measured", "projected", "assumed"]
TAG_MARK = {"measured": "m", "projected": "p", "assumed": "a"}

# Train's rate when nobody gives one: palign's own training step (ZeRO-2, bf16, packed 4096-token
# rows, fused AdamW) on one H200 for a Qwen2.5-0.5B-shaped student ran at 51.7k tokens/s
# (benchmarks/results/train_mfu_gpu.json, mode palign; 27.5k for the 1.5B shape; STACK-NOTES
# saw 67k for 0.5B with plain DeepSpeed). Rounded down: larger students are slower.
DEFAULT_TRAIN_TOKENS_PER_GPU_S = 50_000.0
TRAIN_RATE_SOURCE = ("palign's training step on one H200, Qwen2.5-0.5B shape, ZeRO-2, bf16, "
                     "packed 4096 tokens: 51.7k tokens/s (benchmarks/results/train_mfu_gpu.json; "
                     "27.5k for a 1.5B student)")


@dataclass(frozen=True)
class Figure:
    """One number of the plan and where it comes from (``None``: not known)."""

    value: float | None
    tag: Tag
    note: str = ""


@dataclass(frozen=True)
class StageMeasure:
    """What one stage's measured run did: ``rows`` sent through its pool in ``wall_s``, of which
    ``init_s`` went to starting an engine; the engine's prompt tokens and the stage's own work
    tokens (generated tokens for generate and align, the judge's prompt tokens for truncate),
    on ``replicas`` replicas of ``device``."""

    stage: str
    rows: int
    wall_s: float
    init_s: float = 0.0
    rows_out: int = 0
    prompt_tokens: int = 0
    work_tokens: int = 0
    replicas: int = 1
    device: str = "unknown"
    backend: str = ""
    model: str = ""
    per_row: dict[str, float] = field(default_factory=dict)  # index columns' means

    @property
    def prompt_per_row(self) -> float:
        return self.prompt_tokens / self.rows if self.rows else 0.0

    @property
    def work_per_row(self) -> float:
        return self.work_tokens / self.rows if self.rows else 0.0

    @property
    def row_s(self) -> float:
        """Seconds one replica spends per row, engine start left out."""
        if not self.rows:
            return 0.0
        busy = max(1, min(self.replicas, self.rows))  # a replica with no row did no work
        return max(self.wall_s - self.init_s, 0.0) * busy / self.rows


@dataclass(frozen=True)
class Target:
    """How the config runs a stage on its cluster: at most ``replicas`` replicas of
    ``gpus_per_replica`` GPUs each."""

    replicas: int
    gpus_per_replica: float


@dataclass(frozen=True)
class StagePlan:
    stage: str
    measure: StageMeasure
    target: Target
    rows: Figure
    prompt_per_row: Figure  # the engine's prompt tokens
    work_per_row: Figure  # the stage's own tokens (generated, or the judge's prompts)
    prompt_tokens: Figure
    work_tokens: Figure
    init_s: Figure
    time_s: Figure
    gpu_hours: Figure


@dataclass(frozen=True)
class TrainSetup:
    """What the config's train stage does with the rows align writes."""

    workers: int
    use_gpu: bool
    epochs: int = 1
    max_steps: int | None = None
    step_tokens: int | None = None  # tokens one optimizer step takes at most (all workers)


@dataclass(frozen=True)
class Plan:
    rows_total: Figure  # source rows of the whole input
    rows_measured: int  # source rows the measurement read
    stages: list[StagePlan]
    train: StagePlan | None
    assumptions: list[str]
    warnings: list[str]

    @property
    def time_s(self) -> Figure:
        """Stages run one after another: their times add up."""
        return _sum([s.time_s for s in self.all_stages()])

    @property
    def gpu_hours(self) -> Figure:
        return _sum([s.gpu_hours for s in self.all_stages()])

    def all_stages(self) -> list[StagePlan]:
        return [*self.stages, *([self.train] if self.train else [])]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["format"] = "palign.plan/1"
        out["total"] = {"time_s": asdict(self.time_s), "gpu_hours": asdict(self.gpu_hours)}
        return out


def _sum(figures: list[Figure]) -> Figure:
    known = [f for f in figures if f.value is not None]
    if not known:
        return Figure(None, "projected", "nothing to add up")
    tag: Tag = "assumed" if any(f.tag == "assumed" for f in known) else "projected"
    note = "" if len(known) == len(figures) else "stages without a figure left out"
    return Figure(sum(f.value or 0.0 for f in known), tag, note)


def measure_from_summary(summary: dict[str, Any], replicas: int = 1,
                         device: str = "unknown") -> StageMeasure:
    """A ``StageMeasure`` from a stage's ``_SUMMARY.json`` (format ``palign.summary/1``): the
    rows this run processed (a resumed run's skipped rows cost it no time)."""
    if summary.get("format") != SUMMARY_FORMAT:
        raise ValueError(f"not a {SUMMARY_FORMAT} summary: format {summary.get('format')!r}")
    engine = summary.get("engine") or {}
    return StageMeasure(
        stage=summary["stage"], rows=int(summary.get("processed") or 0),
        wall_s=float(summary.get("wall_s") or 0.0), init_s=float(engine.get("init_s") or 0.0),
        rows_out=int(summary.get("rows_out") or 0),
        prompt_tokens=int(engine.get("prompt_tokens") or 0),
        work_tokens=int(engine.get("work_tokens") or 0),
        replicas=int(summary.get("replicas") or replicas),
        device=str(summary.get("device") or device))


def project(m: StageMeasure, rows: float, target: Target) -> StagePlan:
    """``m`` scaled to ``rows`` rows on ``target``: time = init_s + rows / replicas * the
    measured seconds per row and replica; GPU-hours = time * replicas * GPUs per replica."""
    replicas = max(1, min(target.replicas, int(rows) if rows >= 1 else 1))
    time_s = m.init_s + rows / replicas * m.row_s if m.rows else None
    gpu_h = None if time_s is None else time_s * replicas * target.gpus_per_replica / 3600
    linear = "linear in rows, replicas sharing rows evenly"
    return StagePlan(
        stage=m.stage, measure=m, target=target,
        rows=Figure(rows, "projected", f"{m.rows} rows measured, scaled with the input"),
        prompt_per_row=Figure(m.prompt_per_row, "measured", "the engine's prompt tokens"),
        work_per_row=Figure(m.work_per_row, "measured",
                            "generated tokens (truncate: the judge's prompt tokens)"),
        prompt_tokens=Figure(m.prompt_per_row * rows, "projected", linear),
        work_tokens=Figure(m.work_per_row * rows, "projected", linear),
        init_s=Figure(m.init_s, "measured", "engine start, once per replica (in parallel)"),
        time_s=Figure(time_s, "projected", linear if m.rows else "no row was measured"),
        gpu_hours=Figure(gpu_h, "projected",
                         f"{replicas} replica(s) x {target.gpus_per_replica:g} GPU(s)"))


def project_train(align: StageMeasure, rows: float, setup: TrainSetup,
                  tokens_per_gpu_s: float | None) -> StagePlan:
    """Train from align's measured tokens per row (its prompt, question and prefix, plus the
    continuation: what a training row holds) times epochs, capped by ``max_steps``; its time at
    an assumed rate per GPU (``None``: no rate, no time)."""
    per_row = align.prompt_per_row + align.work_per_row
    tokens = per_row * rows * setup.epochs
    if setup.max_steps is not None and setup.step_tokens:
        tokens = min(tokens, float(setup.max_steps * setup.step_tokens))
    time_s = tokens / (tokens_per_gpu_s * setup.workers) if tokens_per_gpu_s else None
    gpus = float(setup.workers if setup.use_gpu else 0)
    gpu_h = None if time_s is None else time_s * gpus / 3600
    rate = f"{tokens_per_gpu_s:,.0f} tokens/s per worker (assumed)" if tokens_per_gpu_s \
        else "no rate assumed"
    empty = StageMeasure("train", rows=0, wall_s=0.0)
    return StagePlan(
        stage="train", measure=empty, target=Target(setup.workers, 1.0 if setup.use_gpu else 0.0),
        rows=Figure(rows, "projected", "align's rows out, scaled with the input"),
        prompt_per_row=Figure(None, "measured", "train prompts no engine"),
        work_per_row=Figure(per_row, "measured", "align's prompt + continuation tokens"),
        prompt_tokens=Figure(None, "projected", "train prompts no engine"),
        work_tokens=Figure(tokens, "projected", f"x {setup.epochs} epoch(s)"
                           + (f", at most {setup.max_steps} steps" if setup.max_steps else "")),
        init_s=Figure(None, "assumed", "not measured: model load and DeepSpeed start"),
        time_s=Figure(time_s, "assumed", rate),
        gpu_hours=Figure(gpu_h, "assumed",
                         f"{setup.workers} worker(s) x {1 if setup.use_gpu else 0} GPU"))


def build_plan(measures: list[StageMeasure], targets: dict[str, Target], rows_total: Figure,
               rows_measured: int, train: TrainSetup | None = None,
               tokens_per_gpu_s: float | None = None, assumptions: list[str] | None = None,
               warnings: list[str] | None = None) -> Plan:
    """Each measured stage projected to ``rows_total`` source rows: a stage gets the share of
    the input that reached it in the measurement (rows the earlier stages rejected do not)."""
    notes, warns = list(assumptions or []), list(warnings or [])
    total = rows_total.value or 0.0
    scale = total / rows_measured if rows_measured else 0.0
    stages = [project(m, m.rows * scale, targets[m.stage]) for m in measures]
    for m in measures:
        if note := device_note(m, targets[m.stage]):
            warns.append(note)
    train_plan = None
    align = next((m for m in measures if m.stage == "align"), None)
    if train is not None and align is not None and align.rows:
        train_plan = project_train(align, align.rows_out * scale, train, tokens_per_gpu_s)
        if tokens_per_gpu_s is None:
            notes.append("train: no tokens/s per worker assumed (its workers run on CPU): "
                         "pass --train-tokens-per-gpu-s to project its time")
    elif train is not None:
        notes.append("train: not projected (align was not measured: its rows and tokens are "
                     "what train reads)")
    notes.insert(0, "time and tokens grow linearly with rows; a stage's replicas share its "
                    "rows evenly and each starts its engine once, in parallel")
    return Plan(rows_total, rows_measured, stages, train_plan, notes, warns)


def device_note(m: StageMeasure, target: Target) -> str | None:
    """A warning when the measurement ran on another kind of device than the config asks."""
    on_cpu = m.device.lower().startswith("cpu")
    if target.gpus_per_replica > 0 and on_cpu:
        return (f"{m.stage}: measured on {m.device}: not representative of the config's "
                f"GPUs ({target.gpus_per_replica:g} per replica); its times are a CPU's")
    if target.gpus_per_replica == 0 and m.device.lower().startswith("gpu"):
        return (f"{m.stage}: measured on {m.device}: not representative of the config's CPU "
                "replicas")
    return None


def _cell(f: Figure, fmt: str) -> str:
    if f.value is None:
        return "-"
    return f"{format(f.value, fmt)} ({TAG_MARK[f.tag]})"


def format_plan(plan: Plan) -> str:
    """The plan as Markdown: a table per stage, the totals, the warnings and assumptions."""
    lines = [f"# Cost plan: {_cell(plan.rows_total, ',.0f')} input rows "
             f"({plan.rows_total.note}; {plan.rows_measured} measured)", "",
             "| stage | sample rows | sample wall s | init s | prompt tok/row | work tok/row "
             "| rows | prompt tokens | work tokens | replicas x GPUs | time | GPU-hours |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for s in plan.all_stages():
        m = s.measure
        sample = (f"{m.rows} (m)", f"{m.wall_s:.1f} (m)") if m.rows else ("-", "-")
        lines.append(
            f"| {s.stage} | {sample[0]} | {sample[1]} | {_cell(s.init_s, '.1f')} "
            f"| {_cell(s.prompt_per_row, ',.0f')} | {_cell(s.work_per_row, ',.0f')} "
            f"| {_cell(s.rows, ',.0f')} | {_cell(s.prompt_tokens, ',.0f')} "
            f"| {_cell(s.work_tokens, ',.0f')} "
            f"| {s.target.replicas} x {s.target.gpus_per_replica:g} "
            f"| {_duration(s.time_s)} | {_cell(s.gpu_hours, ',.2f')} |")
    lines.append(f"| **total** | | | | | | | | | | {_duration(plan.time_s)} "
                 f"| {_cell(plan.gpu_hours, ',.2f')} |")
    lines += ["", "(m) measured on the sample, (p) projected from it (linear scaling), "
                  "(a) assumed: not measured here. Work tokens: generated tokens (generate, "
                  "align), the judge's prompt tokens (truncate), trained tokens (train)."]
    per_row = [f"- {s.stage}: " + ", ".join(f"{k} {v:,.1f}" for k, v in s.measure.per_row.items())
               for s in plan.stages if s.measure.per_row]
    if per_row:
        lines += ["", "Per row (measured, index columns' means):", *per_row]
    if plan.warnings:
        lines += ["", "Warnings:", *[f"- {w}" for w in plan.warnings]]
    lines += ["", "Assumptions:", *[f"- {a}" for a in plan.assumptions]]
    return "\n".join(lines) + "\n"


def _duration(f: Figure) -> str:
    if f.value is None:
        return "-"
    s = f.value
    text = f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"
    return f"{text} ({TAG_MARK[f.tag]})"
