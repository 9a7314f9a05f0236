"""The driver's progress line off a terminal: few lines however many batches, always the last."""

import logging

from palign.common.logs import ProgressLine


def test_progress_is_a_line_every_ten_seconds_and_the_last(caplog):
    now = [0.0]
    progress = ProgressLine(logging.getLogger("palign.test"), "truncate", pending=1000,
                            clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="palign.test"):
        for _ in range(99):  # a batch of 10 rows (1 rejected) every half second
            now[0] += 0.5
            progress.add(10, 1)
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 4  # at 10, 20, 30 and 40 s
        assert lines[0] == "truncate: 200/1000 rows (20%), 20 rejects, 20.0 rows/s, 40 s left"
        now[0] += 0.5
        progress.add(10, 0)  # the last batch: a line at once, without the time left
        assert caplog.records[-1].getMessage() == (
            "truncate: 1000/1000 rows (100%), 99 rejects, 20.0 rows/s")


def test_an_actor_line_marked_file_only_stays_out_of_the_console(tmp_path, capsys):
    from palign.common.logs import FILE_ONLY, setup_actor_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        path = setup_actor_logging("unit", tmp_path)
        log = logging.getLogger("palign.unit")
        log.info("engine ready")
        log.info("2 row(s) in flight: a .. b", extra=FILE_ONLY)
        for handler in root.handlers:
            handler.flush()
        console = capsys.readouterr().err
        assert "engine ready" in console and "in flight" not in console
        assert "in flight: a .. b" in path.read_text()
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            if handler not in saved[0]:
                handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        root._palign_log_file = None
        logging.captureWarnings(False)
