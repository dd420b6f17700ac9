"""The untrained baseline that distillation must beat: the default model as an agent over the
first N GSM-Hard questions (numeric comparison of the final answer).

    python bench/agent_baseline.py [--n 50] [--sag 1]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "test" / "gsm_hard_500_20250507.json"


def main() -> None:
    from attar.distill.scoring import Outcome, score_run
    from attar.runtime import Agent

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--sag", type=int, default=1)
    parser.add_argument("--dataset", type=Path, default=DATASET)
    args = parser.parse_args()
    examples = json.loads(args.dataset.read_text())["examples"][: args.n]
    outcomes = Counter()
    began = time.perf_counter()
    with Agent(sag=args.sag) as agent:
        for ex in examples:
            outcomes[score_run(agent.run(ex["question"]), ex["answer"], "numeric")] += 1
    n = len(examples)
    print(json.dumps({"figure": "untrained default model as agent, GSM-Hard", "questions": n, "sag": args.sag,
                      "accuracy": round(outcomes[Outcome.CORRECT] / n, 4),
                      **{f"share_{o.value}": round(outcomes[o] / n, 4) for o in Outcome if o != Outcome.CORRECT},
                      "seconds_per_question": round((time.perf_counter() - began) / n, 2)}))


if __name__ == "__main__":
    main()
