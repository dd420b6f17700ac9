"""The untrained baseline that distillation must beat: the default model as an agent over the
first N GSM-Hard questions (numeric comparison of the final answer).

    python bench/agent_baseline.py [--n 50] [--sag 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "test" / "gsm_hard_500_20250507.json"


def main() -> None:
    from attar.distill.scoring import numeric_match
    from attar.runtime import Agent

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--sag", type=int, default=1)
    parser.add_argument("--dataset", type=Path, default=DATASET)
    args = parser.parse_args()
    examples = json.loads(args.dataset.read_text())["examples"][: args.n]
    outcomes = {"correct": 0, "wrong": 0, "parse_error": 0, "sandbox_error": 0, "max_steps": 0}
    began = time.perf_counter()
    with Agent(sag=args.sag) as agent:
        for ex in examples:
            result = agent.run(ex["question"])
            if result.finished_by == "final_answer":
                outcomes["correct" if numeric_match(result.answer, ex["answer"]) else "wrong"] += 1
            elif all(s.code is None for s in result.steps[:-1]):
                outcomes["parse_error"] += 1
            elif any(s.error and s.code for s in result.steps):
                outcomes["sandbox_error"] += 1
            else:
                outcomes["max_steps"] += 1
    n = len(examples)
    print(json.dumps({"figure": "untrained default model as agent, GSM-Hard", "questions": n, "sag": args.sag,
                      "accuracy": round(outcomes["correct"] / n, 4),
                      **{f"share_{k}": round(v / n, 4) for k, v in outcomes.items() if k != "correct"},
                      "seconds_per_question": round((time.perf_counter() - began) / n, 2)}))


if __name__ == "__main__":
    main()
