"""Retrieval speed and quality, one JSON line per figure.

Embedding is measured on generated ~100-word passages; the index part on clustered random
384-d vectors at 10k, 100k and 1M (what embedding 1M real passages would take here is reported
from the measured throughput instead). Recall@10 is against exact (brute-force) search.

    python bench/retrieval.py [--sizes 10000,100000,1000000] [--embed 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import onnxruntime  # noqa: F401  (before usearch: the other import order segfaults)

OPEN_WORKER = r"""
import sys, time, re
t = time.perf_counter()
from usearch.index import Index
idx = Index.restore(sys.argv[1], view=True)
ms = (time.perf_counter() - t) * 1000
idx.search(idx[0] if False else __import__("numpy").ones(384, dtype="float32"), 3)
rss = int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
print(ms, rss)
"""

WORDS = ("river city company founded invention engineer population bridge century museum market harbour "
         "railway mountain province festival treaty dynasty library observatory").split()


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def passages(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(80, 120))) for _ in range(n)]


def clustered(n: int, dim: int = 384, clusters: int = 1000, latent: int = 32, seed: int = 0) -> np.ndarray:
    """Unit vectors shaped like sentence embeddings: a mixture of clusters in a low-dimensional
    latent space, projected into `dim` dimensions, plus a little isotropic noise. (Isotropic
    high-dimensional noise alone makes every point equidistant, which no real corpus is.)"""
    rng = np.random.default_rng(0)  # the same space for every sample
    centers = rng.standard_normal((clusters, latent)).astype(np.float32)
    projection = rng.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
    rng = np.random.default_rng(seed)
    z = centers[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, latent)).astype(np.float32)
    x = z @ projection + 0.05 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_embedding(n: int) -> float:
    from attar.runtime.embedder import Embedder

    emb = Embedder()
    texts = passages(n)
    emb.embed(texts[:32])
    t = time.perf_counter()
    emb.embed(texts)
    rate = n / (time.perf_counter() - t)
    emit(figure="embedding throughput (~100-word passages, batch 32)", value=round(rate, 1), unit="passages/s",
         target=200, meets_target=rate >= 200)
    queries = [f"which {w} was founded in the century" for w in WORDS]
    emb.embed(queries[:2])
    times = []
    for q in queries * 5:
        t = time.perf_counter()
        emb.embed([q])
        times.append((time.perf_counter() - t) * 1000)
    emit(figure="query embedding latency p50", value=round(float(np.percentile(times, 50)), 3), unit="ms",
         p99=round(float(np.percentile(times, 99)), 3), target=3, meets_target=float(np.percentile(times, 50)) <= 3)
    return rate


def bench_index(n: int, embed_rate: float, dtype: str = "f16") -> None:
    from usearch.index import Index

    vectors = clustered(n)
    index = Index(ndim=384, metric="cos", dtype=dtype, connectivity=16)
    t = time.perf_counter()
    index.add(np.arange(n, dtype=np.uint64), vectors, threads=os.cpu_count() or 2)
    build = time.perf_counter() - t
    queries = clustered(200, seed=1)
    exact = vectors @ queries.T
    truth = np.argsort(-exact, axis=0)[:10].T
    for es in (64, 128, 256):
        index.expansion_search = es
        found, lat3, lat10 = [], [], []
        for i, q in enumerate(queries):
            t = time.perf_counter()
            index.search(q, 3)
            lat3.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            m = index.search(q, 10)
            lat10.append((time.perf_counter() - t) * 1000)
            found.append(len(set(m.keys.tolist()) & set(truth[i].tolist())) / 10)
        recall = float(np.mean(found))
        emit(figure=f"search {n} vectors ({dtype}, expansion_search {es})",
             p50_k3_ms=round(float(np.percentile(lat3, 50)), 3), p99_k3_ms=round(float(np.percentile(lat3, 99)), 3),
             p50_k10_ms=round(float(np.percentile(lat10, 50)), 3), p99_k10_ms=round(float(np.percentile(lat10, 99)), 3),
             recall_at_10=round(recall, 4))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.usearch"
        index.save(str(path))
        opened = subprocess.run([sys.executable, "-c", OPEN_WORKER, str(path)], capture_output=True, text=True,
                                check=True).stdout.split()
        emit(figure=f"index {n} vectors ({dtype})", build_s=round(build, 2),
             index_rate_per_s=round(n / build), size_mb=round(path.stat().st_size / 1e6, 1),
             open_ms=round(float(opened[0]), 1), rss_after_open_mb=round(float(opened[1])),
             embedding_time_estimate_h=round(n / embed_rate / 3600, 2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--embed", type=int, default=1000)
    args = parser.parse_args()
    rate = bench_embedding(args.embed)
    for n in map(int, args.sizes.split(",")):
        bench_index(n, rate)
    emit(figure="peak RSS of this bench", value=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
         unit="MB")


if __name__ == "__main__":
    main()
