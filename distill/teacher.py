"""Teacher trajectories: run a teacher as a CodeAct agent over training questions, with the
first-thought prefix (FTP), score each answer, and log every finished trajectory at once.

The teacher sees a long prompt with worked examples; the trajectory is stored with the short
student prompt, which is what the student is trained and run with."""

from __future__ import annotations

import gzip
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from attar.distill.data import Question, check_messages, claim_folder, read_jsonl, write_atomic, write_jsonl_atomic
from attar.distill.runner import run_questions
from attar.distill.scoring import Outcome, score, score_run
from attar.runtime import kernels, prompts
from attar.runtime.agent import Agent, canonical_output
from attar.runtime.answers import extract_boxed
from attar.runtime.llm import Backend, EngineBackend, OpenAIBackend, Sampling
from attar.runtime.memory import Finish
from attar.runtime.models import CATALOG, load_backend, pull

TEACHER_EXAMPLES = '''
Here are two examples of the format.

---
Task: "In which year was the bridge over the river that flows through Ostrava completed, and how many years before 2000 was that?"

Thought: I need the river that flows through Ostrava, then its bridge. I will search first.
Code:
```py
print(web_search("river that flows through Ostrava"))
```<end_code>
Observation: ===== Document 0, similarity: 0.81 ===== Ostrava ... lies on the Oder river ...

Thought: The river is the Oder. Now I need the completion year of its bridge, then the difference to 2000.
Code:
```py
print(web_search("Oder bridge Ostrava completed year"))
```<end_code>
Observation: ===== Document 0, similarity: 0.77 ===== ... the bridge was completed in 1913 ...

Thought: The bridge was completed in 1913, so 2000 - 1913 years before 2000.
Code:
```py
final_answer(2000 - 1913)
```<end_code>

---
Task: "What is the sum of all positive divisors of 360?"

Thought: I can compute this directly in Python.
Code:
```py
total = sum(d for d in range(1, 361) if 360 % d == 0)
print(total)
```<end_code>
Observation: Execution logs:
1170

Thought: The sum is 1170.
Code:
```py
final_answer(1170)
```<end_code>
---
Always end with final_answer, in a step of its own once you have seen the result. Give exact answers: for math an
exact value, never a rounded float: a LaTeX string such as final_answer("\\\\frac{3}{4}"), or the sympy or Fraction
object itself (final_answer(sympy.sqrt(2) / 2) is sent as LaTeX).
'''

TEACHER_SYSTEM = prompts.SYSTEM + "\n" + TEACHER_EXAMPLES

COT_SYSTEM = ("Answer the question. Think step by step, one short paragraph per step, and end with the final "
              "answer in \\boxed{}.")


def first_paragraph(text: str, max_chars: int = 600) -> str:
    """The teacher's first reasoning step: the first non-empty paragraph of its CoT answer."""
    for para in re.split(r"\n\s*\n", text.strip()):
        para = para.strip()
        if para and not para.startswith("\\boxed"):
            return para[:max_chars]
    return ""


def load_teacher(spec: str, model: str = "default", completions: bool = False, concurrency: int = 8) -> Backend:
    """A teacher: comma-separated OpenAI-compatible base URLs, or an exported model (a folder or a
    catalog name), run by the runtime's engine with a batch row for each question in flight. A
    catalog teacher is built with its int8 graph (once) where that pays: a teacher's steps are
    batches and long prompts, where that graph is 1.6x (decode, 8-16 rows) and 2.3-2.9x (prefill)
    the exact one for the 1.5B on AVX-512 VNNI (README, "The int8 graph"); on AVX2 without VNNI
    the exact graph is the faster (`kernels.int8_graph_pays`)."""
    if spec.startswith(("http://", "https://")):
        return OpenAIBackend([u.strip() for u in spec.split(",")], model, completions=completions)
    if spec not in (*CATALOG, "default"):
        return load_backend(spec, rows=max(8, concurrency))
    int8 = kernels.int8_graph_pays()
    return EngineBackend(pull(spec, int8=int8), max_rows=max(8, concurrency), int8=int8)


