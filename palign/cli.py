"""The `palign` command: run the pipeline or one stage, validate a config, audit the judge,
estimate a run's cost, write a run's report, grade generations, or compare runs' evaluation
results."""

from __future__ import annotations

import argparse
import sys
import time

import yaml

from palign.common.failures import MachineryError, StageFailed
from palign.common.logs import setup_driver_logging
from palign.config import (
    Config,
    ConfigError,
    format_explain,
    load_config,
    stage_names,
)
from palign.config.overrides import parse_set_args
from palign.report.grade_file import EXTRACT_CHOICES


def _compare(paths: list[str], json_out: str | None, reference: str | None = None,
             plot: str | None = None) -> int:
    import json
    from pathlib import Path

    from palign.report import format_comparison, load_arms, merge_arms

    try:
        arms = load_arms(paths)
        ref = None
        if reference:
            from palign.report.reference import load_reference

            ref = load_reference(reference)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_comparison(arms))
    merged = merge_arms(arms)
    if ref is not None:
        from palign.report.reference import format_reference, plot_reference, reference_rows

        print("\n" + format_reference(arms, ref))
        merged["reference"] = {"name": ref.get("name"), "rows": reference_rows(arms, ref)}
        plot = plot or "compare_reference.png"
        try:
            if plot_reference(arms, ref, plot):
                print(f"\nplot: {plot}")
        except OSError as err:
            print(f"error: cannot write {plot}: {err}", file=sys.stderr)
            return 2
    if json_out:
        try:
            Path(json_out).write_text(json.dumps(merged, indent=2) + "\n")
        except OSError as err:
            print(f"error: cannot write {json_out}: {err}", file=sys.stderr)
            return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="palign", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [
        ("run", "run every stage the config lists"),
        *[(s, f"run only the {s} stage") for s in stage_names()],
        ("validate", "check a config and print it with defaults filled in"),
    ]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field by its dotted path, e.g. data.limit=5")
        if name == "run":
            p.add_argument("--restart", metavar="STAGE", choices=["ingest", *stage_names()],
                           help="move this stage's output and every later stage's aside "
                                "(kept under <output_dir>/_aside/) and run them afresh: after "
                                "a config change that a rerun refuses")
        if name == "validate":
            p.add_argument("--skip-paths", action="store_true",
                           help="do not check that data, models and benchmarks exist (for a "
                                "cluster's config, from a machine without its storage)")
            p.add_argument("--explain", action="store_true",
                           help="instead of the YAML, print every field on a line of its own: "
                                "its dotted path, value, default and description")
    fetch = sub.add_parser("fetch-model", help="materialise a short-name model in the cache")
    fetch.add_argument("name")
    fetch_data = sub.add_parser(
        "fetch-data", help="save the paper's training set or a benchmark (from the hub) in the "
                           "columns configs/paper/ reads")
    fetch_data.add_argument("names", nargs="+", metavar="NAME",
                            help="s1k-1.1, aime24, aime25, amc12, math500, or all")
    fetch_data.add_argument("--to", required=True,
                            help="folder (or s3:// / gs:// URI) to write <NAME>.parquet into")
    fetch_data.add_argument("--source", help="a folder saved with datasets' save_to_disk to "
                                             "read instead of the hub (one NAME)")
    fetch_data.add_argument("--limit", type=int, help="only the first N rows")
    grade = sub.add_parser("grade", help="grade a JSONL of generations: pass@1 and pass@k")
    grade.add_argument("file")
    grade.add_argument("--json", dest="json_out", help="also write the report here")
    grade.add_argument("--answer-field", default="answer")
    grade.add_argument("--output-field", default="output", help="a list of outputs per row")
    grade.add_argument("--timeout", type=float, default=5.0, help="seconds per answer check")
    grade.add_argument("--extract", choices=list(EXTRACT_CHOICES), default="both",
                       help="strict: the last \\boxed{}; flexible: math-verify's own extraction "
                            "over the whole output (as papers' labels often are); both (default)")
    comp = sub.add_parser("compare", help="put several runs' evaluation results side by side")
    comp.add_argument("results", nargs="+",
                      help="a run's output_dir, its evaluate/ folder, or a results.json")
    comp.add_argument("--json", dest="json_out", help="also write the merged results here")
    comp.add_argument("--reference", metavar="NAME_OR_FILE",
                      help="also put each arm's numbers beside published ones, with the "
                           "differences: 'paper' (P-ALIGN's table, with each number's source) "
                           "or a reference JSON file")
    comp.add_argument("--plot", help="with --reference: the bar chart's path "
                                     "(default compare_reference.png)")
    from palign.runtime import audit, costplan

    audit.add_arguments(sub.add_parser(
        "audit", help="check the judge on a sample of truncate's input: its P(ENOUGH) curve at "
                      "every prefix, monotonicity, binary search against a full scan, and "
                      "rollouts of the student against its verdicts (docs/audit.md)"))
    costplan.add_arguments(sub.add_parser(
        "plan", help="project tokens, time and GPU-hours of the whole input from the engine "
                     "stages run on a sample, or from a finished run (docs/plan.md)"))
    rep = sub.add_parser("report", help="write <RUN>/report.html, the run's self-contained "
                                        "report (docs/report.md)")
    rep.add_argument("run_dir", metavar="RUN",
                     help="a run's output_dir (a folder or s3:// / gs:// URI)")
    args = parser.parse_args(argv)
    setup_driver_logging()

    if args.command == "report":
        from palign.report.run_report import main as report_main

        return report_main(args)
    if args.command in ("audit", "plan"):
        # the paths and engines they use are checked before any work, as a run's are
        from palign.preflight import check_engine_kwargs, check_paths
        from palign.runtime.signals import stop_from, stop_on_signals

        stages = (["truncate", "align"] if args.command == "audit" else
                  [s.strip() for s in (args.stages or "").split(",")
                   if s.strip() in stage_names()] or None)  # plan names a bad one itself
        if not getattr(args, "from_run", None):
            try:
                cfg = load_config(args.config, parse_set_args(args.set))
                check_engine_kwargs(cfg, stages)
                check_paths(cfg, stages)
            except ConfigError as err:
                print(err, file=sys.stderr)
                return 2

        try:
            with stop_on_signals():
                return (audit if args.command == "audit" else costplan).main(args)
        except KeyboardInterrupt as err:
            stop = stop_from(err)
            print(f"stopped by {stop.name}", file=sys.stderr)
            return stop.exit_code

    if args.command == "fetch-model":
        from palign.engines.models import resolve_model

        print(resolve_model(args.name))
        return 0
    if args.command == "fetch-data":
        from palign.data.fetch_data import DATASETS, fetch

        names = list(DATASETS) if args.names == ["all"] else args.names
        unknown = [n for n in names if n not in DATASETS]
        if unknown or (args.source and len(names) != 1):
            why = (f"unknown dataset {', '.join(unknown)}; known: {', '.join(DATASETS)}"
                   if unknown else "--source reads one dataset: name one")
            print(f"error: {why}", file=sys.stderr)
            return 2
        try:
            for name in names:
                print(fetch(name, args.to, args.source, args.limit))
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0
    if args.command == "grade":
        import json
        from pathlib import Path

        from palign.report.grade_file import format_report, grade_file

        try:
            report = grade_file(args.file, args.answer_field, args.output_field, args.timeout,
                                args.extract)
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except MachineryError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(format_report(report))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
        return 0
    if args.command == "compare":
        return _compare(args.results, args.json_out, args.reference, args.plot)
    try:
        cfg = load_config(args.config, parse_set_args(args.set))
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if args.command == "validate":
        from palign.preflight import check_engine_kwargs, check_paths
        from palign.runtime.resources import format_resource_plan, plan_resources

        if not args.explain:
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        try:
            check_engine_kwargs(cfg)
            if not args.skip_paths:
                check_paths(cfg)
            plan = plan_resources(cfg)
        except ConfigError as err:
            print(err, file=sys.stderr)
            return 2
        if args.explain:
            print(format_explain(cfg) + "\n")
        print(format_resource_plan(plan))
        print("config OK")
        return 0

    from palign.runtime.signals import stop_from, stop_on_signals

    try:  # SIGTERM (ray job stop, a pod's shutdown) and Ctrl-C stop the run the same way
        with stop_on_signals():
            return _run(cfg, args.command, getattr(args, "restart", None))
    except KeyboardInterrupt as err:  # palign.runtime.signals.Stopped, or Ray's stand-in
        stop = stop_from(err)
        print(f"stopped by {stop.name}: committed work is kept; run the same command to resume",
              file=sys.stderr)
        return stop.exit_code  # as a shell reports a process that signal ends: 143, 130


def _run(cfg: Config, command: str, restart: str | None) -> int:
    """``palign run`` or one stage: the pipeline, its summary and the command's exit status."""
    from palign.data.procmem import lean_driver_memory
    from palign.data.runlock import RunLocked
    from palign.pipeline import run_pipeline
    from palign.runtime.runner import StageError
    from palign.runtime.summary import format_summary

    # This process is the driver: it gathers indexes and should give back what it frees. Not
    # done for library callers, whose process (a notebook, a test session serving moto's S3)
    # may hold large buffers of its own.
    lean_driver_memory()
    start = time.time()
    stages = None if command == "run" else [command]
    try:
        summaries = run_pipeline(cfg, stages, restart)
    except (StageError, RunLocked, FileNotFoundError, ValueError) as err:
        # ConfigError is a ValueError: a config or a folder that cannot run, before any work
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (StageFailed, MachineryError) as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    print(format_summary(summaries, time.time() - start))
    from palign.data import storage
    from palign.report.run_report import REPORT_HTML

    page = storage.join(storage.absolute(cfg.run.output_dir), REPORT_HTML)
    if storage.exists(page):
        print(f"report: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
