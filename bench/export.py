"""Exact GGUF export against onnxruntime-genai's builder and llama.cpp, on the same GGUF, one JSON
line per figure: export time, peak RSS and size; parity of both exports against the GGUF itself;
prefill and decode speed (2 threads, greedy, the same prompt), each engine in its own process.

    python bench/export.py [--model smollm2-135m|qwen2.5-coder-0.5b|...] [--no-builder]

The builder and llama.cpp need attar[export] and llama-cpp-python; without them their rows say so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
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
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))  # this image only
print(json.dumps({"prefill": sorted(pre)[1], "decode": sorted(dec)[1], "prompt_tokens": len(ids), "rss_mb": hwm / 1024}))
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
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))  # this image only
print(json.dumps({"prefill": sorted(pre)[1], "decode": sorted(dec)[1], "prompt_tokens": len(ids), "rss_mb": hwm / 1024}))
"""


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def worker(code: str, path: Path, prompt: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, str(path), prompt, str(NEW_TOKENS), str(THREADS)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


EXPORT_WORKER = r"""
import json, resource, sys, time
from attar.export.convert import export_model
t = time.perf_counter()
export_model(sys.argv[1], sys.argv[2], precision=None if sys.argv[3] == "exact" else sys.argv[3], check=False,
             log=lambda m: None)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))  # ru_maxrss survives exec
print(json.dumps({"seconds": time.perf_counter() - t, "rss_mb": hwm / 1024}))
"""


def export(gguf: Path, out: Path, how: str) -> None:
    """Export in a child process (a clean peak RSS), then check it against the GGUF."""
    from attar.runtime.parity import parity_report
    from attar.runtime.reference import GGUFScorer

    result = subprocess.run([sys.executable, "-c", EXPORT_WORKER, str(gguf), str(out), how], capture_output=True,
                            text=True)
    if result.returncode != 0:
        emit(figure=f"export ({how})", skipped=(result.stderr.strip().splitlines() or ["?"])[-1])
        return
    row = json.loads(result.stdout.strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    report = parity_report(GGUFScorer(gguf), out)
    emit(figure=f"export ({how})", seconds=round(row["seconds"], 1), peak_rss_mb=round(row["rss_mb"]),
         size_mb=round(size / 1e6, 1), gguf_mb=round(gguf.stat().st_size / 1e6, 1),
         top1_agreement_vs_gguf=report["top1_agreement"], greedy_exact_match=report["greedy_exact_match"],
         perplexity_gguf=report["perplexity_source"], perplexity_export=report["perplexity_export"])


def main() -> None:
    from attar.runtime.models import DEFAULT_MODEL, gguf_path

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--no-builder", action="store_true")
    args = parser.parse_args()
    gguf = gguf_path(args.model)
    prompt = " ".join(["The agent reads the question, searches the index and writes Python code."] * 12)[:PROMPT_WORDS * 6]
    speeds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for how in ("exact",) if args.no_builder else ("exact", "int4"):
            out = Path(tmp) / how
            export(gguf, out, how)
            if out.exists():
                r = worker(ORT_WORKER, out, prompt)
                speeds[how] = r
                emit(figure=f"onnxruntime-genai, {how} export", model=args.model, prefill_tok_s=round(r["prefill"], 1),
                     decode_tok_s=round(r["decode"], 1), peak_rss_mb=round(r["rss_mb"]), prompt_tokens=r["prompt_tokens"],
                     threads=THREADS)
    try:
        speeds["llama.cpp"] = cpp = worker(LLAMA_WORKER, gguf, prompt)
        emit(figure="llama.cpp, the GGUF itself", model=args.model, prefill_tok_s=round(cpp["prefill"], 1),
             decode_tok_s=round(cpp["decode"], 1), peak_rss_mb=round(cpp["rss_mb"]), prompt_tokens=cpp["prompt_tokens"],
             threads=THREADS)
    except (RuntimeError, FileNotFoundError) as exc:
        emit(figure="llama.cpp, the GGUF itself", skipped=f"llama-cpp-python unavailable: {exc}")
    exact = speeds.get("exact")
    for base, target in (("int4", 1.0), ("llama.cpp", 1.5)):
        if exact and base in speeds:
            ratio = exact["decode"] / speeds[base]["decode"]
            emit(figure=f"decode ratio exact / {base}", model=args.model, value=round(ratio, 3), target=target,
                 meets_target=ratio >= target, prefill_ratio=round(exact["prefill"] / speeds[base]["prefill"], 3))


if __name__ == "__main__":
    main()