JUDGE_PROMPT = ("Question: {question}\nGold answer: {gold}\nPredicted answer: {prediction}\n"
                "Does the predicted answer mean the same as the gold answer? Reply with one word: yes or no.")


def judge(backend: Backend, question: str, gold: str, prediction) -> bool:
    """The paper's LLM judge for factual answers, through the teacher's own endpoint."""
    reply = backend.generate([{"role": "user", "content": JUDGE_PROMPT.format(
        question=question, gold=gold, prediction=prediction)}], sampling=Sampling(max_new_tokens=4))
    return reply.text.strip().lower().startswith("yes")


@dataclass
class GenerateConfig:
    ftp: bool = True
    judge: bool = False  # ask the teacher to judge factual answers the rules call wrong
    max_steps: int = 5
    concurrency: int = 4
    max_new_tokens: int = 512
    cot_max_new_tokens: int = 512
    # Rejection sampling (RFT): where the greedy run is not kept, up to this many sampled runs;
    # each distinct kept one is training data too (a weak teacher's second paths help students).
    retries: int = 0
    retry_temperature: float = 0.7
    # End a run at a step that repeats an earlier one exactly (Agent(stop_on_repeat=True)): such a
    # run was never kept, and the steps it has left are at its longest contexts.
    stop_on_repeat: bool = True


def _trajectory(teacher: Backend, q: Question, cfg: GenerateConfig, tools: list) -> dict:
    """One question: CoT answer (for FTP and the CoT baseline), then the greedy agent run, then
    sampled retries while none is kept. The record is the greedy run's; retries go in "retries"."""
    began = time.perf_counter()
    cot = teacher.generate([{"role": "system", "content": COT_SYSTEM}, {"role": "user", "content": q.question}],
                           sampling=Sampling(max_new_tokens=cfg.cot_max_new_tokens))
    cot_answer = extract_boxed(cot.text)
    prefix = ""
    if cfg.ftp:
        thought = first_paragraph(cot.text)
        prefix = f"Thought: {thought}" if thought else ""
    record = _agent_run(teacher, q, cfg, tools, prefix, Sampling(max_new_tokens=cfg.max_new_tokens), began)
    record |= {"ftp": prefix or None, "cot": cot.text, "cot_prediction": cot_answer,
               "cot_correct": score(cot_answer, q.answer, q.kind), "tokens": record["tokens"] + cot.completion_tokens}
    retries = []
    for i in range(cfg.retries if not keep(record) else 0):
        sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.retry_temperature, seed=i)
        retries.append(_agent_run(teacher, q, cfg, tools, prefix, sampling, time.perf_counter()))
        if keep(retries[-1]):
            break
    return record | {"retries": retries} if cfg.retries else record


def _agent_run(teacher: Backend, q: Question, cfg: GenerateConfig, tools: list, prefix: str, sampling: Sampling,
               began: float) -> dict:
    with Agent(teacher, tools=tools, max_steps=cfg.max_steps, system_prompt=TEACHER_SYSTEM, sampling=sampling,
               stop_on_repeat=cfg.stop_on_repeat) as agent:
        result = agent.run(q.question, prefix=prefix)
        for step in result.steps:  # stored in the one format the student learns
            if step.code is not None:
                step.model_output = canonical_output(step.model_output, step.code)
        messages = agent.memory.messages()
        messages[0] = {"role": "system", "content": prompts.system(agent.tool_descriptions)}
    second_say = (lambda answer: judge(teacher, q.question, q.answer, answer)) if cfg.judge and q.kind == "factual" else None
    correct = score_run(result, q.answer, q.kind, second_say) == Outcome.CORRECT
    return trajectory_record(q, result, messages, teacher.name, began, correct,
                             **({} if sampling.greedy else {"temperature": sampling.temperature, "seed": sampling.seed}))


