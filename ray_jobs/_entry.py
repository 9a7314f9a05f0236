"""What every ray_jobs/ script shares: make the job's working directory importable, then hand
the arguments to the `palign` command. No logic of its own lives here."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(command: str, argv: list[str] | None = None) -> int:
    """``palign <command> CONFIG [--set KEY=VALUE ...]`` inside the Ray job.

    The job's driver joins the cluster it was submitted to (``RAY_ADDRESS``, set by the job
    server); ``ray.address`` in the config is ignored there.
    """
    parser = argparse.ArgumentParser(prog=f"ray_jobs/{command}.py")
    parser.add_argument("--config", required=True, help="a palign YAML config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by its dotted path")
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:  # --working-dir ships the repo; run it from there
        sys.path.insert(0, str(REPO))
    from palign.cli import main

    sets = [x for pair in args.set for x in ("--set", pair)]
    return main([command, args.config, *sets])
