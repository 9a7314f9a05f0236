"""Tests for palign.method.segment: exact sentences for each rule, plus offset invariants."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palign.method.segment import prefix, sentence_ends


def sentences(text: str) -> list[str]:
    ends = sentence_ends(text)
    return [text[a:b] for a, b in zip([0, *ends[:-1]], ends)]


def check_invariants(text: str) -> None:
    ends = sentence_ends(text)
    if not text.strip():
        assert ends == []
        return
    assert all(a < b for a, b in zip(ends, ends[1:]))
    assert 0 < ends[0] and ends[-1] == len(text)
    parts = sentences(text)
    assert "".join(parts) == text
    assert all(part.strip() for part in parts)
    for k in range(1, len(ends) + 1):
        head = prefix(text, ends, k)
        assert head == text[: ends[k - 1]]
        assert text.startswith(head)


# --- explicit rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("   \n\t  ", []),
        ("just some words with no punctuation", ["just some words with no punctuation"]),
        ("a line without punctuation\nand more", ["a line without punctuation\nand more"]),
        ("One. Two.", ["One.", " Two."]),
        ("Done.", ["Done."]),
        ("Done.  \n ", ["Done.  \n "]),
        ("  Leading space. Next one", ["  Leading space.", " Next one"]),
    ],
)
def test_basic(text: str, expected: list[str]) -> None:
    assert sentences(text) == expected


def test_question_and_exclamation() -> None:
    text = "Is x even? Yes! It is 4?! Wow."
    assert sentences(text) == ["Is x even?", " Yes!", " It is 4?!", " Wow."]


def test_lowercase_after_period_on_same_line_is_not_a_cut() -> None:
    assert sentences("We take x = 2. then y follows.") == ["We take x = 2. then y follows."]


def test_factorial_is_not_a_cut() -> None:
    text = "We have 5! = 120 ways. So 3! is 6."
    assert sentences(text) == ["We have 5! = 120 ways.", " So 3! is 6."]


def test_decimals() -> None:
    text = "Pi is about 3.14. Half is 0.5 and .25 is a quarter. The total is 12.0."
    assert sentences(text) == [
        "Pi is about 3.14.",
        " Half is 0.5 and .25 is a quarter.",
        " The total is 12.0.",
    ]


def test_sentence_ending_in_a_number() -> None:
    assert sentences("So x equals 3. Then y is 4.") == ["So x equals 3.", " Then y is 4."]


def test_numbered_steps_stay_with_their_item() -> None:
    text = "Plan:\n1. Compute the sum. Then halve it.\n2. Check it.\n3) Report it"
    assert sentences(text) == [
        "Plan:",
        "\n1. Compute the sum.",
        " Then halve it.",
        "\n2. Check it.",
        "\n3) Report it",
    ]


def test_step_markers() -> None:
    text = "Step 1. Find x. Step 2. Find y.\nStep 3. Add them."
    assert sentences(text) == ["Step 1. Find x.", " Step 2. Find y.", "\nStep 3. Add them."]


def test_numbered_item_at_start_of_text_and_dotted_numbers() -> None:
    assert sentences("1. First thing.\n2.1. A sub-step here.") == [
        "1. First thing.",
        "\n2.1. A sub-step here.",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Use a prime, e.g. 7 works. Next.", ["Use a prime, e.g. 7 works.", " Next."]),
        ("Take the root, i.e. Two is it. Next.", ["Take the root, i.e. Two is it.", " Next."]),
        ("Add 1, 2, 3, etc. The pattern holds.", ["Add 1, 2, 3, etc. The pattern holds."]),
        ("Compare A vs. B now. Done.", ["Compare A vs. B now.", " Done."]),
        (
            "Dr. Smith and Mr. Jones met Mrs. Lee. Then left.",
            [
                "Dr. Smith and Mr. Jones met Mrs. Lee.",
                " Then left.",
            ],
        ),
        (
            "See Fig. 2 and Eq. 5 for this. Also cf. Thm. 3.",
            [
                "See Fig. 2 and Eq. 5 for this.",
                " Also cf. Thm. 3.",
            ],
        ),
        (
            "It is approx. 3 units, resp. 4 units. Fine.",
            [
                "It is approx. 3 units, resp. 4 units.",
                " Fine.",
            ],
        ),
        (
            "Item No. 5 is red. The answer is no. Next.",
            [
                "Item No. 5 is red.",
                " The answer is no.",
                " Next.",
            ],
        ),
    ],
)
def test_abbreviations(text: str, expected: list[str]) -> None:
    assert sentences(text) == expected


def test_inline_math() -> None:
    text = "We get $x = 1.5. Y$ here. Also \\(a. B\\) holds. Then $y$. Next."
    assert sentences(text) == [
        "We get $x = 1.5. Y$ here.",
        " Also \\(a. B\\) holds.",
        " Then $y$.",
        " Next.",
    ]


def test_dollar_amounts_are_not_math() -> None:
    text = "It costs $5. Then $10 more. Fine."
    assert sentences(text) == ["It costs $5.", " Then $10 more.", " Fine."]


def test_escaped_dollar() -> None:
    assert sentences("Pay \\$3. Then \\$4. Done.") == ["Pay \\$3.", " Then \\$4.", " Done."]


def test_display_math() -> None:
    text = (
        "We compute\n$$\nx = 1. Y = 2.\n\nZ = 3\n$$\nwhich is fine. "
        "Also\n\\[\na. B\n\\]\nholds. Finally \\[ z = 2. \\]\nThen done."
    )
    assert sentences(text) == [
        "We compute\n$$\nx = 1. Y = 2.\n\nZ = 3\n$$\nwhich is fine.",
        " Also\n\\[\na. B\n\\]\nholds.",
        " Finally \\[ z = 2. \\]",
        "\nThen done.",
    ]


def test_period_after_closing_math_is_a_cut() -> None:
    text = "So $x = 2$. Then \\[ y = 3 \\]. Next"
    assert sentences(text) == ["So $x = 2$.", " Then \\[ y = 3 \\].", " Next"]


def test_environment_is_protected() -> None:
    text = "Then\n\\begin{align}\na. B &= 1. C\n\\end{align}\nholds. Done."
    assert sentences(text) == ["Then\n\\begin{align}\na. B &= 1. C\n\\end{align}\nholds.", " Done."]


def test_boxed() -> None:
    text = "The answer is \\boxed{3.5. Or {4. X}}. Done. Also \\boxed{x}"
    assert sentences(text) == [
        "The answer is \\boxed{3.5. Or {4. X}}.",
        " Done.",
        " Also \\boxed{x}",
    ]


def test_unmatched_openers_are_plain_text() -> None:
    text = "A stray \\[ here. And \\boxed{ there. Fine."
    assert sentences(text) == ["A stray \\[ here.", " And \\boxed{ there.", " Fine."]


def test_blank_lines_always_cut() -> None:
    text = "First paragraph without a period\n\nSecond one.  \n \n\nThird"
    assert sentences(text) == [
        "First paragraph without a period",
        "\n\nSecond one.",
        "  \n \n\nThird",
    ]


def test_bullet_lists() -> None:
    text = "We check\n- the first case\n* the second case\n  • a nested one\nand that is all"
    assert sentences(text) == [
        "We check",
        "\n- the first case",
        "\n* the second case",
        "\n  • a nested one\nand that is all",
    ]


def test_markdown_heading_starts_a_sentence() -> None:
    assert sentences("Intro text\n## Step 2\nMore text") == ["Intro text", "\n## Step 2\nMore text"]


def test_newline_after_punctuation_or_colon_is_a_cut() -> None:
    text = "First line.\nsecond line: yes\nthird line:\nfourth line\nfifth"
    assert sentences(text) == [
        "First line.",
        "\nsecond line: yes\nthird line:",
        "\nfourth line\nfifth",
    ]


def test_single_newline_inside_prose_is_not_a_cut() -> None:
    assert sentences("This sentence wraps\nonto a second line. Next.") == [
        "This sentence wraps\nonto a second line.",
        " Next.",
    ]


def test_ellipsis() -> None:
    text = "Wait... Let me think… so 1, 2, ..., 10 works... and then... Done."
    assert sentences(text) == [
        "Wait...",
        " Let me think… so 1, 2, ..., 10 works... and then...",
        " Done.",
    ]


def test_ellipsis_before_a_number_is_not_a_cut() -> None:
    assert sentences("Count 1, 2, 3, ... 10 now.") == ["Count 1, 2, 3, ... 10 now."]


def test_closing_quotes_and_brackets_stay_with_the_sentence() -> None:
    text = 'He said "stop." Then left. (See Fig. 2.) Next'
    assert sentences(text) == ['He said "stop."', " Then left.", " (See Fig. 2.)", " Next"]


def test_prefix() -> None:
    text = "One. Two.\n\nThree"
    ends = sentence_ends(text)
    assert ends == [4, 9, len(text)]
    assert [prefix(text, ends, k) for k in (1, 2, 3)] == ["One.", "One. Two.", text]
    with pytest.raises(ValueError):
        prefix(text, ends, 0)
    with pytest.raises(ValueError):
        prefix(text, ends, 4)


@pytest.mark.parametrize(
    "text",
    ["a $b " * 20000, "\\boxed{ x. " * 10000, "\\( y. " * 20000, "$a\n\n" * 20000, "1." * 50000],
)
def test_unmatched_openers_stay_linear(text: str) -> None:
    start = time.perf_counter()
    check_invariants_cheap(text)
    assert time.perf_counter() - start < 5.0


def check_invariants_cheap(text: str) -> None:
    ends = sentence_ends(text)
    assert ends[-1] == len(text)
    assert all(a < b for a, b in zip(ends, ends[1:]))


# --- a realistic chain of thought -----------------------------------------------------------

COT = (
    "We need the total cost of 3 notebooks at $2.50 each and 2 pens at $0.75 each. "
    "Let me set this up carefully.\n"
    "\n"
    "First, the notebooks cost $3 \\times 2.50 = 7.50$ dollars. "
    "Then the pens cost $2 \\times 0.75 = 1.50$ dollars.\n"
    "\n"
    "So the plan is:\n"
    "1. Add the two subtotals.\n"
    "2. Apply the 10% discount, i.e. multiply by 0.9.\n"
    "3. Round to the nearest cent.\n"
    "\n"
    "Adding gives\n"
    "\\[\n"
    "7.50 + 1.50 = 9.00.\n"
    "\\]\n"
    "Wait... is the discount applied before tax? "
    "The problem says nothing about tax, so no.\n"
    "\n"
    "Now $9.00 \\times 0.9 = 8.10$. "
    "Checking: $8.10 / 0.9 = 9$, which matches! "
    "Each value is within the stated bounds.\n"
    "\n"
    "Therefore the answer is $\\boxed{8.10}$."
)


def test_realistic_cot() -> None:
    parts = sentences(COT)
    assert len(parts) == 15
    assert parts[0] == (
        "We need the total cost of 3 notebooks at $2.50 each and 2 pens at $0.75 each."
    )
    assert parts[5] == "\n1. Add the two subtotals."
    assert parts[6] == "\n2. Apply the 10% discount, i.e. multiply by 0.9."
    assert parts[8] == "\n\nAdding gives\n\\[\n7.50 + 1.50 = 9.00.\n\\]"
    assert parts[9] == "\nWait... is the discount applied before tax?"
    assert parts[-1] == "\n\nTherefore the answer is $\\boxed{8.10}$."
    check_invariants(COT)


# --- properties -----------------------------------------------------------------------------

FRAGMENTS = [
    "The value is 3.14.",
    "Then x = 2.",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\n \n",
    "\t",
    "\r\n",
    "1. ",
    "2) ",
    "Step 3. ",
    "- ",
    "* ",
    "• ",
    "## ",
    "e.g. ",
    "i.e. ",
    "etc.",
    "No. 4",
    "$x = 0.5$",
    "$",
    "$$",
    "$$\na. B\n$$",
    "\\[ y. \\]",
    "\\[",
    "\\]",
    "\\(z.\\)",
    "\\(",
    "\\boxed{2.5}",
    "\\boxed{",
    "{",
    "}",
    "\\$5",
    "\\",
    "...",
    "…",
    "Why?",
    "Wow!",
    "?!",
    ":",
    '"',
    ")",
    "word",
    "So",
    "x",
    "0.5",
    "Next.",
    ".",
    "\\begin{align}a. B\\end{align}",
]

grammar_text = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=40
).map("".join)
odd_text = st.text(alphabet=st.sampled_from(list(" \t\n\r.!?…:$\\{}()[]\"'*-•#1aB\u2028\x85")))


@settings(max_examples=400)
@given(st.text())
def test_invariants_on_arbitrary_text(text: str) -> None:
    check_invariants(text)


@settings(max_examples=400)
@given(grammar_text)
def test_invariants_on_grammar_text(text: str) -> None:
    check_invariants(text)


@settings(max_examples=400)
@given(odd_text)
def test_invariants_on_punctuation_heavy_text(text: str) -> None:
    check_invariants(text)


@given(st.lists(st.sampled_from(["One.", "Two?", "Three!", "Four is 4.5."]), min_size=1))
def test_plain_sentences_are_each_one_sentence(words: list[str]) -> None:
    text = " ".join(words)
    assert sentences(text) == [words[0]] + [" " + w for w in words[1:]]
