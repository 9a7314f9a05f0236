"""The driver's progress line off a terminal: few lines however many batches, always the last."""

import logging

from palign.core.logs import ProgressLine


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
