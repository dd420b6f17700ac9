"""Agent speed on the default model, one JSON line per figure: per-step latency split into
generation / sandbox / tools, time to first token, peak RSS of `attar chat` with an index
loaded, and the installed size of the runtime alone in a fresh venv.

    python bench/agent.py [--skip-install-size]
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is 17 * 23?", "How many days are there in 3 leap years?", "What is 2 to the power of 10?"]
CORPUS = [{"id": str(i), "title": f"Fact {i}", "text": f"The number of the day is {i * 7}; it was chosen by lot."}
          for i in range(200)]


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def steps_figures() -> None:
    from attar.runtime import Agent

    with Agent(max_steps=3) as agent:
        steps = []
        for q in QUESTIONS:
            steps += agent.run(q).steps
    gen = [s.generation_seconds for s in steps]
    sbx = [s.sandbox_seconds - s.tool_seconds for s in steps if s.code]
    ttft = [s.first_token_seconds for s in steps if s.first_token_seconds]
    toks = sum(s.completion_tokens for s in steps) / max(sum(gen), 1e-9)
    emit(figure="agent step latency, default model", steps=len(steps),
         generation_s_median=round(statistics.median(gen), 3),
         sandbox_ms_median=round(statistics.median(sbx) * 1000, 3) if sbx else None,
         tokens_per_s=round(toks, 1), time_to_first_token_s_median=round(statistics.median(ttft), 3),
         generation_share=round(sum(gen) / (sum(gen) + sum(sbx) + 1e-9), 4))


def chat_rss(index_dir: Path) -> None:
    cmd = ["attar", "chat", "Which number was chosen by lot for fact 12?", "--index", str(index_dir),
           "--max-steps", "2", "--json"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    emit(figure="attar chat peak RSS (default model + index)", value=round(rss), unit="MB", target=400,
         meets_target=rss <= 400, wall_s=round(seconds, 1), ok=proc.returncode == 0)


def install_size() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = venv / "bin" / "pip"
        t = time.perf_counter()
        subprocess.run([str(pip), "install", "-q", str(ROOT)], check=True, capture_output=True)
        seconds = time.perf_counter() - t
        site = next((venv / "lib").glob("python*/site-packages"))
        baseline = sum(f.stat().st_size for f in (site / "pip").rglob("*") if f.is_file())
        size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file()) - baseline
        heavy = [p.name for p in site.iterdir() if p.name.split("-")[0] in ("torch", "transformers", "peft", "trl")]
        emit(figure="pip install attar (runtime only), installed size", value=round(size / 1e6, 1), unit="MB",
             target=150, meets_target=size / 1e6 <= 150, install_s=round(seconds, 1), heavy_packages=heavy)


def main() -> None:
    from attar.runtime.retrieval import build_index

    steps_figures()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "c.jsonl"
        corpus.write_text("\n".join(json.dumps(r) for r in CORPUS))
        build_index(corpus, Path(tmp) / "idx", progress=False)
        chat_rss(Path(tmp) / "idx")
    if "--skip-install-size" not in sys.argv:
        install_size()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
