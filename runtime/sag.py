"""Self-consistent action generation (SAG): sample N candidate actions in one batch, run each
in its own fork of the sandbox, drop those that fail to parse or raise, and keep the action
whose outcome the majority agrees on (ties go to the first valid candidate in sample order).

Unlike the reference implementation, candidates never see each other's side effects: each runs
in a fork, and the winner's fork becomes the session."""

from __future__ import annotations

import time
from dataclasses import dataclass

from attar.runtime.llm import Generation
from attar.runtime.memory import Candidate
from attar.runtime.sandbox import CellResult, Sandbox


def vote_key(result: CellResult) -> str:
    """What candidates must agree on: the final answer, or the observation (normalized)."""
    if result.is_final:
        return "final:" + repr(result.final_answer).strip().lower()
    stdout = "\n".join(line.rstrip() for line in result.stdout.strip().splitlines())
    return f"obs:{stdout}\x00{result.output}"


@dataclass
class Outcome:
    winner: int | None  # index into candidates, None when every candidate failed
    result: CellResult | None
    sandbox: Sandbox | None  # the winner's fork; the caller adopts it
    candidates: list[Candidate]
    seconds: float


def run_candidates(session: Sandbox, generations: list[Generation], codes: list[str | None]) -> Outcome:
    """Run each valid, distinct candidate in a fork of `session`, then vote.

    Execution stops early once no remaining candidate could change the winner (adaptive
    consistency): on a 2-core laptop generation dominates, so candidates run one after another."""
    began = time.perf_counter()
    candidates = [Candidate(model_output=g.text, code=c) for g, c in zip(generations, codes)]
    results: dict[str, tuple[CellResult, Sandbox]] = {}  # code -> outcome, so duplicates run once
    keys: list[str | None] = []
    counts: dict[str, int] = {}
    forks_to_close: list[Sandbox] = []
    for i, cand in enumerate(candidates):
        if cand.code is None:
            cand.error = "parse error: no ```py block"
            keys.append(None)
            continue
        remaining = sum(1 for c in candidates[i:] if c.code is not None)
        ranked = sorted(counts.values(), reverse=True) + [0, 0]
        if ranked[0] > ranked[1] + remaining:
            keys.append(None)
            cand.error = "not run: the vote was already decided"
            continue
        if cand.code not in results:
            fork = session.fork()
            forks_to_close.append(fork)
            results[cand.code] = (fork.run(cand.code), fork)
        result, _ = results[cand.code]
        if result.error is not None:
            cand.error = result.error
            keys.append(None)
            continue
        cand.observation = result.stdout + ("" if result.output is None else result.output)
        cand.vote_key = vote_key(result)
        keys.append(cand.vote_key)
        counts[cand.vote_key] = counts.get(cand.vote_key, 0) + 1

    winner = None
    if counts:
        best = max(counts.values())
        winner = next(i for i, k in enumerate(keys) if k is not None and counts[k] == best)
    for cand in candidates:
        cand.votes = counts.get(cand.vote_key, 0) if cand.vote_key else 0
    if winner is None:
        for fork in forks_to_close:
            fork.close()
        return Outcome(None, None, None, candidates, time.perf_counter() - began)
    result, fork = results[candidates[winner].code]
    for other in forks_to_close:
        if other is not fork:
            other.close()
    return Outcome(winner, result, fork, candidates, time.perf_counter() - began)
