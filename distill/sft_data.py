"""Teacher records -> the SFT datasets TRL trains on as is ({"messages": [...]} per line).

agent_sft.jsonl  trajectories whose answer is correct and that had no parse error (the paper's
                 filter), in the student format: short system prompt, task, Thought/Code turns,
                 observations as user turns.
cot_sft.jsonl    the teacher's CoT answers to the same questions, where its boxed answer is
                 correct: the CoT-distillation baseline (optionally with retrieved passages in
                 the prompt: CoT + RAG)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from attar.distill.data import read_jsonl, write_jsonl_atomic
from attar.distill.teacher import check_trajectory, kept_runs, summarize

COT_STUDENT_SYSTEM = "Answer the question step by step, then give the final answer in \\boxed{}."
RAG_TEMPLATE = "Passages:\n{passages}\n\nQuestion: {question}"


def cot_messages(question: str, passages: str | None = None) -> list[dict]:
    user = RAG_TEMPLATE.format(passages=passages, question=question) if passages else question
    return [{"role": "system", "content": COT_STUDENT_SYSTEM}, {"role": "user", "content": user}]


def build_sft(source: str | os.PathLike, retrieve: Callable[[str], str] | None = None,
              out_dir: str | os.PathLike | None = None) -> dict:
    """Write agent_sft.jsonl and cot_sft.jsonl (or cot_rag_sft.jsonl) into `out_dir`, by default
    next to the trajectories. `source`: a run folder, or a trajectories file (.jsonl or .jsonl.gz,
    such as the ones committed in data/trajectories/)."""
    source = Path(source)
    if source.is_dir():
        records, run_dir = read_jsonl(source / "trajectories.jsonl", check_trajectory), Path(out_dir or source)
    elif out_dir is None:
        raise ValueError(f"{source} is a file: say where the SFT data goes (--out)")
    else:
        records, run_dir = read_jsonl(source, check_trajectory), Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    agent_rows = [{"messages": t["messages"], "id": r["id"]} for r in records for t in kept_runs(r)]
    cot_rows = []
    for r in records:
        if r.get("cot_correct"):
            passages = retrieve(r["question"]) if retrieve else None
            cot_rows.append({"messages": cot_messages(r["question"], passages) +
                             [{"role": "assistant", "content": r["cot"].strip()}], "id": r["id"]})
    write_jsonl_atomic(run_dir / "agent_sft.jsonl", agent_rows)
    cot_name = "cot_rag_sft.jsonl" if retrieve else "cot_sft.jsonl"
    write_jsonl_atomic(run_dir / cot_name, cot_rows)
    summary = summarize(records) | {"agent_sft": len(agent_rows), cot_name.removesuffix(".jsonl"): len(cot_rows)}
    manifest = {"teachers": sorted({r["teacher"] for r in records}), "first_thought_prefix": any(r.get("ftp") for r in records),
                "filter": "correct final answer and no parse error", "cot_with_passages": retrieve is not None, **summary}
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return summary
