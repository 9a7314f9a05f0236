import math

import pytest

from palign.method.verdict import enough_probability, parse_verdict, verdict_from_score


@pytest.mark.parametrize("reply,expected", [
    ("ENOUGH", "ENOUGH"),
    ("NOT_ENOUGH", "NOT_ENOUGH"),
    ("  enough.", "ENOUGH"),
    ("Not enough - the key step is missing", "NOT_ENOUGH"),
    ("**NOT-ENOUGH**", "NOT_ENOUGH"),
    ("notenough", "NOT_ENOUGH"),
    ("Answer: `ENOUGH`", "ENOUGH"),
    ("The draft is sufficient.", "ENOUGH"),
    ("It is insufficient", "NOT_ENOUGH"),
    ("ENOUGH, although one might say not enough", "ENOUGH"),
    ("NOT ENOUGH. With more it would be enough", "NOT_ENOUGH"),
    ("I think we should continue with step 3", "UNPARSED"),
    ("", "UNPARSED"),
    ("ENOUGHS of that", "UNPARSED"),
])
def test_parse_noisy_replies(reply, expected):
    assert parse_verdict(reply) == expected


def test_enough_probability_renormalises_the_two_labels():
    assert enough_probability(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
    assert enough_probability(-1000.0, -1001.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert enough_probability(float("-inf"), float("-inf")) == 0.5
    assert verdict_from_score(0.5, 0.5) == "ENOUGH"
    assert verdict_from_score(0.49, 0.5) == "NOT_ENOUGH"
