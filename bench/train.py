"""Training and evaluation cost of the default student on this machine, one JSON line per figure:
LoRA SFT tokens/s and peak RSS on a set of generated-world trajectories, the time per question of
evaluation, and what one epoch over the paper's 3000 trajectories would take here.

    python bench/train.py [--examples 64] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

PAPER_TRAJECTORIES, PAPER_TOKENS = 3000, 600  # the paper's set, ~600 tokens per trajectory


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def main() -> None:
    from attar.distill.data import read_jsonl, write_jsonl_atomic
    from attar.distill.oracle import generate_oracle
    from attar.distill.sft_data import build_sft
    from attar.distill.train import TrainConfig, base_dtype, make_trainer, native_bf16
    from attar.distill.world import make_world
    from attar.runtime.retrieval import Index, build_index

    parser = argparse.ArgumentParser()
    parser.add_argument("--people", type=int, default=40)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--weights", help="the base's dtypes to time, e.g. fp32,bf16 (default: both where the CPU "
                                          "has bf16 instructions, else fp32: emulated bf16 ran 9x slower on an AVX2 EPYC)")
    args = parser.parse_args()
    weights = args.weights.split(",") if args.weights else ["fp32", "bf16"] if native_bf16() else ["fp32"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        world = make_world(seed=7, people=args.people)
        write_jsonl_atomic(tmp / "corpus.jsonl", world.passages)
        build_index(tmp / "corpus.jsonl", tmp / "idx", progress=False)
        generate_oracle(world.train, Index.open(tmp / "idx"), tmp / "t", progress=False)
        build_sft(tmp / "t")
        rows = read_jsonl(tmp / "t" / "agent_sft.jsonl")
        for dtype in weights:  # the base's dtype; LoRA weights and optimizer stay fp32
            trainer = make_trainer(tmp / "t" / "agent_sft.jsonl", "default", tmp / f"run-{dtype}",
                                   TrainConfig(max_steps=args.steps, cpu_weights=dtype, save_steps=10_000,
                                               rank=args.rank, alpha=2 * args.rank))
            tokens_per_step = 8 * sum(len(r["input_ids"]) for r in trainer.train_dataset) / len(trainer.train_dataset)
            began = time.perf_counter()
            trainer.train()
            seconds = (time.perf_counter() - began) / args.steps
            rate = tokens_per_step / seconds
            emit(figure=f"LoRA r{args.rank} SFT, default student, {dtype} weights", s_per_step=round(seconds, 1),
                 trainer_default=dtype == base_dtype(TrainConfig()),
                 tokens_per_s=round(rate), tokens_per_example=round(tokens_per_step / 8), examples=len(rows),
                 peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
                 paper_epoch_hours_here=round(PAPER_TRAJECTORIES * PAPER_TOKENS / rate / 3600, 2))


if __name__ == "__main__":
    main()
