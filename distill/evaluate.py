"""Evaluate a student the way the paper does: as an agent (optionally with SAG) or by CoT
(optionally with retrieved passages), over a question file. Predictions are logged as they
come (resumable); the summary carries accuracy and a breakdown of failures."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from attar.distill.data import claim_folder, load_questions
from attar.distill.hf_backend import TransformersBackend
from attar.distill.runner import run_questions
from attar.distill.scoring import Outcome, extract_boxed, score, score_run
from attar.distill.sft_data import cot_messages
from attar.runtime.agent import Agent
from attar.runtime.fetch import sha256_file
from attar.runtime.llm import Sampling
from attar.runtime.models import is_built, load_backend
from attar.runtime.retrieval import Index, web_search_tool
from attar.runtime.sag import SAMPLING as SAG_SAMPLING


def load_model(spec: str, rows: int = 8):
    """An exported ONNX folder, an OpenAI-compatible URL (URL#model), or an HF folder; `rows`:
    requests in flight at once (questions side by side, times SAG's candidates)."""
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file() and not is_built(path):
        return TransformersBackend(path)
    return load_backend(spec, rows=max(8, rows))


def _agent_record(backend, q, sag, index, max_steps) -> dict:
    # 256 new tokens a step: a teacher's longest step is ~150; a looping student would spend 512.
    sampling = Sampling(max_new_tokens=256)
    if sag > 1:  # the paper's SAG sampling, seeded so a rerun draws the same candidates
        sampling = replace(SAG_SAMPLING, max_new_tokens=sampling.max_new_tokens, seed=0)
    with Agent(backend, index=index, max_steps=max_steps, sag=sag, sampling=sampling) as agent:
        result = agent.run(q.question)
        messages = agent.memory.messages()
    outcome = score_run(result, q.answer, q.kind)
    record = {"prediction": result.answer, "correct": outcome == Outcome.CORRECT, "category": outcome,
              "steps": len(result.steps),
              "tokens": sum(s.completion_tokens for s in result.steps), "messages": messages[1:]}
    if sag > 1:  # each step's candidates (the first is greedy), so a lost vote can be read back
        record["candidates"] = [[{"votes": c.votes, "outcome": c.vote_key or c.error} for c in step.candidates]
                                for step in result.steps if step.candidates]
    return record


def _cot_record(backend, q, retrieve) -> dict:
    passages = retrieve(q.question) if retrieve else None
    gen = backend.generate(cot_messages(q.question, passages), sampling=Sampling(max_new_tokens=512))
    prediction = extract_boxed(gen.text)
    correct = score(prediction, q.answer, q.kind)
    category = Outcome.CORRECT if correct else (Outcome.WRONG_ANSWER if prediction is not None else Outcome.PARSE_ERROR)
    return {"prediction": prediction, "output": gen.text, "correct": correct, "category": category, "steps": 1,
            "tokens": gen.completion_tokens}


def evaluate(model: str, questions: str | os.PathLike, out_dir: str | os.PathLike, *, mode: str = "agent",
             sag: int = 1, index: str | None = None, max_steps: int = 5, limit: int | None = None,
             label: str | None = None, concurrency: int = 1, progress: bool = True) -> dict:
    """`concurrency` questions run side by side (batched on attar's engine); greedy results do
    not depend on it, and SAG's samples are seeded per question."""
    if mode not in ("agent", "cot"):
        raise ValueError(f"mode must be agent or cot, not {mode!r}")
    qs = load_questions(questions, limit)
    out_dir = Path(out_dir)
    claim_folder(out_dir, {"model": _identity(model), "questions": _identity(questions), "mode": mode, "sag": sag,
                           "max_steps": max_steps, "index": _identity(index) if index else None},
                 "predictions", outputs=("predictions.jsonl",))
    backend = load_model(model, concurrency * sag)
    retrieve = opened = None
    if index:
        opened = Index.open(index)  # once: every question's agent searches the same index
        retrieve = web_search_tool(opened) if mode == "cot" else None

    def one(q) -> dict:
        began = time.perf_counter()
        rec = _agent_record(backend, q, sag, opened, max_steps) if mode == "agent" else _cot_record(backend, q, retrieve)
        return {"id": q.id, "question": q.question, "answer": q.answer, **rec,
                "seconds": round(time.perf_counter() - began, 2)}

    records, failures = run_questions(qs, lambda q: str(q.id), one, out_dir / "predictions.jsonl", concurrency,
                                      "eval", progress, stop=backend.close)
    if failures:
        raise RuntimeError(f"{len(failures)} questions failed (rerun to retry them), e.g. {failures[0]}")
    n = len(records)
    method = mode if not (mode == "cot" and index) else "cot+rag"
    summary = {
        "label": label or f"{Path(str(model)).name} {method}" + (f" sag{sag}" if sag > 1 else ""),
        "model": str(model), "method": method, "sag": sag, "dataset": Path(questions).stem, "questions": n,
        "accuracy": round(sum(r["correct"] for r in records) / n, 4),
        "tokens_per_question": round(sum(r["tokens"] for r in records) / n, 1),
        "seconds_per_question": round(sum(r["seconds"] for r in records) / n, 2),
        "breakdown": {c.value: sum(r["category"] == c for r in records) for c in Outcome},
    }
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out_dir / "summary.json")
    return summary


def _identity(spec: str | os.PathLike) -> str:
    """What a model, question file or index is, for keying results: a file by its path and
    SHA-256, a folder by its path and its files' sizes and times, anything else as given."""
    path = Path(spec)
    if path.is_file():
        return f"{path.resolve()} sha256:{sha256_file(path)}"
    if path.is_dir():  # an index's SQLite journal files come and go as it is read: not part of what it is
        stamp = sorted((p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                       for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                       and not p.name.endswith(("-wal", "-shm")))
        return f"{path.resolve()} files:{hashlib.sha256(repr(stamp).encode()).hexdigest()[:16]}"
    return str(spec)


def compare(run_dirs: list[str | os.PathLike], chart: str | os.PathLike | None = None) -> str:
    """One table across runs, like the paper's main table; optionally a bar chart PNG."""
    rows = []
    for run in run_dirs:
        file = Path(run) / "summary.json"
        if not file.is_file():
            raise ValueError(f"no summary.json in {run}")
        rows.append(json.loads(file.read_text()))
    header = ("run", "method", "SAG", "dataset", "n", "accuracy", "tokens/q", "s/q")
    table = [header] + [(r["label"], r["method"], str(r["sag"]), r["dataset"], str(r["questions"]),
                         f"{r['accuracy']:.1%}", f"{r['tokens_per_question']:.0f}", f"{r['seconds_per_question']:.1f}")
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table)
    if chart:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rows)), 3.6))
        bars = ax.bar(range(len(rows)), [100 * r["accuracy"] for r in rows], color="#4a7bb7")
        ax.bar_label(bars, fmt="%.1f")
        ax.set_xticks(range(len(rows)), [f"{r['label']}\nn={r['questions']}" for r in rows], rotation=20, ha="right",
                      fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, min(100, max(100 * r["accuracy"] for r in rows) + 12))
        ax.set_title("accuracy on " + ", ".join(sorted({r["dataset"] for r in rows})) + " questions")
        fig.tight_layout()
        fig.savefig(chart, dpi=120)
        plt.close(fig)
    return text
