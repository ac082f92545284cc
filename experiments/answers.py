"""Final answers of GSM8K and MATH-500: extraction from model outputs, normalisation, matching.

Gold answers (the data files of ../shared/data, see its README):
  * GSM8K `answer`: the text after the last "####" (an integer, sometimes with thousands
    commas: "1,875").
  * MATH-500 `answer`: the worked solution, ending in "The answer is: <final answer>"; the
    text after the last "The answer is:" is the gold (the solution's last \\boxed{} when that
    phrase is missing).

Predictions (model outputs; the prompt asks for the final answer in \\boxed{}):
  * GSM8K: the content of the last \\boxed{...} (braces balanced; also \\boxed 5, \\fbox{...})
    if there is one, else the whole text; in it, the whole string if it is a number, else its
    last number. No number: no answer (wrong).
  * MATH: the content of the last \\boxed{...}; else the text after the last "answer is"
    (e.g. "The final answer is $x^2$.") up to the end of its line; else no answer (wrong).

Matching (exact final-answer match after normalisation):
  * numbers: "$1,080.00", "1080", "1080." and "\\frac{2160}{2}" are all 1080; they are parsed
    to exact fractions (`parse_number`): signs, a "$" / "\\$" prefix, thousands commas, decimals,
    a trailing "%", \\frac{a}{b} / \\dfrac / \\tfrac, a/b, and "\\frac12". GSM8K compares numbers
    only.
  * MATH: `normalize_math` (in the spirit of the MATH benchmark's own normaliser, Hendrycks et
    al. 2021): drops spaces, \\left / \\right, \\! \\, \\; spacing, "^\\circ", "\\$", a trailing
    ".", "\\text{units}" after a value, unwraps \\text{..} / \\mbox / \\mathrm, writes \\dfrac /
    \\tfrac as \\frac, adds the braces of "\\frac12" and "\\sqrt3", a leading 0 to ".5", turns
    "a/b" of integers into \\frac{a}{b} and drops a short "x =" prefix. Two answers match when
    the normalised strings are equal, or both parse as numbers of equal value.
    Symbolic equivalence (e.g. "x+1" vs "1+x") is not attempted: such matches count as wrong.
"""

from __future__ import annotations

import re
from fractions import Fraction

# ----------------------------------------------------------------------------------------------
# Gold answers
# ----------------------------------------------------------------------------------------------


def gsm8k_gold(answer: str) -> str:
    """The final answer of a GSM8K `answer` field: the text after the last '####'."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####' final-answer marker: {answer[-80:]!r}")
    return answer.rsplit("####", 1)[1].strip()


def math_gold(answer: str) -> str:
    """The final answer of a MATH-500 `answer` field (after 'The answer is:', else last box)."""
    if "The answer is:" in answer:
        return answer.rsplit("The answer is:", 1)[1].strip()
    boxed = last_boxed(answer)
    if boxed is None:
        raise ValueError(f"MATH answer has neither 'The answer is:' nor \\boxed{{}}: {answer[-80:]!r}")
    return boxed


# ----------------------------------------------------------------------------------------------
# Extraction from model outputs
# ----------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} of `text` (nested braces kept), or of a
    brace-less "\\boxed 5"; None if there is none or the last one is never closed."""
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    for start in reversed(starts):
        if start < len(text) and text[start] == "{":
            depth = 0
            for i in range(start, len(text)):
                if text[i] == "{":
                    depth += 1
                elif text[i] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[start + 1 : i].strip()
            continue  # unclosed: try an earlier box
        m = re.match(r"[^\s$]+", text[start:])
        if m:
            return m.group(0).rstrip(".")
    return None


# A number: thousands-grouped or plain digits, optional decimals; or a bare decimal (".5").
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def last_number(text: str) -> str | None:
    """The last number written in `text` ("1,080" kept whole; "18." gives "18"), or None."""
    text = text.replace("\u2212", "-")
    found = _NUMBER_RE.findall(text)
    return found[-1] if found else None


def extract_gsm8k(text: str) -> str | None:
    """A GSM8K prediction: last \\boxed{} content if it is a number (else its last number),
    else the last number of the whole text; None if there is no number."""
    boxed = last_boxed(text)
    scope = text if boxed is None else boxed
    if boxed is not None and parse_number(boxed) is not None:
        return boxed
    return last_number(scope)


_ANSWER_IS_RE = re.compile(r"answer is[:\s]*(.+)", re.IGNORECASE)


