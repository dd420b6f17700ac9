"""Cost of a self-consistent step on the default model, one JSON line per figure: wall time per
step for N = 1, 2, 4, 8 candidates in one batched generation, and N = 8 as 8 sequential
generations, with the prefill / decode / execution split and tokens/s.

    python bench/sag.py [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

from attar.runtime import prompts

QUESTIONS = ["What is the sum of the squares of the first 20 positive integers?",
             "How many days are there between 2021-03-01 and 2021-07-15?",
             "What is 15% of 2480, plus 17?"]


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def main() -> None:
    from attar.runtime import Sampling
    from attar.runtime.agent import parse_code
    from attar.runtime.llm import load_backend
    from attar.runtime.memory import Memory, Task
    from attar.runtime.sag import run_candidates
    from attar.runtime.sandbox import Sandbox
    from attar.runtime.tools import describe, final_answer

    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    args = parser.parse_args()
    backend = load_backend(args.model)
    sampling = Sampling(temperature=0.4, top_p=0.8, seed=0, max_new_tokens=128)
    system = prompts.SYSTEM.format(tools=describe(final_answer))
    prompts_ = [Memory(system, [Task(q)]).messages() for q in QUESTIONS]
    Sandbox.keep_warm(8)

    def prefill_seconds(messages) -> float:
        one = backend.generate(messages, sampling=Sampling(max_new_tokens=1))
        return one.seconds

    baseline = None
    for n in (1, 2, 4, 8, "8 sequential"):
        walls, prefill, execs, tokens = [], [], [], []
        for messages in prompts_:
            began = time.perf_counter()
            if n == "8 sequential":
                gens = [backend.generate(messages, stop=prompts.STOP, sampling=sampling) for _ in range(8)]
            else:
                gens = backend.generate_batch(messages, [replace(sampling, seed=i) for i in range(n)], stop=prompts.STOP)
            generated = time.perf_counter()
            with Sandbox() as session:
                outcome = run_candidates(session, gens, [parse_code(g.text) for g in gens])
                if outcome.sandbox is not None:
                    outcome.sandbox.close()
            walls.append(time.perf_counter() - began)
            execs.append(time.perf_counter() - generated)
            prefill.append(prefill_seconds(messages) * (8 if n == "8 sequential" else n))
            tokens.append(sum(g.completion_tokens for g in gens) / (generated - began))
        wall = statistics.median(walls)
        baseline = baseline or wall
        emit(figure=f"SAG step, N={n}", wall_s=round(wall, 3), ratio_to_n1=round(wall / baseline, 2),
             prefill_s_est=round(statistics.median(prefill), 3), execution_s=round(statistics.median(execs), 4),
             decode_s_est=round(wall - statistics.median(prefill) - statistics.median(execs), 3),
             tokens_per_s=round(statistics.median(tokens), 1), goal_n8_ratio=2.0)


if __name__ == "__main__":
    main()