def trajectory_record(q: Question, result, messages: list[dict], teacher: str, began: float, correct: bool,
                      cot_tokens: int = 0, **cot) -> dict:
    """One line of trajectories.jsonl, the same for every teacher (`cot`: ftp, cot, cot_prediction, cot_correct)."""
    steps = result.steps
    return {
        "id": q.id, "question": q.question, "answer": q.answer, "kind": q.kind,
        "prediction": result.answer, "correct": correct,
        "finished_by": result.finished_by,
        "parse_errors": sum(1 for s in steps if s.code is None and not s.is_fallback),
        "exec_errors": sum(1 for s in steps if s.code is not None and s.error),
        "steps": len(steps), **cot, "messages": messages, "teacher": teacher,
        "tokens": sum(s.completion_tokens for s in steps) + cot_tokens,
        "seconds": round(time.perf_counter() - began, 2),
    }


def generate(questions: list[Question], teacher: Backend, out_dir: str | os.PathLike, cfg: GenerateConfig = GenerateConfig(),
             tools: list = (), progress: bool = True) -> dict:
    """Run the teacher over every question not yet in OUT/trajectories.jsonl; return a summary.
    OUT/generate.json records how (`attar distill pack` puts it in the manifest)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"teacher": teacher.name, "tools": [getattr(t, "__name__", str(t)) for t in tools] + ["final_answer"],
                "decoding": "greedy, then sampled retries" if cfg.retries else "greedy", **asdict(cfg)}
    claim_folder(out, {k: v for k, v in settings.items() if k != "concurrency"}, "trajectories",
                 record="generate.json", outputs=("trajectories.jsonl",))
    records, failures = run_questions(questions, lambda q: str(q.id), lambda q: _trajectory(teacher, q, cfg, list(tools)),
                                      out / "trajectories.jsonl", cfg.concurrency, "trajectories", progress,
                                      stop=teacher.close)
    return summarize(records) | {"failed": len(failures), "failures": failures[:5]}


MAX_MANIFEST = 1 << 20


def manifest_of(packed_file: Path) -> Path:
    """NAME.manifest.json beside a packed NAME.jsonl.gz (any other name is refused)."""
    if not packed_file.name.endswith(".jsonl.gz"):
        raise ValueError(f"{packed_file}: the packed file is NAME.jsonl.gz")
    return packed_file.with_name(packed_file.name.removesuffix(".jsonl.gz") + ".manifest.json")


def pack(run_dir: str | os.PathLike, out_file: str | os.PathLike, note: str | None = None) -> dict:
    """A run's trajectories as one gzip JSONL (every trajectory, kept or not) and a manifest beside
    it (settings, counts, drop reasons), both written atomically: what gets committed, hourly
    during a long run, so that anyone can filter and train without the teacher."""
    run_dir, out_file = Path(run_dir), Path(out_file)
    manifest_file = manifest_of(out_file)
    source = run_dir / "trajectories.jsonl"
    if not source.is_file():
        raise ValueError(f"{run_dir} holds no trajectories.jsonl")
    records = read_jsonl(source, check_trajectory)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_file, gzip.compress(source.read_bytes(), mtime=0))
    settings = json.loads((run_dir / "generate.json").read_text()) if (run_dir / "generate.json").is_file() else {}
    manifest = {"note": note, "settings": settings, "packed": time.strftime("%Y-%m-%d %H:%M"),
                "tokens": sum(r.get("tokens", 0) for r in records), **summarize(records)}
    write_atomic(manifest_file, json.dumps(manifest, indent=2).encode())
    return manifest


def unpack(packed_file: str | os.PathLike, run_dir: str | os.PathLike) -> int:
    """`pack` undone: RUN/trajectories.jsonl and RUN/generate.json from a packed file and its
    manifest, so that `generate --out RUN` with the same settings goes on where the packed run
    stopped. Every record is checked; a folder that already holds trajectories is refused."""
    packed_file, run_dir = Path(packed_file), Path(run_dir)
    manifest_file = manifest_of(packed_file)
    if not manifest_file.is_file() or manifest_file.stat().st_size > MAX_MANIFEST:
        raise ValueError(f"{manifest_file}: missing or larger than {MAX_MANIFEST >> 20} MiB; it holds the run's settings")
    try:
        settings = json.loads(manifest_file.read_bytes()).get("settings")
    except (ValueError, AttributeError):
        raise ValueError(f"{manifest_file}: not a manifest (a JSON object)") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("teacher"), str):
        raise ValueError(f"{manifest_file}: its \"settings\" do not say which teacher made the run")
    if (run_dir / "trajectories.jsonl").exists() or (run_dir / "generate.json").exists():
        raise ValueError(f"{run_dir} already holds a run; unpack into a new folder")
    records = read_jsonl(packed_file, check_trajectory)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "generate.json", json.dumps(settings, indent=2).encode())
    write_jsonl_atomic(run_dir / "trajectories.jsonl", records)
    return len(records)


def summarize(records: list[dict]) -> dict:
    """Counts, and why each dropped trajectory was dropped."""
    n = len(records) or 1
    kept = [r for r in records if keep(r)]
    dropped = [r for r in records if not keep(r)]
    return {"trajectories": len(records), "correct": sum(r["correct"] for r in records),
            "kept": len(kept), "kept_share": round(len(kept) / n, 4),
            "dropped_no_final_answer": sum(r["finished_by"] != Finish.FINAL_ANSWER for r in dropped),
            "dropped_wrong_answer": sum(r["finished_by"] == Finish.FINAL_ANSWER and not r["correct"] for r in dropped),
            "dropped_parse_error": sum(bool(r["correct"]) and r["parse_errors"] > 0 for r in dropped),
            "cot_correct": sum(bool(r.get("cot_correct")) for r in records),
            "retries": sum(len(r.get("retries", [])) for r in records),
            "kept_from_retries": sum(len(kept_runs(r)) - keep(r) for r in records),
            "runs_ended_on_repeat": sum(run["finished_by"] == Finish.REPEATED for r in records
                                        for run in [r, *r.get("retries", [])]),
            "exec_error_runs": sum(r["exec_errors"] > 0 for r in records)}


_RECORD = {"id": (str, int), "question": str}  # a question's record; each run (retries too) has _RUN
_RUN = {"correct": bool, "finished_by": str, "parse_errors": int, "exec_errors": int, "messages": list}


def check_trajectory(record: dict) -> None:
    """A trajectory record as `trajectory_record` writes it (retries included), or a ValueError
    that says what is wrong: files are read from anywhere, so nothing is assumed."""
    retries = record.get("retries", [])
    if not isinstance(retries, list):
        raise ValueError("\"retries\" must be a list of trajectory records")
    for run, fields in [(record, _RECORD | _RUN), *((r, _RUN) for r in retries)]:
        if not isinstance(run, dict):
            raise ValueError("\"retries\" must be a list of trajectory records")
        for key, kind in fields.items():
            value = run.get(key)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"a trajectory needs {key!r} ({getattr(kind, '__name__', 'str or int')}), "
                                 f"got {type(value).__name__}")
        check_messages(run["messages"])
    if record.get("cot") is not None and not isinstance(record["cot"], str):
        raise ValueError("\"cot\" must be text")


def keep(record: dict) -> bool:
    """The paper's filter: the answer is correct and no step failed to parse."""
    return bool(record["correct"]) and record["parse_errors"] == 0


def kept_runs(record: dict) -> list[dict]:
    """A question's kept runs: the greedy one and each kept retry whose turns differ from all before."""
    runs, seen = [], set()
    for run in [record, *record.get("retries", [])]:
        turns = tuple(m["content"] for m in run["messages"] if m["role"] == "assistant")
        if keep(run) and turns not in seen:
            seen.add(turns)
            runs.append(run)
    return runs
