"""Stage fingerprints: what determined a folder's rows, written beside them, so that a rerun
never mixes two configs' rows.

A stage's fingerprint is a small JSON document: the fields of its config section that can
change a row (never the ones that only say how fast or where: replicas, batch sizes, memory,
retries, time limits), the identity of each model it serves (its name and, where its files can
be seen, a hash of their names and sizes), the prompt texts it sends, and the digest of its
input's fingerprint. ``<folder>/_FINGERPRINT.json`` holds the one its rows were made under. A
rerun computes the fingerprint again: the same, and the stage resumes; a different one, and the
run stops before any work (``ConfigChanged``, exit 2), naming every field that changed with its
old and new value, and how to go on.

Pure: reads and writes through ``palign.data.storage``; no Ray.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palign.data import storage

FILE = "_FINGERPRINT.json"

# Config fields that say how fast, where, or how patiently rows are made, never what they are
# (``callbacks``: what train calls after each step, to watch or stop it; ``report_to`` and
# ``tracking``: where train logs its metrics; a remote engine's URL, key variable, concurrency
# and retries: a rerun against another endpoint serving the same model resumes): left out of
# every fingerprint at any depth. (``engine.backend``, ``dtype`` and ``max_model_len`` stay:
# they change what a model writes, or which prompts fit.)
OPERATIONAL = frozenset({
    "batch_size", "replicas", "cpus_per_replica", "gpus_per_replica", "tensor_parallel_size",
    "gpu_memory_utilization", "enable_prefix_caching", "enforce_eager", "cpu_kv_cache_gib",
    "max_num_seqs", "max_in_flight", "vllm_driver", "max_failures", "request_timeout_s",
    "max_reject_share", "max_row_attempts", "piece_mib", "progress_bars", "cache_dir",
    "callbacks", "report_to", "tracking",
    "base_url", "api_key_env", "max_concurrency", "max_retries", "retry_backoff_s",
    "retry_backoff_max_s",
})


@dataclass(frozen=True)
class Change:
    """One field of a fingerprint that differs: its dotted path, the recorded and the new
    value (``None`` where one side lacks it)."""

    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field}: {_show(self.old)} -> {_show(self.new)}"


class ConfigChanged(ValueError):
    """A folder's rows were made under another config than this run's. A ValueError: the CLI
    reports it as a config that cannot run (exit 2), before any work."""

    def __init__(self, what: str, folder: str, changes: list[Change], restart: str) -> None:
        self.what, self.folder, self.changes, self.restart = what, folder, changes, restart
        lines = "\n".join(f"  {c}" for c in changes)
        super().__init__(
            f"{what} in {folder} was made under another config; what changed (recorded -> "
            f"now):\n{lines}\nTo go on, choose a new run.output_dir, or rerun with "
            f"`--restart {restart}`, which moves {restart}'s output and every later stage's "
            "aside (kept under <output_dir>/_aside/) and runs them afresh; or undo the change "
            "to resume.")


def section_fields(section: Any) -> Any:
    """A config section (pydantic model, dict or list) as JSON, less the operational fields."""
    value = section.model_dump(mode="json") if hasattr(section, "model_dump") else section
    return _strip(value)


def _strip(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _strip(v) for k, v in value.items() if k not in OPERATIONAL}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def digest(fingerprint: Mapping[str, Any]) -> str:
    """A short hash of a fingerprint (its canonical JSON)."""
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def files_identity(folder: str) -> str | None:
    """A hash of the names and sizes of every file under ``folder`` (a local folder or a URI):
    what tells two model folders (or two data sources) apart without reading them; None when
    there is nothing there."""
    found: list[tuple[str, int]] = []
    if storage.is_uri(folder):
        fs, root = storage.resolve(folder)
        import pyarrow.fs as pafs

        info = fs.get_file_info(root)
        infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(
            pafs.FileSelector(root, recursive=True, allow_not_found=True))
        found = [(i.path[len(root):].lstrip("/") or storage.name(i.path), i.size or 0)
                 for i in infos if i.type == pafs.FileType.File]
    else:
        path = Path(storage.absolute(folder))
        if path.is_file():
            found = [(path.name, path.stat().st_size)]
        elif path.is_dir():
            found = [(str(p.relative_to(path)), p.stat().st_size)
                     for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if not found:
        return None
    text = "\n".join(f"{len(n)}:{n}:{s}" for n, s in sorted(found))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``; lists stay whole (a value of their own)."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Every dotted field whose value differs between two fingerprints, in field order."""
    a, b = flatten(old), flatten(new)
    return [Change(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def read(folder: str) -> dict[str, Any] | None:
    """The fingerprint recorded in ``folder``, or None."""
    try:
        return json.loads(storage.read_text(storage.join(folder, FILE)))
    except FileNotFoundError:
        return None


def write(folder: str, fingerprint: Mapping[str, Any]) -> None:
    storage.make_dir(folder)
    storage.write_text(storage.join(folder, FILE),
                       json.dumps(fingerprint, indent=1, sort_keys=True, default=str) + "\n")


def check(folder: str, fingerprint: Mapping[str, Any], what: str, restart: str,
          has_rows: bool) -> None:
    """Refuse (``ConfigChanged``) when ``folder`` holds rows made under another fingerprint.
    A folder with rows and none recorded (made by an older palign) counts as changed; one
    without rows is free to take the new fingerprint."""
    if not has_rows:
        return
    recorded = read(folder)
    if recorded is None:
        raise ConfigChanged(what, folder, [Change("(fingerprint)", "none recorded (an older "
                                                  "palign made it)", digest(fingerprint))],
                            restart)
    found = changes(recorded, fingerprint)
    if found:
        raise ConfigChanged(what, folder, found, restart)


def record(folder: str, fingerprint: Mapping[str, Any]) -> None:
    """Write ``fingerprint`` into ``folder`` unless the same one is already there (before
    the stage's first commit: the rows that follow are made under it)."""
    if read(folder) != json.loads(json.dumps(fingerprint, default=str)):
        write(folder, fingerprint)


def _show(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
