"""Self-consistent action generation (SAG): sample N candidate actions in one batch, run each
in its own fork of the sandbox, drop those that fail to parse or raise, and vote.

The vote has two rounds, because outcomes that mean the same rarely read the same: first the
*kind* of outcome (a final answer, a tool call such as a search, or a computation), so that
differently worded searches do not split the vote against one candidate that skipped the
search; then, within the winning kind, the exact outcome. A tie goes to the candidate whose
output shares the most words with the others in its kind, then to the earliest candidate (the
agent puts its greedy sample first).

Unlike the reference implementation, candidates never see each other's side effects: each runs
in a fork, and the winner's fork becomes the session."""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass

from attar.runtime import prompts
from attar.runtime.answers import read_number
from attar.runtime.executor import CellResult, Executor
from attar.runtime.llm import Generation, Sampling
from attar.runtime.memory import Candidate

# SAG needs diverse candidates: the paper samples them at temperature 0.4, top-p 0.8.
SAMPLING = Sampling(temperature=0.4, top_p=0.8)


def answer_key(value: object) -> str:
    """A final answer as candidates must agree on it: a number by its value, so that 8, 8.0 and
    "8" (integer or float arithmetic, or text) are one answer; anything else by its repr."""
    # No answer is longer than 100 characters (a longer one stays text); a fraction stays text too:
    # an exact 3/4 is not the float 0.75.
    if isinstance(value, str) and len(value) <= 100 and "/" not in value:
        number = read_number(value)
        value = value if number is None else number
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        value = int(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    return repr(value).strip().lower()


def vote_key(result: CellResult) -> str:
    """What candidates must agree on: the final answer, or the observation (normalized)."""
    if result.is_final:
        return "final:" + answer_key(result.final_answer)
    stdout = "\n".join(line.rstrip() for line in result.stdout.strip().splitlines())
    return f"obs:{stdout}\x00{result.output}"


def outcome_kind(result: CellResult) -> str:
    if result.is_final:
        return "final"
    return "tool" if any(name != "final_answer" for name in result.tools_called) else "compute"


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def vote(kinds: list[str | None], keys: list[str | None]) -> int | None:
    """The winning candidate's index (None when no candidate ran cleanly); see the module doc."""
    valid = [i for i, k in enumerate(keys) if k is not None]
    if not valid:
        return None
    kind_votes = Counter(kinds[i] for i in valid)
    top = max(kind_votes.values())
    kind = next(kinds[i] for i in valid if kind_votes[kinds[i]] == top)  # ties: the earliest candidate's kind
    members = [i for i in valid if kinds[i] == kind]
    key_votes = Counter(keys[i] for i in members)
    words = {i: _words(keys[i]) for i in members}

    def agreement(i: int) -> float:  # how much of the others' outcomes this one shares
        # fsum: candidates with equal outcomes sum the same terms in another order, and a plain sum's
        # rounding would then break their tie at random instead of for the earliest (the greedy one)
        return math.fsum(len(words[i] & words[j]) / max(1, len(words[i] | words[j])) for j in members if j != i)

    return max(members, key=lambda i: (key_votes[keys[i]], agreement(i), -i))


@dataclass
class Outcome:
    winner: int | None  # index into candidates, None when every candidate failed
    result: CellResult | None
    sandbox: Executor | None  # the winner's fork; the caller adopts it
    candidates: list[Candidate]
    seconds: float


def run_candidates(session: Executor, generations: list[Generation], codes: list[str | None]) -> Outcome:
    """Run each valid, distinct candidate in a fork of `session` (duplicates run once), then vote."""
    began = time.perf_counter()
    candidates = [Candidate(model_output=prompts.as_written(g.text, g.stopped_by), code=c) for g, c in zip(generations, codes)]
    results: dict[str, tuple[CellResult, Executor]] = {}  # code -> outcome
    kinds: list[str | None] = []
    for cand in candidates:
        if cand.code is None:
            cand.error = prompts.PARSE_ERROR
            kinds.append(None)
            continue
        if cand.code not in results:
            fork = session.fork()
            results[cand.code] = (fork.run(cand.code), fork)
        result, _ = results[cand.code]
        if result.error is not None:
            cand.error = result.error
            kinds.append(None)
            continue
        cand.observation = result.stdout + ("" if result.output is None else result.output)
        cand.vote_key = vote_key(result)
        kinds.append(outcome_kind(result))
    keys = [c.vote_key for c in candidates]
    counts = Counter(k for k in keys if k is not None)
    for cand in candidates:
        cand.votes = counts.get(cand.vote_key, 0) if cand.vote_key else 0
    winner = vote(kinds, keys)
    result, kept = results[candidates[winner].code] if winner is not None else (None, None)
    for _, fork in results.values():
        if fork is not kept:
            fork.close()
    return Outcome(winner, result, kept, candidates, time.perf_counter() - began)
