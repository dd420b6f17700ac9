"""Is an answer right? Numeric answers by value, math answers by normalized LaTeX (and value when
both sides evaluate), factual answers by normalized exact match or token F1 (SQuAD style).
Pure Python: the runtime's eval harness and the benches use it without torch."""

from __future__ import annotations

import logging
import math
import re
import string
from collections import Counter
from enum import Enum
from fractions import Fraction
from typing import Any, Callable

from attar.runtime.answers import NUMBER, extract_boxed, read_number
from attar.runtime.memory import Finish

F1_THRESHOLD = 0.8


def to_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip().replace("\u2212", "-")  # a typeset minus sign
    text = extract_boxed(text) or text
    text = re.sub(r"\\text\{[^}]*\}|\\!|\\,|\$|,(?=\d{3})|%|\\%", "", text).strip()
    frac = re.fullmatch(r"-?\\d?frac\{(-?\d+)\}\{(-?\d+)\}", text.replace("\\dfrac", "\\frac").replace("-\\frac", "\\frac"))
    if frac:
        sign = -1 if text.startswith("-") else 1
        return sign * float(Fraction(int(frac.group(1)), int(frac.group(2))))
    number = read_number(text)
    if number is None:  # not one number: the last one it writes
        numbers = NUMBER.findall(text)
        number = read_number(numbers[-1]) if numbers else None
    if number is None:
        return None
    try:
        return float(number)
    except OverflowError:  # an integer of more digits than a float holds
        return math.inf if number > 0 else -math.inf


def numeric_match(prediction: Any, gold: Any) -> bool:
    """Equal up to float noise, or to the cent where the gold has a fraction (students round money).
    No wider tolerance: GSM-Hard's answers run to 10^8, where a relative 1e-4 let an answer off by
    hundreds count as right."""
    a, b = to_number(prediction), to_number(gold)
    if a is None or b is None:
        return False
    if not (math.isfinite(a) and math.isfinite(b)):
        return a == b
    if abs(a - b) <= 1e-9 * max(1.0, abs(b)):
        return True
    return b != int(b) and abs(b) >= 1 and round(a, 2) == round(b, 2)


def normalize_latex(text: Any) -> str:
    text = str(text).strip()
    text = extract_boxed(text) or text
    text = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\ |\$|\s+", "", text)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("^\\circ", "").replace("^{\\circ}", "")
    text = re.sub(r"\\text\{([^}]*)\}", r"\1", text)
    return text.rstrip(".").lower()


# Answers whose value sympy would compute before comparing, and which no machine holds: a power
# whose exponent holds another power ("9^{9^{9}}", nine characters, filled 24 GB), a power or a
# factorial of a number of five digits or more. Model output decides what gets parsed.
HUGE = re.compile(r"\^\s*\{[^{}]*\^|\^\s*\(?\s*\d+\s*\)?\s*\^|\^\s*[{(]?\s*-?\d{5,}|\d{5,}\s*!")


def math_match(prediction: Any, gold: Any) -> bool:
    """Symbolic equivalence with math-verify (attar[distill]); normalized LaTeX without it."""
    if normalize_latex(prediction) == normalize_latex(gold):
        return True
    try:
        from math_verify import parse, verify
    except ImportError:
        return numeric_match(prediction, gold) and re.fullmatch(r"-?[\d.,/]+", normalize_latex(gold)) is not None
    # sympy on a long expression can run for minutes, on a huge number without end; no answer is either.
    text = str(prediction)
    if len(text) > 300 or HUGE.search(text):
        return False
    # Timeouts off: they use SIGALRM, which only works in the main thread (generation runs in many);
    # math-verify warns about that once per process, which would interleave with progress bars.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    wrap = lambda x: f"${extract_boxed(str(x)) or x}$"  # noqa: E731
    return verify(parse(wrap(gold), parsing_timeout=None), parse(wrap(prediction), parsing_timeout=None),
                  timeout_seconds=None)


def normalize_text(text: Any) -> str:
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1(prediction: Any, gold: Any) -> float:
    p, g = normalize_text(prediction).split(), normalize_text(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def factual_match(prediction: Any, gold: Any) -> bool:
    p, g = normalize_text(prediction), normalize_text(gold)
    # The gold inside a short answer counts, as whole words only: "Rome" is not in "Romeo".
    return bool(g) and (p == g or f1(prediction, gold) >= F1_THRESHOLD
                        or (len(g) > 3 and f" {g} " in f" {p} " and len(p) < 4 * len(g)))


def score(prediction: Any, gold: Any, kind: str) -> bool:
    """kind: "numeric" (GSM), "math" (MATH, LaTeX) or "factual" (HotpotQA and the demo world)."""
    if prediction is None:
        return False
    if kind == "numeric":
        return numeric_match(prediction, gold)
    if kind == "math":
        return math_match(prediction, gold)
    return factual_match(prediction, gold) or numeric_match(prediction, gold)


class Outcome(str, Enum):
    """How an agent run on a question with a known answer went: the one classification that
    evaluation, the teacher's filter, the oracle and the benches share."""

    CORRECT = "correct"
    WRONG_ANSWER = "wrong_answer"  # it called final_answer with a wrong answer
    PARSE_ERROR = "parse_error"  # out of steps; its last action had no code block
    EXECUTION_ERROR = "execution_error"  # out of steps; its last action's code failed
    MAX_STEPS = "max_steps"  # out of steps otherwise (or interrupted)

    def __str__(self) -> str:
        return self.value


def score_run(result, gold: Any, kind: str, judge: Callable[[Any], bool] | None = None) -> Outcome:
    """The outcome of an agent's RunResult against `gold`. `judge` gets a second say on a final
    answer the rules call wrong (the paper's LLM judge for factual answers)."""
    if result.finished_by == Finish.FINAL_ANSWER:
        right = score(result.answer, gold, kind) or (judge is not None and judge(result.answer))
        return Outcome.CORRECT if right else Outcome.WRONG_ANSWER
    last_action = next((s for s in reversed(result.steps) if not s.is_fallback), None)
    if last_action is not None and last_action.code is None:
        return Outcome.PARSE_ERROR
    if last_action is not None and last_action.error:
        return Outcome.EXECUTION_ERROR
    return Outcome.MAX_STEPS


def kind_of(dataset_name: str) -> str:
    name = dataset_name.lower()
    if "gsm" in name:
        return "numeric"
    if "math" in name or "aime" in name:
        return "math"
    return "factual"
