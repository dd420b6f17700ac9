"""Export and inference speed of the default model on this CPU, one JSON line per figure:
onnxruntime-genai INT4 beside llama.cpp (llama-cpp-python) on the same model's Q4_1 GGUF, both
with 2 threads, greedy, the same prompt. Each engine runs in its own process for a clean peak RSS.

    python bench/export.py [--skip-export]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_WORDS = 140  # ~190 tokens, as in FACTS.md
NEW_TOKENS = 128
THREADS = 2

ORT_WORKER = r"""
import json, sys, time, resource
import numpy as np, onnxruntime_genai as og
path, prompt, new, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = og.Config(path)
config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
model = og.Model(config); tok = og.Tokenizer(model)
ids = tok.encode(prompt)
def run():
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new, min_length=len(ids) + new, do_sample=False)
    gen = og.Generator(model, params)
    t = time.perf_counter(); gen.append_tokens(ids); gen.generate_next_token(); t1 = time.perf_counter()
    n = 1
    while not gen.is_done():
        gen.generate_next_token(); n += 1
    t2 = time.perf_counter()
    return len(ids) / (t1 - t), (n - 1) / (t2 - t1)
run()
pre, dec = zip(*[run() for _ in range(3)])
print(json.dumps({"prefill": sorted(pre)[1], "decode": sorted(dec)[1], "prompt_tokens": len(ids),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

LLAMA_WORKER = r"""
import json, sys, time, resource
from llama_cpp import Llama
path, prompt, new, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llm = Llama(path, n_threads=threads, n_ctx=1024, verbose=False)
ids = llm.tokenize(prompt.encode())
def run():
    llm.reset()
    t = time.perf_counter(); llm.eval(ids); t1 = time.perf_counter()
    for _ in range(new):
        token = llm.sample(temp=0.0); llm.eval([token])
    t2 = time.perf_counter()
    return len(ids) / (t1 - t), new / (t2 - t1)
run()
pre, dec = zip(*[run() for _ in range(3)])
print(json.dumps({"prefill": sorted(pre)[1], "decode": sorted(dec)[1], "prompt_tokens": len(ids),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def worker(code: str, path: Path, prompt: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, str(path), prompt, str(NEW_TOKENS), str(THREADS)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from attar.runtime.models import gguf_path as default_gguf
    from attar.runtime.models import default_model_dir

    gguf = default_gguf()
    model_dir = default_model_dir()
    if "--skip-export" not in sys.argv or not model_dir.exists():
        from attar.export.convert import export_model

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "m"
            t = time.perf_counter()
            report = export_model(gguf, out, check=True, log=lambda m: None)
            seconds = time.perf_counter() - t
            size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            emit(figure="export time (GGUF -> ONNX INT4, with parity check)", value=round(seconds, 1), unit="s",
                 child_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024))
            emit(figure="exported model size", value=round(size / 1e6, 1), unit="MB",
                 gguf_mb=round(gguf.stat().st_size / 1e6, 1))
            emit(figure="parity", **report)
            if not model_dir.exists():
                model_dir.parent.mkdir(parents=True, exist_ok=True)
                out.rename(model_dir)

    prompt = " ".join(["The agent reads the question, searches the index and writes Python code."] * 12)[:PROMPT_WORDS * 6]
    ort = worker(ORT_WORKER, model_dir, prompt)
    emit(figure="onnxruntime-genai INT4", prefill_tok_s=round(ort["prefill"], 1), decode_tok_s=round(ort["decode"], 1),
         peak_rss_mb=round(ort["rss_mb"]), prompt_tokens=ort["prompt_tokens"], threads=THREADS)
    try:
        cpp = worker(LLAMA_WORKER, gguf, prompt)
    except (RuntimeError, FileNotFoundError) as exc:
        emit(figure="llama.cpp Q4_1 (baseline)", skipped=f"llama-cpp-python unavailable: {exc}")
        return
    emit(figure="llama.cpp Q4_1 (baseline)", prefill_tok_s=round(cpp["prefill"], 1), decode_tok_s=round(cpp["decode"], 1),
         peak_rss_mb=round(cpp["rss_mb"]), prompt_tokens=cpp["prompt_tokens"], threads=THREADS)
    emit(figure="decode speed ratio onnxruntime-genai / llama.cpp", value=round(ort["decode"] / cpp["decode"], 3),
         target=1.2, meets_target=ort["decode"] / cpp["decode"] >= 1.2,
         prefill_ratio=round(ort["prefill"] / cpp["prefill"], 3))


if __name__ == "__main__":
    main()
