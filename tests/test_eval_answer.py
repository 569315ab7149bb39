"""Answer-letter extraction: the reply shapes small models produce, and unparseable → None."""

import pytest

from eval.answer import extract_letter, strip_letter_prefix
from videollm.data.prompts import format_options

OPTIONS = ["red circle", "blue square", "green triangle", "dark red circle"]

# (reply, expected letter or None). Options as in OPTIONS.
CASES = [
    ("B", "B"),
    ("b", "B"),
    ("(B)", "B"),
    ("B.", "B"),
    ("[C]", "C"),
    (" C \n", "C"),
    ("B) blue square", "B"),
    ("B. blue square", "B"),
    ("(B) blue square", "B"),
    ("C: green triangle", "C"),
    ("The answer is B", "B"),
    ("The answer is B.", "B"),
    ("The correct answer is (C).", "C"),
    ("Answer: B", "B"),
    ("answer: d", "D"),
    ("Option C", "C"),
    ("**B**", "B"),
    ("**B.** blue square", "B"),
    ("<think>maybe A</think>The answer is C", "C"),
    ("I think (D) is the one.", "D"),
    ("blue square", "B"),
    ("It is a blue square.", "B"),
    ("The dark red circle", "D"),  # "red circle" is inside "dark red circle": the longer wins
    ("B blue square", "B"),
    ("Best option: (A", "A"),
    # unparseable or ambiguous → None, never a guess
    ("", None),
    ("   ", None),
    ("I don't know.", None),
    ("A or B", None),
    ("(A) and (C) both fit", None),
    ("E", None),  # outside the four options
    ("The answer is a purple star", None),  # "a" is an article here, not option A
    ("red circle or blue square", None),
]


@pytest.mark.parametrize("reply, expected", CASES)
def test_reply_shapes(reply, expected):
    assert extract_letter(reply, OPTIONS) == expected


def test_table_is_large_enough():
    assert len(CASES) >= 20


def test_five_options_allow_e_and_default_is_four():
    assert extract_letter("E", num_options=5) == "E"
    assert extract_letter("E") is None
    assert extract_letter("(e)", ["a", "b", "c", "d", "e"]) == "E"


def test_strip_and_format_options():
    assert strip_letter_prefix("A. A dog runs") == "A dog runs"
    assert strip_letter_prefix("(C) cat") == "cat"
    assert strip_letter_prefix("A dog runs") == "A dog runs"
    assert format_options(["x", "y"]) == "A. x\nB. y"
