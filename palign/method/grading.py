"""Answer extraction and grading with math-verify, safe inside long-running Ray actors.

sympy can spin forever on pathological input (``9^{9^{9^{9}}}``, huge factorials, ...), and
math-verify's own time limits use ``signal.alarm``, which only works in the main thread of the
main interpreter. So the checks run in a persistent worker process started with the "spawn"
context (no fork of a threaded parent such as a Ray actor or a vLLM engine), one check at a time
over a Pipe. The parent times every check with ``conn.poll``; when one runs past the limit the
worker is killed, the check counts as wrong with status ``"timeout"``, and a fresh worker is
started lazily at the next call. A worker that cannot start (math_verify missing or broken, no
process to spawn) raises :class:`~palign.common.failures.GraderUnavailable`: a failure of the
machinery, never a wrong answer.

Two ways to find the model's answer (the extraction mode of a check):

* ``strict``: the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in the output, re-wrapped
  as ``\\boxed{<content>}`` and parsed by math-verify (its boxed-answer extraction is the most
  robust path; ``$...$`` wrapping would break on contents that contain ``$``). No box, no
  answer.
* ``flexible``: ``math_verify.parse`` over the whole output with its default extraction configs,
  as the P-ALIGN authors' correctness labels were made. It ranks candidates (math-verify
  0.9): a box or whatever follows "final answer ... is" first, then what follows "answer",
  and last any LaTeX expression or number; within a rank the rightmost candidate that parses
  wins. So it finds an answer in an output with no box at all (a truncated or looping one),
  keeps a box over a later bare number, and takes a later "final answer is 15" over a box.
  The extraction runs in the worker under the same time limit: parsing a whole output can
  hang as well.

The gold answer is the same for both: parsed as given if it already contains ``$`` or
``\\boxed``, else wrapped as ``$<gold>$``.

A gold answer given as a worked solution (``data.gold: solution``, s1K-1.1's ``solution``
column) is first reduced to its final answer (``Grader.final_answer``): the last box's content;
else what math-verify extracts after an answer phrase ("the final answer is 12", "Answer: 12",
its anchored extraction, in the worker under the time limit); else none. Not math-verify's
unanchored fallback: on a proof it would take the last expression of the text, which is not an
answer.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any, Literal

from palign.common.failures import GraderUnavailable, describe

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_NO_ANSWER = "no_answer"
STATUS_TIMEOUT = "timeout"
STATUS_ERROR = "error"
STATUS_UNCHECKED = "no_gold"  # no gold answer to check against (a proof's solution)

ExtractMode = Literal["strict", "flexible"]
STRICT: ExtractMode = "strict"
FLEXIBLE: ExtractMode = "flexible"
EXTRACT_MODES: tuple[ExtractMode, ...] = (STRICT, FLEXIBLE)
ANCHORED = "anchored"  # the worker's job of finding a solution's final answer after a phrase

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in text, braces balanced; None if
    there is none or its braces never close.

    Escaped braces (``\\{``, ``\\}``) inside the box are not counted, so set answers such as
    ``\\boxed{\\{1, 2\\}}`` come out whole. If the last box is unclosed the result is None even
    when an earlier box is well formed: the final answer is malformed.
    """
    if not text:
        return None
    start = None
    for m in _BOX_RE.finditer(text):
        start = m.end()
    if start is None:
        return None
    depth = 1
    i = start
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character (\{, \}, \\ or a command's first letter)
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def _gold_for_parsing(gold: str) -> str:
    if "$" in gold or "\\boxed" in gold:
        return gold
    return f"${gold}$"


def _pred_for_parsing(content: str) -> str:
    return f"\\boxed{{{content}}}"


@dataclass(frozen=True)
class Grade:
    correct: bool
    status: str  # "ok", "no_answer" (nothing to grade), "timeout", "error"
    # The extracted answer as text. strict: the last box's content (also on a time-out or an
    # error). flexible: the text of math-verify's match (None when the check did not finish).
    predicted: str | None


# --------------------------------------------------------------------------- worker process


def _flexible_text(parsed: list[Any]) -> str:
    """The answer math-verify extracted, as text: the matched text it appends to its parsed
    value (``fallback_mode="first_match"``, its default; verify compares that text too), else
    the value itself. The text is that of the first candidate it tried, so in the rare output
    whose first candidate does not parse it names that one, not the value that was graded."""
    text = next((p for p in parsed if isinstance(p, str)), None)
    return text if text is not None else str(parsed[0])


def _check(math_verify: Any, mode: str, text: str, gold: str) -> tuple[str, bool, str, str | None]:
    """One comparison, inside the worker. ``text`` is the last box's content (strict) or the
    whole output (flexible). Returns (status, correct, detail, flexible's extracted text)."""
    if mode == ANCHORED:  # a worked solution's final answer: after an answer phrase only
        configs = [math_verify.LatexExtractionConfig(try_extract_without_anchor=False),
                   math_verify.ExprExtractionConfig(try_extract_without_anchor=False)]
        found = math_verify.parse(text, extraction_config=configs, parsing_timeout=None)
        if not found:
            return STATUS_NO_ANSWER, False, "no answer phrase in the solution", None
        return STATUS_OK, True, "", _flexible_text(found)
    gold_parsed = math_verify.parse(_gold_for_parsing(gold), parsing_timeout=None)
    if not gold_parsed:
        return STATUS_ERROR, False, f"gold answer could not be parsed: {gold!r}", None
    if mode == STRICT:
        pred_parsed = math_verify.parse(_pred_for_parsing(text), parsing_timeout=None)
        if not pred_parsed:
            return STATUS_NO_ANSWER, False, "nothing extracted from the boxed answer", None
        predicted = None
    elif mode == FLEXIBLE:
        # Default extraction configs and fallback, as the authors' labels were made.
        pred_parsed = math_verify.parse(text, parsing_timeout=None)
        if not pred_parsed:
            return STATUS_NO_ANSWER, False, "math-verify found no answer in the output", None
        predicted = _flexible_text(pred_parsed)
    else:
        return STATUS_ERROR, False, f"unknown extraction mode {mode!r}", None
    ok = bool(math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=None))
    return STATUS_OK, ok, "", predicted


