"""The int8 graph (projections on the CPU's integer matrix units) beside the exact graph of the same
export, in one run: a decode step of R rows (and of 8 rows holding copies of one prompt, which
attar's attention reads once), a prefill, and SAG N=8 vs N=1. One JSON line a figure.

    python bench/int8.py [--model qwen2.5-coder-0.5b | FOLDER] [--threads 2] [--rows 1,2,4,8,16] [--past 600]

`--rows 8,16,24,32 --model qwen2.5-coder-1.5b` is the teacher's batch (`distill generate --concurrency`).

A catalog model is pulled with `--int8-graph` first (once: about the model's size again on disk)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from attar.runtime import kernels, prompts
from attar.runtime.engine import Engine, Request
from attar.runtime.llm import EngineBackend
from attar.runtime.modeldir import ExportDir
from attar.runtime.models import CATALOG, gguf_path, pull
from attar.runtime.sag import SAMPLING as SAG_SAMPLING
from attar.runtime.tools import describe, final_answer


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def timed_ms(engine: Engine, ids: np.ndarray, past: int, repeat: int, fill: bool = True,
             shares: np.ndarray = kernels.NO_SHARES) -> list[float]:
    """ms of each of `repeat` runs of one step feeding `ids` (rows × new) to caches of `past` tokens
    (`fill`: of real numbers first, each row its own; False: as the last call left them). `shares`:
    which rows hold another's prefix, as attar's attention is told (the engine's `KVPool.shares`)."""
    rows, new = ids.shape
    engine.pool.reserve(rows, past + new + 8)
    # Real numbers in the cache: a fresh pool is the zero page, which every read finds in the cache,
    # and attention over it costs nothing like a step over a real conversation.
    rng = np.random.default_rng(0)
    for buf in engine.pool.keys + engine.pool.values if fill else ():
        buf[:rows, :, :past] = rng.standard_normal(buf[:rows, :, :past].shape, dtype=np.float32)
    mask = np.ones((rows, past + new), dtype=np.int64)
    names = engine.shape.names
    times = []
    for _ in range(repeat):
        io = engine.pool.binding(engine.session, engine.extra, 0, rows)
        io.bind_cpu_input(names["input_ids"], ids)
        io.bind_cpu_input(names["attention_mask"], mask)
        if engine.kernel:
            io.bind_cpu_input(kernels.SHARED, shares)
        io.bind_output(names["logits"])
        began = time.perf_counter()
        engine.session.run_with_iobinding(io)
        times.append(1000 * (time.perf_counter() - began))
    return times


def step_ms(engine: Engine, rows: int, past: int) -> float:
    """Median ms of one decode step of `rows` rows whose caches hold `past` tokens (first run dropped)."""
    return statistics.median(timed_ms(engine, np.full((rows, 1), 100, dtype=np.int64), past, 7)[1:])


def shared_prefix_ms(engine: Engine, rows: int, past: int, rounds: int = 12) -> tuple[float, float]:
    """Median ms of a decode step of `rows` rows whose caches are copies of one prompt's (SAG's N
    candidates), attention reading that prompt once for them all (`KVPool.shares`) and each row
    its own copy, interleaved; the same logits either way (checked)."""
    timed_ms(engine, np.full((1, 1), 100, dtype=np.int64), past, 1)  # row 0: a prompt's cache
    for buf in engine.pool.keys + engine.pool.values:
        buf[1:rows, :, :past] = buf[0, :, :past]
    shares = np.array([(0, 0)] + [(0, past)] * (rows - 1), np.int32)
    ids = np.full((rows, 1), 100, dtype=np.int64)
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(rounds):
        for told in ((True, False) if i % 2 else (False, True)):
            times[told] += timed_ms(engine, ids, past, 1, fill=False, shares=shares if told else kernels.NO_SHARES)
    logits = [engine._forward(0, rows, ids, [past] * rows, told).logits.copy() for told in (shares, None)]
    if not np.array_equal(*logits):
        raise SystemExit("reading a shared prefix once changed the logits")
    return statistics.median(times[True][2:]), statistics.median(times[False][2:])


def prefill_ms(engine: Engine, tokens: int) -> float:
    return statistics.median(timed_ms(engine, np.arange(100, 100 + tokens, dtype=np.int64)[None], 0, 3))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--past", type=int, default=600, help="tokens already in each row's cache")
    parser.add_argument("--rows", default="1,2,4,8,16", help="decode step sizes to time (1 and 8 give the #21 ratio)")
    parser.add_argument("--gguf", type=Path, help="the GGUF a FOLDER was exported from (for llama.cpp's figure)")
    args = parser.parse_args()
    sizes = sorted({int(r) for r in args.rows.split(",")})
    folder = ExportDir.open(args.model if Path(args.model).is_dir() else pull(args.model, int8=True))
    if folder.int8_decoder is None:
        raise SystemExit(f"{folder.path} has no int8 graph: `attar export GGUF -o OUT --int8-graph` makes one")
    ms: dict[str, dict[int, float]] = {}
    prefill: dict[str, dict[int, float]] = {}
    for graph, int8 in (("exact", False), ("int8", True)):
        engine = Engine(folder, threads=args.threads, max_rows=max(sizes), int8=int8)
        ms[graph] = {rows: step_ms(engine, rows, args.past) for rows in sizes}
        prefill[graph] = {tokens: prefill_ms(engine, tokens) for tokens in (128, 512)}
        if int8 and engine.kernel and 8 in sizes:
            once, copies = shared_prefix_ms(engine, 8, args.past)
            emit(figure="decode step of 8 rows holding copies of one prompt", model=args.model, past=args.past,
                 read_once_ms=round(once, 1), each_its_copy_ms=round(copies, 1), ratio=round(once / copies, 3),
                 over_one_row=round(once / ms[graph][1], 2))
        del engine
    for rows in sizes:
        emit(figure="decode step ms", model=args.model, rows=rows, past=args.past, exact_ms=round(ms["exact"][rows], 1),
             int8_ms=round(ms["int8"][rows], 1), speedup=round(ms["exact"][rows] / ms["int8"][rows], 2),
             int8_tokens_per_s=round(1000 * rows / ms["int8"][rows], 1))
    if {1, 8} <= set(sizes):
        emit(figure="decode step of 8 rows vs 1", model=args.model, exact=round(ms["exact"][8] / ms["exact"][1], 2),
             int8=round(ms["int8"][8] / ms["int8"][1], 2),
             int8_8_rows_vs_exact_1_row=round(ms["int8"][8] / ms["exact"][1], 2), goal=1.3)
    for tokens in (128, 512):
        emit(figure="prefill ms", model=args.model, tokens=tokens, exact_ms=round(prefill["exact"][tokens], 1),
             int8_ms=round(prefill["int8"][tokens], 1), speedup=round(prefill["exact"][tokens] / prefill["int8"][tokens], 2))

    single_stream(folder, args.gguf or (gguf_path(args.model) if args.model in CATALOG else None), args.threads)

    messages = [{"role": "system", "content": prompts.system(describe(final_answer))},
                {"role": "user", "content": prompts.TASK.format(question="What is 17 * 23 + 5?")}]
    sampling = replace(SAG_SAMPLING, seed=0, max_new_tokens=48)
    walls: dict[str, dict[int, float]] = {}
    for graph, int8 in (("exact", False), ("int8", True)):
        backend = EngineBackend(folder, threads=args.threads, int8=int8)
        backend.generate(messages, sampling=replace(sampling, max_new_tokens=1))  # the prompt is cached, as in a run
        walls[graph] = {}
        for n in (1, 8):
            times = []
            for _ in range(3):
                began = time.perf_counter()
                backend.generate_batch(messages, [replace(sampling, seed=i) for i in range(n)], stop=prompts.STOP)
                times.append(time.perf_counter() - began)
            walls[graph][n] = statistics.median(times)
        del backend
        emit(figure="SAG step wall, N=8 vs N=1", model=args.model, graph=graph, n1_s=round(walls[graph][1], 3),
             n8_s=round(walls[graph][8], 3), ratio=round(walls[graph][8] / walls[graph][1], 2), goal=1.5)
    emit(figure="SAG N=8 step, int8 vs exact", model=args.model, speedup=round(walls["exact"][8] / walls["int8"][8], 2))


def single_stream(folder: ExportDir, gguf: Path | None, threads: int, new: int = 128) -> None:
    """Greedy decode tok/s of one stream on each graph, one token a step (the kernels alone; this
    prompt repeats itself, which would flatter speculation: bench/speculation.py measures that on
    agent work), and llama.cpp's on the GGUF it came from (bench/export.py's worker), same prompt."""
    from export import LLAMA_WORKER, PROMPT_WORDS, worker

    prompt = " ".join(["The agent reads the question, searches the index and writes Python code."] * 12)[:PROMPT_WORDS * 6]
    rates = {}
    for graph, int8 in (("exact", False), ("int8", True)):
        backend = EngineBackend(folder, threads=threads, int8=int8, speculate=False)
        ids = backend.tokenizer.encode(prompt, add_special_tokens=False).ids
        runs = []
        for _ in range(3):
            backend.engine.pool.forget()  # no cached prefix: a fresh prompt
            request = backend.engine.run(Request(ids, new, eos=frozenset()))
            runs.append((len(request.out) - 1) / (time.perf_counter() - request.began - request.first_token_s))
        rates[graph] = statistics.median(runs)
        del backend
    try:
        rates["llama.cpp"] = worker(LLAMA_WORKER, gguf, prompt)["decode"] if gguf else None
    except (RuntimeError, FileNotFoundError):
        rates["llama.cpp"] = None
    cpp = rates["llama.cpp"]
    emit(figure="single-stream decode tok/s", model=folder.name, exact=round(rates["exact"], 1),
         int8=round(rates["int8"], 1), llama_cpp=round(cpp, 1) if cpp else "unavailable",
         int8_over_llama_cpp=round(rates["int8"] / cpp, 2) if cpp else None, goal=1.2)


if __name__ == "__main__":
    main()
