"""What the student learns from: the teacher's prefix between draft markers, then the student's
own ending. The markers are also how the reports find the prefix in a trained model's answer
(``palign.report.scores``)."""

from __future__ import annotations

BEGIN_DRAFT = "<Begin_of_Draft>"
END_DRAFT = "<End_of_Draft>"


def training_target(prefix: str, continuation: str) -> str:
    """The assistant turn the student learns: the teacher's prefix, then its own ending."""
    return f"{BEGIN_DRAFT}{prefix}{END_DRAFT}\n{continuation}"