def _worker_main(conn: Connection, parent_pid: int) -> None:
    """Entry point of the grading worker: import math_verify once, then serve checks."""
    try:
        import math_verify

        # Its time limits are disabled on purpose (the parent enforces them); silence the
        # one-time warning that says so.
        for name in ("math_verify", "math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).setLevel(logging.ERROR)
    except Exception as err:  # noqa: BLE001 - report any import failure to the parent
        conn.send(("failed", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            # Wake up now and then to notice an orphaned worker (parent gone).
            while not conn.poll(5.0):
                if os.getppid() != parent_pid:
                    return
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        job_id, mode, text, gold = msg
        try:
            status, correct, detail, predicted = _check(math_verify, mode, text, gold)
        except Exception as err:  # noqa: BLE001 - any failure is an "error" grade
            status, correct, detail = STATUS_ERROR, False, f"{type(err).__name__}: {err}"
            predicted = None
        try:
            conn.send((job_id, status, correct, detail, predicted))
        except (EOFError, OSError, BrokenPipeError):
            return


# --------------------------------------------------------------------------- parent side


class Grader:
    """Grades predictions against gold answers in a persistent worker process, in either
    extraction mode (one worker serves both). Each check has a hard time limit; on time-out the
    worker is killed and restarted, and the check counts as wrong with status "timeout".
    Usable as a context manager; close() stops the worker.

    ``startup_timeout_s`` bounds the start of a worker (spawn plus importing math_verify and
    sympy); it does not count against ``timeout_s``. Calls are serialized with a lock, so one
    Grader may be shared by threads.
    """

    def __init__(self, timeout_s: float = 5.0, startup_timeout_s: float = 120.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._next_job = 0
        self.restarts = 0  # workers killed after a time-out or failure

    # -- worker lifecycle

    def _start(self) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, os.getpid()),
            name="palign-grader",
            daemon=True,
        )
        t0 = time.monotonic()
        proc.start()
        child_conn.close()  # so that the worker's death shows up here as EOF
        self._proc, self._conn = proc, parent_conn
        try:
            if not parent_conn.poll(self.startup_timeout_s):
                raise TimeoutError(f"grading worker not ready after {self.startup_timeout_s}s")
            msg = parent_conn.recv()
        except BaseException:
            self._stop_worker(kill=True)
            raise
        if msg[0] != "ready":
            self._stop_worker(kill=True)
            raise RuntimeError(f"grading worker failed to start: {msg[1]}")
        log.info("grading worker %s ready in %.1fs", msg[1], time.monotonic() - t0)

    def _stop_worker(self, kill: bool) -> None:
        proc, conn = self._proc, self._conn
        self._proc, self._conn = None, None
        if proc is not None and not kill and conn is not None:
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
            proc.join(2.0)
        if proc is not None and proc.is_alive():
            proc.terminate()
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        if conn is not None:
            conn.close()
        if proc is not None:
            try:
                proc.close()
            except ValueError:  # still running after SIGKILL: leave it to the OS
                log.warning("grading worker %s did not exit", proc.pid)

    # -- grading

    def start(self) -> None:
        """Start the worker now (it otherwise starts at the first check); raises
        GraderUnavailable when it cannot start."""
        with self._lock:
            self._ensure_worker()

    def _ensure_worker(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        if self._proc is not None:
            self._stop_worker(kill=True)
        try:
            self._start()
        except Exception as err:  # noqa: BLE001 - the machinery's fault, never a row's
            raise GraderUnavailable(f"the grading worker cannot start: {describe(err)}") from err

    def _run_check(self, mode: str, text: str, gold: str) -> tuple[str, bool, str, str | None]:
        """One check in the worker under the time limit: (status, correct, detail, flexible's
        extracted text). A time-out or a dead worker is a grade, never an exception."""
        self._ensure_worker()
        assert self._conn is not None
        job_id = self._next_job
        self._next_job += 1
        try:
            self._conn.send((job_id, mode, text, gold))
            if not self._conn.poll(self.timeout_s):
                log.warning(
                    "grading (%s) timed out after %.1fs (pred %.80r, gold %.80r); "
                    "restarting worker",
                    mode,
                    self.timeout_s,
                    text,
                    gold,
                )
                self._stop_worker(kill=True)
                self.restarts += 1
                return STATUS_TIMEOUT, False, f"no verdict within {self.timeout_s}s", None
            reply = self._conn.recv()
        except (EOFError, OSError) as err:
            log.error("grading worker died (%s); restarting it at the next check", err)
            self._stop_worker(kill=True)
            self.restarts += 1
            return STATUS_ERROR, False, f"worker died: {type(err).__name__}", None
        got_id, status, correct, detail, predicted = reply
        if got_id != job_id:  # cannot happen with one check in flight; be safe anyway
            log.error("grading worker answered job %s, expected %s", got_id, job_id)
            self._stop_worker(kill=True)
            self.restarts += 1
            return STATUS_ERROR, False, "out-of-order reply", None
        return status, bool(correct), detail, predicted

    def grade(self, output: str, gold: str, mode: ExtractMode = STRICT) -> Grade:
        """Grade one model output against a gold answer. ``mode`` is how the answer is found:
        ``"strict"`` (the last boxed answer; none, no answer) or ``"flexible"`` (math-verify's
        own extraction over the whole output). Raises ValueError for another mode and
        GraderUnavailable when the worker cannot start."""
        if mode not in EXTRACT_MODES:
            raise ValueError(f"extraction mode must be one of {EXTRACT_MODES}, got {mode!r}")
        if mode == STRICT:
            text = last_boxed(output) if isinstance(output, str) else None
        else:
            text = output if isinstance(output, str) else None
        if text is None or not text.strip():
            # Nothing to send to the worker; strict keeps the (blank) box content it found.
            return Grade(correct=False, status=STATUS_NO_ANSWER,
                         predicted=text if mode == STRICT else None)
        with self._lock:
            status, correct, detail, extracted = self._run_check(mode, text, str(gold))
        predicted = text if mode == STRICT else extracted
        if status == STATUS_ERROR:
            log.warning("grading (%s) error (pred %.80r, gold %.80r): %s",
                        mode, predicted, gold, detail)
        return Grade(correct=correct and status == STATUS_OK, status=status, predicted=predicted)

    def final_answer(self, solution: str) -> tuple[str | None, str]:
        """The final answer of a worked solution, and where it was found: ``"boxed"`` (the
        last box's content), ``"answer phrase"`` (math-verify's extraction after "the answer
        is", "Answer:" and the like), or ``(None, "none")`` (a proof, say), also when that
        extraction times out. Raises GraderUnavailable when the worker cannot start."""
        if not isinstance(solution, str) or not solution.strip():
            return None, "none"
        boxed = last_boxed(solution)
        if boxed is not None and boxed.strip():
            return boxed.strip(), "boxed"
        with self._lock:
            status, _, _, found = self._run_check(ANCHORED, solution, "")
        if status == STATUS_OK and found:
            return found, "answer phrase"
        return None, "none"

    def grade_both(self, output: str, gold: str) -> tuple[Grade, Grade]:
        """The (strict, flexible) grades of one output: two checks, each with its own time
        limit."""
        return self.grade(output, gold, STRICT), self.grade(output, gold, FLEXIBLE)

    def close(self) -> None:
        """Stop the worker (a later grade starts a new one)."""
        with self._lock:
            self._stop_worker(kill=False)

    def __enter__(self) -> Grader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if self._proc is not None:
                self._stop_worker(kill=True)
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass
