"""Sandbox speed and memory, one JSON line per figure, each beside a `python3 -c` subprocess
baseline measured in the same run (ratios, since the machine is noisy).

    python bench/sandbox.py [--baseline REV]

--baseline REV also runs the figures on the sandbox of git revision REV (its sandbox.py and
guest_driver.py, loaded side by side in this process), so a change is compared in one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLD = """
import importlib.util, sys, time
t = time.perf_counter()
if len(sys.argv) > 1:  # a baseline revision's sandbox.py
    spec = importlib.util.spec_from_file_location("baseline_sandbox", sys.argv[1])
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    Sandbox = module.Sandbox
else:
    from attar.runtime.sandbox import Sandbox
sb = Sandbox()
r = sb.run("1 + 1")
print(time.perf_counter() - t)
sb.close()
"""
SYMPY_CELL = "import sympy\nx = sympy.Symbol('x')\nsympy.solve(x**2 - 2, x)"


def emit(figure: str, value: float, unit: str, baseline: float | None = None, target: float | None = None,
         **extra) -> None:
    row = {"figure": figure, "value": round(value, 4), "unit": unit, **extra}
    if baseline is not None:
        row["baseline_python3_c_ms"] = round(baseline, 2)
        row["ratio_to_baseline"] = round(value / baseline, 3)
    if target is not None:
        row["target"] = target
        row["meets_target"] = value <= target
    print(json.dumps(row), flush=True)


def python_c_baseline(n: int = 10) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "print(1 + 1)"], capture_output=True, check=True)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def cold_start(cache: str, module_file: str | None = None) -> float:
    out = subprocess.run([sys.executable, "-c", COLD, *([module_file] if module_file else [])],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "ATTAR_CACHE": cache})
    return float(out.stdout.strip().splitlines()[-1]) * 1000


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def load_revision(rev: str):
    """The sandbox module of git revision `rev`, importable beside today's."""
    folder = Path(tempfile.mkdtemp(prefix="attar-sandbox-"))
    for name in ("sandbox.py", "guest_driver.py"):
        text = subprocess.run(["git", "show", f"{rev}:runtime/{name}"], capture_output=True, text=True, check=True).stdout
        (folder / name).write_text(text)
    spec = importlib.util.spec_from_file_location(f"sandbox_{rev}", folder / "sandbox.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def warm_figures(mod, label: str, baseline: float) -> None:
    """The figures a session that never imports sympy sees: warm cells, tool calls, forks."""
    Sandbox = mod.Sandbox
    calls = []
    with Sandbox(tools={"echo": lambda x: calls.append(x) or x}) as sb:
        sb.run("x = 0")
        n = 500
        t = time.perf_counter()
        for _ in range(n):
            sb.run("x += 1")
        emit(f"{label}: warm cell, trivial", (time.perf_counter() - t) / n * 1000, "ms", baseline, target=1.0)
        t = time.perf_counter()
        for _ in range(n):
            sb.run("echo(1)")
        emit(f"{label}: warm cell with one tool round trip", (time.perf_counter() - t) / n * 1000, "ms", baseline,
             target=1.0)
    # Forks of a session with a realistic agent history (5 cells), as SAG makes them.
    limits = mod.Limits(timeout_s=9.0)  # a pool of its own: no other figure's spares
    with Sandbox(limits=limits) as sb:
        for i in range(5):
            sb.run(f"v{i} = [j * j for j in range(1000)]")
        t = time.perf_counter()
        fork = sb.fork()
        emit(f"{label}: fork, cold pool (5 cells replayed)", (time.perf_counter() - t) * 1000, "ms", baseline)
        fork.close()
        Sandbox.keep_warm(4, limits)
        time.sleep(1.0)
        times = []
        for _ in range(8):
            t = time.perf_counter()
            f = sb.fork()
            times.append((time.perf_counter() - t) * 1000)
            f.close()
            time.sleep(0.3)  # let the pool refill, as it does between agent steps
        emit(f"{label}: fork, warm pool (5 cells replayed)", statistics.median(times), "ms", baseline, target=50)


def toolbox_figures(baseline: float) -> None:
    from attar.runtime.sandbox import Limits, Sandbox, _Interpreter

    limits = Limits(timeout_s=30.0)
    with Sandbox(limits=limits) as sb:  # no pool: the session pays the import
        t = time.perf_counter()
        r = sb.run(SYMPY_CELL)
        emit("sympy solve cell, cold interpreter (imports sympy)", (time.perf_counter() - t) * 1000, "ms", baseline,
             ok=r.output == "[-sqrt(2), sqrt(2)]")
    from attar.runtime.sandbox import _pool

    Sandbox.keep_warm(1, limits)
    while not _pool.has_warm(limits):  # the pool's spare imports the toolbox in the background
        time.sleep(0.1)
    t = time.perf_counter()
    with Sandbox(limits=limits) as sb:
        started = time.perf_counter()
        r = sb.run(SYMPY_CELL)
        cell = time.perf_counter() - started
    emit("sympy solve cell, fresh session from a warm pool", cell * 1000, "ms", baseline, target=50,
         ok=r.output == "[-sqrt(2), sqrt(2)]", session_start_ms=round((started - t) * 1000, 1))
    # Memory each pooled interpreter costs, with and without the toolbox imported.
    for warm in (False, True):
        before, interps = rss_mb(), [_Interpreter(Limits()) for _ in range(4)]
        for interp in interps:
            if warm:
                interp.warm()
            else:
                interp.send({"tools": [], "recursion_limit": 100, "output_limit": 100}, time.monotonic() + 30)
                interp.next_message(time.monotonic() + 30)
        emit(f"memory per pooled interpreter, {'toolbox imported' if warm else 'standard library only'}",
             (rss_mb() - before) / len(interps), "MB")
        for interp in interps:
            interp.close()


def committed_cells() -> None:
    """Every code cell of the committed teacher trajectories, run again in today's sandbox: how
    many still fail to import what they ask for (they failed when the teacher wrote them)."""
    import gzip

    from attar.runtime.agent import parse_code
    from attar.runtime.sandbox import Limits, Sandbox

    path = Path(__file__).resolve().parent.parent / "data" / "trajectories" / "math-qwen2.5-coder-1.5b.jsonl.gz"
    records = [json.loads(line) for line in gzip.open(path, "rt")]
    cells = then = now = runs_then = runs_now = 0
    for record in records:
        messages, hit_then, hit_now = record["messages"], False, False
        with Sandbox(limits=Limits(timeout_s=20)) as sb:
            for i, message in enumerate(messages):
                code = parse_code(message["content"]) if message["role"] == "assistant" else None
                if code is None:
                    continue
                cells += 1
                if i + 1 < len(messages) and "ModuleNotFoundError" in messages[i + 1]["content"]:
                    then, hit_then = then + 1, True
                error = sb.run(code).error or ""
                if "ModuleNotFoundError" in error:
                    now, hit_now = now + 1, True
        runs_then, runs_now = runs_then + hit_then, runs_now + hit_now
    emit("committed teacher trajectories: cells hitting ModuleNotFoundError, now", now, "cells", then_cells=then,
         cells=cells, trajectories=len(records), trajectories_hit_then=runs_then, trajectories_hit_now=runs_now)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", help="git revision whose sandbox runs the same figures in this run")
    args = parser.parse_args()
    import attar.runtime.sandbox as today

    baseline = python_c_baseline()
    emit("python3 -c subprocess (baseline)", baseline, "ms")
    modules = [("today", today)] + ([(args.baseline, load_revision(args.baseline))] if args.baseline else [])
    with tempfile.TemporaryDirectory() as cache:
        emit("cold start, first session ever (compiles the module and the toolbox)", cold_start(cache), "ms", baseline)
        for label, mod in modules:
            module_file = None if mod is today else mod.__file__
            cold_start(cache, module_file)  # its own cache file, if its cache key differs
            cached = statistics.median(cold_start(cache, module_file) for _ in range(5))
            emit(f"{label}: cold start, cached compiled module", cached, "ms", baseline, target=150)
    for label, mod in modules:
        warm_figures(mod, label, baseline)
    toolbox_figures(baseline)
    committed_cells()


if __name__ == "__main__":
    main()
