"""`attar serve` against the same work done in process, one JSON line per figure (ratios in one
run, since the machine is noisy).

    python bench/serve.py [--model default] [--requests 1000]

Figures: a warm request's time to first token through the server vs in process; `attar chat`
answering "What is 17 * 23?" through a running server vs loading the model itself; 8
concurrent clients vs the same 8 requests one after another (and whether they answer the
same); the server's resident memory after `--requests` mixed requests (hostile ones included)
vs after the first 10.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

QUESTION = "What is 17 * 23?"
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Explain in two sentences why the sky is blue."}]


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict | bytes, path: str = "/v1/chat/completions") -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, data=data, headers={
                "Content-Type": "application/json"}), timeout=600) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def first_token_via_server(url: str, max_tokens: int = 8) -> float:
    body = json.dumps({"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
    began = time.perf_counter()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if line.startswith(b"data: ") and b'"content": "' in line and b'"content": ""' not in line:
                first = time.perf_counter() - began
                break
        for _ in response:
            pass
    return first


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    from attar.runtime.llm import Sampling
    from attar.runtime.models import load_backend

    attar = os.path.join(os.path.dirname(sys.executable), "attar")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([attar, "serve", "--model", args.model, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/attar/info", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit(proc.stderr.read())
                time.sleep(0.5)

        # 1. Time to first token, warm: the same request, its prompt cached on both sides.
        backend = load_backend(None if args.model == "default" else args.model)
        local, remote = [], []
        for _ in range(6):
            began, first = time.perf_counter(), []
            backend.generate(MESSAGES, sampling=Sampling(max_new_tokens=8),
                             on_text=lambda piece: first or first.append(time.perf_counter() - began))
            local.append(first[0])
            remote.append(first_token_via_server(url))
        in_process, served = statistics.median(local[1:]), statistics.median(remote[1:])
        emit(figure="warm time to first token, server vs in process", server_ms=round(served * 1000, 1),
             in_process_ms=round(in_process * 1000, 1), ratio=round(served / in_process, 2), target_ratio=1.1)
        del backend

        # 2. `attar chat` through the running server vs loading the model itself.
        def chat(*flags: str) -> tuple[float, str]:
            began = time.perf_counter()
            out = subprocess.run([attar, "chat", QUESTION, *flags, *(["--model", args.model] if args.model != "default"
                                                                     else [])], capture_output=True, text=True)
            return time.perf_counter() - began, out.stdout.strip()

        served_s, served_answer = chat("--server", url)
        local_s, local_answer = chat("--local")
        emit(figure=f"attar chat '{QUESTION}' wall, through the server vs in its own process",
             server_s=round(served_s, 2), local_s=round(local_s, 2), target_server_s=2.0,
             answers=[served_answer, local_answer])

        # 3. 8 clients at once vs the same 8 requests one after another; seeded sampling.
        bodies = [{"messages": [{"role": "user", "content": f"Write one sentence about the number {i}."}],
                   "max_tokens": 48, "temperature": 0.7, "seed": i} for i in range(8)]
        began = time.perf_counter()
        sequential = [post(url, b)[1] for b in bodies]
        sequential_s = time.perf_counter() - began
        began = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            concurrent = list(pool.map(lambda b: post(url, b)[1], bodies))
        concurrent_s = time.perf_counter() - began
        texts = lambda replies: [json.loads(r)["choices"][0]["message"]["content"] for r in replies]  # noqa: E731
        emit(figure="8 concurrent clients vs 8 sequential requests, requests/hour",
             concurrent_per_hour=round(8 * 3600 / concurrent_s), sequential_per_hour=round(8 * 3600 / sequential_s),
             ratio=round(sequential_s / concurrent_s, 2), target_ratio=2.0,
             same_outputs=texts(sequential) == texts(concurrent))

        # 4. Memory over many mixed requests, hostile ones among them.
        mixed = [({"messages": MESSAGES, "max_tokens": 4, "temperature": 0.5, "seed": 1}, "/v1/chat/completions"),
                 (b'{"messages": [', "/v1/chat/completions"),
                 (b"[" * 20_000, "/v1/chat/completions"),
                 ({"messages": [{"role": "user", "content": "x" * 150_000}], "max_tokens": 1}, "/v1/chat/completions"),
                 ({"messages": MESSAGES, "max_tokens": 10**6}, "/v1/chat/completions"),
                 ({"question": "What is 2 + 2?", "max_steps": 1, "stream": False}, "/v1/agent")]
        after_10 = None
        for i in range(args.requests):
            body, path = mixed[i % len(mixed)]
            post(url, body, path)
            if i == 9:
                after_10 = rss_mb(proc.pid)
        after = rss_mb(proc.pid)
        emit(figure=f"server resident memory after {args.requests} mixed requests vs after 10", after_10_mb=round(after_10),
             after_all_mb=round(after), growth=round(after / after_10 - 1, 3), target_growth=0.10)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
