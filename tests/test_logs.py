"""What an engine actor's console shows (Ray forwards it to the driver) and what only its file
keeps."""

import logging

from palign.logs import FILE_ONLY, _ConsoleFilter


def record(name: str, level: int, **extra) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, "msg", (), None)
    rec.__dict__.update(extra)
    return rec


def test_console_keeps_palign_info_and_others_errors_but_not_per_batch_lines():
    f = _ConsoleFilter()
    assert f.filter(record("palign.stages.worker", logging.INFO))
    assert not f.filter(record("palign.stages.worker", logging.INFO, **FILE_ONLY))
    assert not f.filter(record("vllm.engine", logging.INFO))
    assert f.filter(record("vllm.engine", logging.ERROR))
