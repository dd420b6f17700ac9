"""Teacher trajectory throughput against a local OpenAI-compatible server (llama.cpp serving the
default model), with 1 and 4 questions in flight, one JSON line each.

    python bench/generate.py [--questions 8]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    from attar.distill.data import Question
    from attar.distill.teacher import GenerateConfig, generate
    from attar.runtime.models import gguf_path as default_gguf
    from attar.runtime.llm import OpenAIBackend

    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=8)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(default_gguf("smollm2-135m")), "--port",
                               str(port), "--n_ctx", "4096", "--n_threads", "2", "--n_parallel", "4"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "default", completions=True)
        qs = [Question(f"q{i}", f"What is {i} times {i + 7}?", str(i * (i + 7)), "numeric") for i in range(args.questions)]
        for concurrency in (1, 4):
            with tempfile.TemporaryDirectory() as tmp:
                began = time.perf_counter()
                summary = generate(qs, backend, Path(tmp), GenerateConfig(concurrency=concurrency, max_steps=3,
                                                                          max_new_tokens=256), progress=False)
                minutes = (time.perf_counter() - began) / 60
            print(json.dumps({"figure": f"trajectories per minute, concurrency {concurrency}",
                              "value": round(summary["trajectories"] / minutes, 2),
                              "teacher": "SmolLM2-135M Q4_1 on llama.cpp server, 2 threads",
                              "failed": summary["failed"]}), flush=True)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
