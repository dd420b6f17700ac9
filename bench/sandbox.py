"""Sandbox speed, one JSON line per figure, each beside a `python3 -c` subprocess baseline
measured in the same run (ratios, since the machine is noisy).

    python bench/sandbox.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

COLD = """
import time, sys
t = time.perf_counter()
from attar.runtime.sandbox import Sandbox
sb = Sandbox()
r = sb.run("1 + 1")
print(time.perf_counter() - t)
sb.close()
"""


def emit(figure: str, value: float, unit: str, baseline: float | None = None, target: float | None = None) -> None:
    row = {"figure": figure, "value": round(value, 4), "unit": unit}
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


def cold_start(cache: str) -> float:
    out = subprocess.run([sys.executable, "-c", COLD], capture_output=True, text=True, check=True,
                         env={**os.environ, "ATTAR_CACHE": cache})
    return float(out.stdout.strip().splitlines()[-1]) * 1000


def main() -> None:
    from attar.runtime.sandbox import Sandbox

    baseline = python_c_baseline()
    emit("python3 -c subprocess (baseline)", baseline, "ms")
    with tempfile.TemporaryDirectory() as cache:
        emit("cold start, first session ever (compiles the module)", cold_start(cache), "ms", baseline)
        cached = statistics.median(cold_start(cache) for _ in range(5))
        emit("cold start, cached compiled module", cached, "ms", baseline, target=150)

    calls = []
    with Sandbox(tools={"echo": lambda x: calls.append(x) or x}) as sb:
        sb.run("x = 0")
        n = 500
        t = time.perf_counter()
        for _ in range(n):
            sb.run("x += 1")
        emit("warm cell, trivial", (time.perf_counter() - t) / n * 1000, "ms", baseline, target=1.0)
        t = time.perf_counter()
        for _ in range(n):
            sb.run("echo(1)")
        emit("warm cell with one tool round trip", (time.perf_counter() - t) / n * 1000, "ms", baseline, target=1.0)

    # Forks of a session with a realistic agent history (5 cells), as SAG makes them.
    with Sandbox() as sb:
        for i in range(5):
            sb.run(f"v{i} = [j * j for j in range(1000)]")
        t = time.perf_counter()
        fork = sb.fork()
        emit("fork, cold pool (5 cells replayed)", (time.perf_counter() - t) * 1000, "ms", baseline)
        fork.close()
        Sandbox.keep_warm(4)
        time.sleep(1.0)
        times = []
        for _ in range(8):
            t = time.perf_counter()
            f = sb.fork()
            times.append((time.perf_counter() - t) * 1000)
            f.close()
            time.sleep(0.3)  # let the pool refill, as it does between agent steps
        emit("fork, warm pool (5 cells replayed)", statistics.median(times), "ms", baseline, target=50)


if __name__ == "__main__":
    main()
