"""Final-answer extraction and matching for GSM8K and MATH-500 (experiments/answers.py).

Each case is a string a model could plausibly write; the gold answers include every distinct
form found in the real data files (checked at the end when ../shared/data is present).
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from experiments.answers import (extract_gsm8k, extract_math, gsm8k_correct, gsm8k_gold, last_boxed, last_number,
                                 math_correct, math_gold, normalize_math, parse_number)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ------------------------------------------------------------------------------------------
# \boxed{} and numbers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    (r"so the answer is \boxed{18}.", "18"),
    (r"\boxed{3} first, then \boxed{5}", "5"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"$\boxed{x^{2}+1}$", "x^{2}+1"),
    (r"\boxed 5.", "5"),
    (r"\fbox{7}", "7"),
    (r"\boxed{4} and later an unclosed \boxed{5", "4"),
    ("no box here: 42", None),
    (r"\boxed{}", ""),
])
def test_last_boxed(text, want):
    assert last_boxed(text) == want


@pytest.mark.parametrize("text, want", [
    ("She earns 1,080 dollars; 3 days.", "3"),
    ("The total is 1,080.", "1,080"),
    ("Answer: 18.", "18"),
    ("a drop of -5 degrees", "-5"),
    ("a drop of \u22125 degrees", "-5"),
    ("0.25 or .5", ".5"),
    ("nothing numeric", None),
    ("10-3=7", "7"),
])
def test_last_number(text, want):
    assert last_number(text) == want


@pytest.mark.parametrize("text, want", [
    ("1,080", Fraction(1080)), ("$18", Fraction(18)), (r"\$18.00", Fraction(18)), ("18.", Fraction(18)),
    ("-3.50", Fraction(-7, 2)), ("25%", Fraction(25)), (r"25\%", Fraction(25)), (".5", Fraction(1, 2)),
    (r"\frac{3}{4}", Fraction(3, 4)), (r"-\dfrac{3}{4}", Fraction(-3, 4)), (r"\frac34", Fraction(3, 4)),
    ("3/4", Fraction(3, 4)), (" $7$ ", Fraction(7)), ("+4", Fraction(4)), ("1{,}000", Fraction(1000)),
    ("x+1", None), (r"\sqrt{2}", None), ("3/0", None), ("", None), (None, None), ("1,0800", None),
])
def test_parse_number(text, want):
    assert parse_number(text) == want


# ------------------------------------------------------------------------------------------
# GSM8K
# ------------------------------------------------------------------------------------------


def test_gsm8k_gold():
    assert gsm8k_gold("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18") == "18"
    assert gsm8k_gold("...\n#### 1,875") == "1,875"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no marker")


@pytest.mark.parametrize("output, gold, correct", [
    (r"9 eggs at $2 each: $18. The answer is \boxed{18}.", "18", True),
    (r"\boxed{\$18.00}", "18", True),
    (r"\boxed{18 \text{ dollars}}", "18", True),
    (r"\boxed{2 \times 9 = 18}", "18", True),
    (r"Profit: \boxed{70,000}", "70000", True),
    ("He made 70,000 dollars in profit.", "70000", True),  # no box: last number
    (r"\boxed{17}, not 18", "18", False),  # the box wins over a later number
    ("I am not sure.", "18", False),
    ("The total is 1,875.", "1,875", True),
    (r"\boxed{-3}", "-3", True),
    (r"\boxed{18.5}", "18", False),
])
def test_gsm8k_extraction_and_match(output, gold, correct):
    assert gsm8k_correct(extract_gsm8k(output), gold) is correct


def test_gsm8k_gold_must_be_numeric():
    with pytest.raises(ValueError, match="not a number"):
        gsm8k_correct("3", "three")


# ------------------------------------------------------------------------------------------
# MATH-500
# ------------------------------------------------------------------------------------------


def test_math_gold():
    row = r"so $\boxed{\left( 3, \frac{\pi}{2} \right)}.$The answer is: \left( 3, \frac{\pi}{2} \right)"
    assert math_gold(row) == r"\left( 3, \frac{\pi}{2} \right)"
    assert math_gold(r"hence $\boxed{p - q}$.") == "p - q"
    with pytest.raises(ValueError, match="boxed"):
        math_gold("nothing")


@pytest.mark.parametrize("text, want", [
    (r"\dfrac{17}{50}", r"\frac{17}{50}"),
    (r"\frac12", r"\frac{1}{2}"),
    ("0.5", r"\frac{1}{2}"),
    (".35625", "0.35625"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    (r"90^\circ", "90"),
    (r"90^{\circ}", "90"),
    (r"\text{Evelyn}", "Evelyn"),
    (r"10 \text{ inches}", "10"),
    ("x = 5", "5"),
    (r"\sqrt3", r"\sqrt{3}"),
    ("3/4", r"\frac{3}{4}"),
    (r"\$5.", "5"),
    (r"p - q", "p-q"),
    (r"\boxed{7}", "7"),
    (r"5\%", "5"),
    ("y = 2x + 3", "2x+3"),
    (r"\{1,2\}", r"\{1,2\}"),
])
def test_normalize_math(text, want):
    assert normalize_math(text) == want


@pytest.mark.parametrize("output, gold, correct", [
    (r"Therefore $\boxed{\frac{14}{3}}$.", r"\frac{14}{3}", True),
    (r"\boxed{14/3}", r"\frac{14}{3}", True),
    (r"\boxed{\dfrac{17}{50}}", r"\dfrac{17}{50}", True),
    (r"\boxed{0.34}", r"\dfrac{17}{50}", True),  # equal values
    (r"\boxed{0.35625}", ".35625", True),
    (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"\boxed{288\pi}", r"288 \pi", True),
    (r"\boxed{Evelyn}", r"\text{Evelyn}", True),
    (r"The final answer is $p - q$.", "p - q", True),  # no box: after "answer is"
    (r"The answer is: 6 - 5i", "6 - 5i", True),
    (r"\boxed{6+5i}", "6 - 5i", False),
    (r"\boxed{q - p}", "p - q", False),
    ("I could not solve it.", "3", False),
    (r"\boxed{x+1}", "1+x", False),  # symbolic equivalence is not attempted (documented)
])
def test_math_extraction_and_match(output, gold, correct):
    assert math_correct(extract_math(output), gold) is correct


# ------------------------------------------------------------------------------------------
# The real data files
# ------------------------------------------------------------------------------------------


def _rows(path: Path):
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data folder is not mounted)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_every_gsm8k_gold_parses_and_matches_itself_boxed():
    for row in _rows(DATA / "gsm8k" / "test.jsonl"):
        gold = gsm8k_gold(row["answer"])
        assert parse_number(gold) is not None, gold
        assert gsm8k_correct(extract_gsm8k(f"... so \\boxed{{{gold}}}."), gold)


def test_every_math500_gold_matches_its_own_boxed_solution():
    """Extraction on the real answers: the gold after 'The answer is:' matches the solution's
    own last \\boxed{} on every row, and a boxed gold matches itself."""
    mismatches = []
    for i, row in enumerate(_rows(DATA / "math500" / "test.jsonl")):
        gold = math_gold(row["answer"])
        assert math_correct(extract_math(f"Final: \\boxed{{{gold}}}"), gold), gold
        boxed = last_boxed(row["answer"].rsplit("The answer is:", 1)[0])
        if boxed is not None and not math_correct(boxed, gold):
            mismatches.append((i, boxed, gold))
    assert mismatches == []
