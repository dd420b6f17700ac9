"""Reading an answer out of model text: the one rule the agent, the teacher and the scorers share."""

from __future__ import annotations

import math
import re
from fractions import Fraction

# A number as models write one: 12, -0.5, .5, 12., 3/4, 1.2e+08 (how Python prints large floats).
NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?(?:/\d+)?")
_INTEGER = re.compile(r"[-+]?\d+")


def read_number(text: str) -> int | float | None:
    """The number `text` writes (all of it, NUMBER): an integer exactly, a fraction by its value,
    an exponent by float(), which never builds 10**e (a model may write 1e99999999); ±inf past a
    float's range; None when the text is not one number (or int() refuses its 4,300+ digits)."""
    text = text.strip()
    if not NUMBER.fullmatch(text):
        return None
    try:
        if _INTEGER.fullmatch(text):
            return int(text)
        return float(text) if "e" in text.lower() else float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        return None
    except OverflowError:  # more digits than a float holds
        return -math.inf if text.startswith("-") else math.inf


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed")
    if start == -1:
        return None
    i = text.find("{", start)
    if i == -1:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None