def extract_math(text: str) -> str | None:
    """A MATH prediction: last \\boxed{} content, else what follows the last 'answer is'."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    found = _ANSWER_IS_RE.findall(text)
    if not found:
        return None
    ans = found[-1].strip()
    if ans.startswith("$") and ans.count("$") >= 2:
        ans = ans[1 : ans.index("$", 1)]
    return ans.strip().rstrip(".").strip() or None


# ----------------------------------------------------------------------------------------------
# Normalisation and comparison
# ----------------------------------------------------------------------------------------------

_FRAC_RE = re.compile(r"^(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}$")
_SLASH_RE = re.compile(r"^(-?[\d.]+)/(-?[\d.]+)$")


def _plain_number(s: str) -> Fraction | None:
    s = s.strip()
    if not s:
        return None
    if re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|-?\.\d+", s):
        try:
            return Fraction(s.replace(",", "").rstrip("."))
        except (ValueError, ZeroDivisionError):
            return None
    return None


def parse_number(s: str | None) -> Fraction | None:
    """The exact value of a number written plainly or as a simple fraction, else None.

    Accepts "1,080", "-3.50", "$18", "\\$18.00", "25%" (as 25), ".5", "\\frac{3}{4}",
    "-\\dfrac{3}{4}", "\\frac34", "3/4", with surrounding spaces, "$...$" or a final ".".
    """
    if s is None:
        return None
    t = s.strip().replace("\u2212", "-")
    t = t.strip("$").strip()
    t = re.sub(r"\\text\{\s*\}", "", t)
    t = t.replace("\\$", "").replace("$", "").replace("\\!", "").replace("\\,", "").replace("{,}", ",")
    t = t.replace("\\%", "").replace("%", "").replace(" ", "").rstrip(".")
    t = t.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    t = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", t)
    t = re.sub(r"\\frac\{([^{}]*)\}(\d)$", r"\\frac{\1}{\2}", t)
    if t.startswith("+"):
        t = t[1:]
    if t.startswith("-") and t[1:2] == "$":
        t = "-" + t[2:]
    value = _plain_number(t)
    if value is not None:
        return value
    for m in (_FRAC_RE.match(t), _SLASH_RE.match(t)):
        if m is None:
            continue
        groups = m.groups()
        sign = -1 if len(groups) == 3 and groups[0] == "-" else 1
        num, den = _plain_number(groups[-2]), _plain_number(groups[-1])
        if num is None or den is None or den == 0:
            return None
        return sign * num / den
    return None


def _unwrap(s: str, command: str) -> str:
    """Replace every \\command{X} by X (braces balanced)."""
    out, i, key = [], 0, "\\" + command + "{"
    while True:
        j = s.find(key, i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:j])
        depth, k = 0, j + len(key) - 1
        while k < len(s):
            if s[k] == "{":
                depth += 1
            elif s[k] == "}":
                depth -= 1
                if depth == 0:
                    break
            k += 1
        out.append(s[j + len(key) : k])
        i = k + 1


def _fix_fracs(s: str) -> str:
    """'\\frac12' -> '\\frac{1}{2}', '\\frac1{2}' -> '\\frac{1}{2}', '\\frac{1}2' -> '\\frac{1}{2}'."""
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    return s


def normalize_math(s: str | None) -> str:
    """A canonical string of a MATH final answer (see the module doc); '' for None."""
    if s is None:
        return ""
    t = s.strip().replace("\u2212", "-").replace("\n", "")
    if t.startswith("$") and t.endswith("$") and len(t) > 1:
        t = t.strip("$")
    t = t.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "").replace("\\ ", "")
    t = t.replace("\\\\", "\\")
    t = t.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    t = t.replace("\\left", "").replace("\\right", "")
    t = t.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\circ", "").replace("°", "")
    t = t.replace("\\$", "").replace("$", "")
    # units: "5 \text{ cm}" -> "5" (a \text{...} that follows a value and ends the answer)
    m = re.match(r"^(.*\S)\s*\\(?:text|mbox|mathrm)\{\s+[^{}]*\}$", t)
    if m:
        t = m.group(1)
    for command in ("text", "textbf", "mbox", "mathrm", "mathbf", "boxed"):
        t = _unwrap(t, command)
    t = t.replace("\\%", "").replace("%", "")
    t = t.replace(" .", " 0.").replace("{.", "{0.")
    t = t.replace(" ", "")
    if t.startswith("."):
        t = "0" + t
    t = t.rstrip(".")
    # "x=5", "k = 3": keep the value when the name before '=' is short
    if t.count("=") == 1 and len(t.split("=")[0]) <= 2:
        t = t.split("=")[1]
    t = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", t)
    t = _fix_fracs(t)
    m = _SLASH_RE.match(t)
    if m and "." not in t:
        t = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    if t == "0.5":
        t = "\\frac{1}{2}"
    return t


def gsm8k_correct(prediction: str | None, gold: str) -> bool:
    """Equal numeric values (prediction from `extract_gsm8k`, gold from `gsm8k_gold`)."""
    p, g = parse_number(prediction), parse_number(gold)
    if g is None:
        raise ValueError(f"GSM8K gold answer {gold!r} is not a number.")
    return p is not None and p == g


def math_correct(prediction: str | None, gold: str) -> bool:
    """Equal normalised strings, or equal numeric values (see the module doc)."""
    if prediction is None:
        return False
    a, b = normalize_math(prediction), normalize_math(gold)
    if a and a == b:
        return True
    pa, pb = parse_number(a), parse_number(b)
    return pa is not None and pb is not None and pa == pb


EXTRACT = {"gsm8k": extract_gsm8k, "math500": extract_math}
GOLD = {"gsm8k": gsm8k_gold, "math500": math_gold}
CORRECT = {"gsm8k": gsm8k_correct, "math500": math_correct}
