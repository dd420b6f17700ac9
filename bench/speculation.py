"""Speculation on real agent work, in one run: the agent answers the first N GSM-Hard questions on
the same export with the engine's speculation (prompt lookup) off and on, and llama.cpp decodes
the same step prompts from the GGUF the export came from. One JSON line a figure.

    python bench/speculation.py [--model qwen2.5-coder-0.5b | FOLDER] [--questions 8] [--graph both] [--dataset FILE]

"off" is one token a step (the engine before speculation, onnxruntime-genai's way); "on" is the
default. `off_over_llama_cpp` is the kernels' share of the difference, `speedup` speculation's."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from attar.distill.data import Question, load_questions
from attar.runtime.agent import Agent
from attar.runtime.llm import EngineBackend
from attar.runtime.modeldir import ExportDir
from attar.runtime.models import CATALOG, gguf_path, resolve_model

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "test"
THREADS = 2

LLAMA_WORKER = r"""
import json, sys, time
from llama_cpp import Llama
gguf, prompts, new, threads = sys.argv[1], json.load(open(sys.argv[2])), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(gguf, n_threads=threads, n_ctx=4096, verbose=False)
tokens = seconds = 0.0
for prompt in prompts:
    llm.reset()
    llm.eval(llm.tokenize(prompt.encode(), add_bos=False, special=True))
    began = time.perf_counter()
    for _ in range(new):
        llm.eval([llm.sample(temp=0.0)])
    seconds += time.perf_counter() - began
    tokens += new
print(json.dumps({"decode": tokens / seconds}))
"""


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def agent_run(folder: ExportDir, int8: bool, speculate: bool, questions: list[Question]) -> dict:
    """Every step's text, the answers, and decode tokens/s over all steps of all questions."""
    backend = EngineBackend(folder, threads=THREADS, int8=int8, speculate=speculate)
    generate, calls = backend.generate, []

    def recorded(messages, *args, **kwargs):
        generation = generate(messages, *args, **kwargs)
        calls.append((backend.render(messages, kwargs.get("prefix", "")), generation))
        return generation

    backend.generate = recorded
    agent = Agent(backend, max_steps=5)
    answers = [repr(agent.run(q.question).answer) for q in questions]
    decoded = [(g.completion_tokens - 1, g.seconds - g.first_token_seconds) for _, g in calls if g.first_token_seconds]
    engine = backend.engine
    return {"answers": answers, "texts": [g.text for _, g in calls], "prompts": [p for p, _ in calls],
            "tok_s": sum(n for n, _ in decoded) / sum(s for _, s in decoded), "tokens": sum(n for n, _ in decoded),
            "steps": engine.steps, "guessed": engine.guessed, "agreed": engine.agreed}


def same_text(folder: ExportDir, int8: bool, questions: list[Question], new: int = 256) -> dict:
    """Each question's first step decoded speculating, then the very same tokens fed one a step:
    both ways over one text (the agent runs above may part at a near tie and then write different
    texts, which is not the same work)."""
    import numpy as np

    from attar.runtime import prompts
    from attar.runtime.engine import Engine, Request
    from attar.runtime.tools import describe, final_answer

    speculating = EngineBackend(folder, threads=THREADS, int8=int8, speculate=True)
    plain = Engine(folder, threads=THREADS, int8=int8)
    on = off = 0.0
    tokens = 0
    for q in questions:
        ids = speculating.encode([{"role": "system", "content": prompts.system(describe(final_answer))},
                                  {"role": "user", "content": prompts.TASK.format(question=q.question)}])
        request = speculating.engine.run(Request(ids, new, eos=speculating.eos))
        on += time.perf_counter() - request.began - request.first_token_s
        plain.pool.reserve(1, len(ids) + len(request.out) + 8)
        plain._forward(0, 1, np.array([ids], dtype=np.int64), [0])
        began = time.perf_counter()
        for j, token in enumerate(request.out[:-1]):
            plain._forward(0, 1, np.array([[token]], dtype=np.int64), [len(ids) + j])
        off += time.perf_counter() - began
        tokens += len(request.out) - 1
    engine = speculating.engine
    return {"tokens": tokens, "off": tokens / off, "on": tokens / on, "tokens_per_step": tokens / engine.steps,
            "kept": engine.agreed / max(1, engine.guessed)}


def llama_cpp(gguf: Path, prompts: list[str], new: int = 96) -> float | None:
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(prompts, f)
        f.flush()
        out = subprocess.run([sys.executable, "-c", LLAMA_WORKER, str(gguf), f.name, str(new), str(THREADS)],
                             capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["decode"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--dataset", default="gsm_hard_500_20250507.json", help="a question file in shared/datasets/test")
    parser.add_argument("--graph", choices=["exact", "int8", "both"], default="both")
    parser.add_argument("--gguf", type=Path, help="the GGUF a FOLDER was exported from (for llama.cpp's figure)")
    args = parser.parse_args()
    folder = ExportDir.open(resolve_model(args.model))
    questions = load_questions(DATASETS / args.dataset, args.questions)
    graphs = {"exact": [False], "int8": [True], "both": [False, True]}[args.graph]
    if folder.int8_decoder is None:
        graphs = [g for g in graphs if not g] or [False]
    prompts: list[str] = []
    rates = {}
    for int8 in graphs:
        began = time.perf_counter()
        off, on = (agent_run(folder, int8, speculate, questions) for speculate in (False, True))
        graph = "int8" if int8 else "exact"
        rates[graph] = on["tok_s"], off["tok_s"]
        prompts = prompts or off["prompts"]
        emit(figure="agent decode tok/s, speculation off vs on", model=folder.name, graph=graph, dataset=args.dataset,
             questions=len(questions), steps_off=len(off["texts"]), tokens_off=off["tokens"], off=round(off["tok_s"], 1),
             on=round(on["tok_s"], 1), speedup=round(on["tok_s"] / off["tok_s"], 2),
             tokens_per_step_on=round(on["tokens"] / max(1, on["steps"]), 2),
             guesses_agreed=round(on["agreed"] / max(1, on["guessed"]), 3),
             same_answers=on["answers"] == off["answers"],
             same_step_texts=sum(a == b for a, b in zip(on["texts"], off["texts"])),
             steps_on=len(on["texts"]), seconds=round(time.perf_counter() - began))
    for int8 in graphs:
        r = same_text(folder, int8, questions)
        emit(figure="first-step decode tok/s on the same text, one token a step vs speculating", model=folder.name,
             graph="int8" if int8 else "exact", dataset=args.dataset, questions=len(questions), tokens=r["tokens"],
             off=round(r["off"], 1), on=round(r["on"], 1), speedup=round(r["on"] / r["off"], 2),
             tokens_per_step=round(r["tokens_per_step"], 2), guesses_kept=round(r["kept"], 3))
    gguf = args.gguf or (gguf_path(args.model) if args.model in CATALOG else None)
    cpp = llama_cpp(gguf, prompts[:8]) if gguf else None
    for graph, (on, off) in rates.items():
        emit(figure="agent decode tok/s vs llama.cpp on the same step prompts", model=folder.name, graph=graph,
             llama_cpp=round(cpp, 1) if cpp else "unavailable", on=round(on, 1), off=round(off, 1),
             on_over_llama_cpp=round(on / cpp, 2) if cpp else None, off_over_llama_cpp=round(off / cpp, 2) if cpp else None,
             goal=1.2)


if __name__ == "__main__":
    main()
