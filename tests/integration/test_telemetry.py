"""palign.runtime.telemetry: a no-op without Ray, never raises, records what a batch says; the
names Ray exports (measured on a local Ray: driver and actor, Prometheus endpoint); and the Grafana
dashboard uses exactly those names."""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from ports import free_port

from palign.runtime import telemetry
from palign.stages.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "cluster" / "grafana" / "palign_dashboard.json"


class _Recorder:
    """Stands in for a Ray metric: keeps every call as (method, value, tags)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, dict[str, str]]] = []

    def inc(self, value: float, tags: dict[str, str]) -> None:
        if value <= 0:
            raise ValueError("Ray rejects counter increments <= 0")
        self.calls.append(("inc", value, tags))

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("set", value, tags))

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("observe", value, tags))


@pytest.fixture
def fake_metrics(monkeypatch: pytest.MonkeyPatch) -> telemetry._Metrics:
    metrics = telemetry._Metrics(**{name: _Recorder() for name in
                                    telemetry._Metrics.__dataclass_fields__})
    monkeypatch.setattr(telemetry, "_metrics", metrics)
    monkeypatch.setattr(telemetry, "enabled", lambda: True)
    return metrics


def test_without_ray_nothing_is_made_or_recorded(monkeypatch: pytest.MonkeyPatch,
                                                 no_ray: None) -> None:
    monkeypatch.setattr(telemetry, "_metrics", None)
    telemetry.rows("truncate", rows_in=3, rows_out=2, rejected=1)
    telemetry.judge_probes("truncate", 5)
    telemetry.prefix_ratios("truncate", [0.2, 0.9])
    telemetry.engine_tokens("align", 100, 2.0)
    telemetry.train_step(1.5, 300.0)
    telemetry.stage_batch("truncate", 2, 1, 0, 1.0, tokens=10, probes=1, ratios=[0.5])
    assert telemetry._metrics is None
    assert not telemetry.enabled()


def test_env_switch_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(telemetry.ENV_DISABLE, "0")
    assert not telemetry.enabled()


def test_a_failing_metric_warns_once_and_never_raises(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> telemetry._Metrics:
        raise RuntimeError("no metrics agent")

    monkeypatch.setattr(telemetry, "_metrics", None)
    monkeypatch.setattr(telemetry, "_warned", False)
    monkeypatch.setattr(telemetry, "enabled", lambda: True)
    monkeypatch.setattr(telemetry, "_build", broken)
    with caplog.at_level(logging.WARNING, logger="palign.runtime.telemetry"):
        telemetry.rows("align", rows_in=1)
        telemetry.train_step(1.0, 2.0)
        telemetry.stage_batch("align", 1, 1, 0, 1.0)
    warnings = [r for r in caplog.records if r.name == "palign.runtime.telemetry"]
    assert len(warnings) == 1 and "rows failed" in warnings[0].getMessage()


def test_functions_record_with_the_stage_tag(fake_metrics: telemetry._Metrics) -> None:
    m = fake_metrics
    telemetry.rows("align", rows_in=4, rows_out=3, rejected=0)  # zero: not sent (Ray rejects)
    telemetry.judge_probes("truncate", 0)
    telemetry.prefix_ratios("truncate", [0.25, float("nan"), 1.0])
    telemetry.engine_tokens("generate", 500, 2.0)
    telemetry.engine_tokens("generate", 0, 0.0)
    telemetry.train_step(2.5, None)
    assert m.rows_in.calls == [("inc", 4.0, {"stage": "align"})]
    assert m.rows_out.calls == [("inc", 3.0, {"stage": "align"})]
    assert m.rows_rejected.calls == [] and m.judge_probes.calls == []
    assert m.prefix_ratio.calls == [("observe", 0.25, {"stage": "truncate"}),
                                    ("observe", 1.0, {"stage": "truncate"})]
    assert m.engine_tokens.calls == [("inc", 500.0, {"stage": "generate"})]
    assert m.engine_tokens_per_s.calls == [("set", 250.0, {"stage": "generate"})]
    assert m.train_loss.calls == [("set", 2.5, {"stage": "train"})]
    assert m.train_tokens_per_s.calls == []


def test_stage_batch_records_what_the_stage_counted(fake_metrics: telemetry._Metrics) -> None:
    m = fake_metrics
    records = [
        {"id": "a", "prefix_ratio": 0.4, "probes": [{}, {}, {}], "judge_prompt_tokens": 300,
         "judge_cached_tokens": 180, "judge_longest_prompt_tokens": 120},
        {"id": "b", "prefix_ratio": 1, "probes": [{}], "judge_prompt_tokens": 100},
    ]
    counted = REGISTRY["truncate"].metrics(records)  # the stage's own definition
    telemetry.stage_batch("truncate", rows_in=3, rows_out=2, rejected=1, seconds=4.0,
                          tokens=counted.tokens, probes=counted.probes, ratios=counted.ratios,
                          prefill=counted.prefill)
    tag = {"stage": "truncate"}
    assert m.rows_in.calls == [("inc", 3.0, tag)]
    assert m.rows_out.calls == [("inc", 2.0, tag)]
    assert m.rows_rejected.calls == [("inc", 1.0, tag)]
    assert m.judge_probes.calls == [("inc", 4.0, tag)]
    assert [c[1] for c in m.prefix_ratio.calls] == [0.4, 1.0]
    assert m.engine_tokens.calls == [("inc", 400.0, tag)]
    assert m.engine_tokens_per_s.calls == [("set", 100.0, tag)]
    # (300 - 180) computed over a longest prompt of 120: one prompt's worth; b has no longest.
    assert m.prefill_ratio.calls == [("observe", 1.0, tag)]


def test_each_stage_counts_its_own_tokens() -> None:
    samples = [{"sample": 0, "output_tokens": 30}, {"sample": 1, "output_tokens": 10}]
    assert REGISTRY["evaluate"].metrics([{"id": "c", "samples": samples}, {"id": "d"}]).tokens == 40
    assert REGISTRY["generate"].metrics([{"teacher_tokens": 7}, {"cot_source": "data"}]).tokens == 7
    # align's records carry truncate's probes and ratio along: not counted again
    carried = REGISTRY["align"].metrics([{"prefix_ratio": 0.4, "probes": [{}],
                                          "continuation_tokens": 12}])
    assert (carried.tokens, carried.probes, carried.ratios) == (12, 0, ())


# ------------------------------------------------------------------------------ dashboard


def _panel_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def test_dashboard_uses_exactly_the_exported_names() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    used: set[str] = set()
    exprs = _panel_exprs(dashboard)
    assert exprs
    for title, expr in exprs:
        names = set(re.findall(r"\bray_palign_\w+", expr))
        assert names, f"panel {title!r} uses no palign metric: {expr}"
        unknown = names - set(telemetry.EXPORTED_NAMES)
        assert not unknown, f"panel {title!r} uses names palign does not export: {unknown}"
        used |= names
    assert used == set(telemetry.EXPORTED_NAMES)
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    for var in variables.values():
        query = var.get("definition", "")
        assert set(re.findall(r"\bray_palign_\w+", query)) <= set(telemetry.EXPORTED_NAMES)


# ------------------------------------------------------------------------------ measured on Ray


def _record_all(stage: str) -> int:
    """Record every palign metric once under ``stage`` (and train); returns the process id."""
    import os

    from palign.runtime import telemetry as t

    t.rows(stage, rows_in=5, rows_out=4, rejected=1)
    t.judge_probes(stage, 7)
    t.prefix_ratios(stage, [0.35, 0.8])
    t.engine_tokens(stage, 120, 1.5)
    t.engine_requests(stage, in_flight=3, prompt_tokens=400, cached_tokens=250)
    t.prefill_ratios(stage, [1.1, 2.5])
    t.train_step(0.75, 42.0)
    return os.getpid()


def _scrape(port: int) -> dict[tuple[str, str], list[tuple[dict[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: dict[tuple[str, str], list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_palign_"):
                samples.setdefault((s.name, s.labels.get("stage", "")), []).append(
                    (s.labels, s.value))
    return samples


@pytest.mark.ray
def test_exported_names_on_a_local_ray(no_ray) -> None:
    """Ray 2.60, ``include_dashboard=False``: the per-node metrics agent still serves
    ``/metrics`` on ``_metrics_export_port``; values appear after about 10-15 s."""
    import ray

    port = free_port()
    ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING",
             _metrics_export_port=port,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(  # the actor's class is here
                 map(str, (ROOT, Path(__file__).parent, ROOT / "tests" / "support")))}})
    try:
        _record_all("truncate")  # the driver (runner) side

        @ray.remote(num_cpus=0)
        class Engine:  # the StageWorker / Ray Train worker side
            def record(self) -> int:
                return _record_all("align")

        actor = Engine.remote()
        ray.get(actor.record.remote())
        expected = {(name, stage) for stage in ("truncate", "align")
                    for name in telemetry.EXPORTED_NAMES if "train" not in name}
        expected |= {("ray_palign_train_loss", "train"), ("ray_palign_train_tokens_per_s", "train")}
        deadline = time.time() + 90
        samples: dict = {}
        while time.time() < deadline:
            try:
                samples = _scrape(port)
            except OSError:
                samples = {}
            if expected <= {k for k, v in samples.items() if any(x > 0 for _, x in v)}:
                break
            time.sleep(2)
        missing = sorted(k for k in expected
                         if not any(x > 0 for _, x in samples.get(k, [])))
        assert not missing, f"not exported with a positive value: {missing}"
        # Nothing exported under a name EXPORTED_NAMES does not list.
        assert {name for name, _ in samples} == set(telemetry.EXPORTED_NAMES)
        value = {k: sum(x for _, x in v) for k, v in samples.items()}
        assert value[("ray_palign_rows_in_total", "align")] == 5
        assert value[("ray_palign_rows_rejected_total", "truncate")] == 1
        assert value[("ray_palign_judge_probes_total", "align")] == 7
        assert value[("ray_palign_prefix_ratio_count", "truncate")] == 2
        assert value[("ray_palign_engine_tokens_total", "truncate")] == 120
        # The train gauges come from two processes here (driver and actor): two series.
        workers = {labels["WorkerId"] for labels, _ in samples[("ray_palign_train_loss", "train")]}
        assert len(workers) == 2
        buckets = {labels["le"]: x for labels, x in
                   samples[("ray_palign_prefix_ratio_bucket", "align")]}
        assert buckets["0.3"] == 0 and buckets["0.4"] == 1 and buckets["1.0"] == 2
        gauge = samples[("ray_palign_engine_tokens_per_s", "align")][0][1]
        assert gauge == pytest.approx(80.0)
        labels = samples[("ray_palign_rows_out_total", "align")][0][0]
        assert {"stage", "SessionName", "WorkerId", "NodeAddress"} <= set(labels)
    finally:
        ray.shutdown()
