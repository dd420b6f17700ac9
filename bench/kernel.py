"""attar's kernels beside onnxruntime's own ops, in one run: what each costs (a decode step of R
rows over real cache contents, a prefill) and how exactly each answers (the parity check against
the GGUF, per graph, on either attention; the int8 rows give the bits of onnxruntime's ops, so
they leave parity as it is). One JSON line a figure.

    python bench/kernel.py [--model qwen2.5-coder-0.5b | FOLDER] [--rows 1,8,16] [--past 600,1500] [--no-parity]

Engines per graph, their steps interleaved: onnxruntime's ops; attar's attention alone; on the
exact graph, where the library has them (AVX2, with AVX-512 VNNI or without VNNI), attar's
attention with the Q8 products (MatMulNBits as Q8MatMul), then with the biases and the MLP's
SwiGLU inside them too; and on the int8 graph attar's attention with the int8 rows, then with
the int8 products on packed weights too, each with its quantization, bias and SwiGLU inside (what
`attar kernel build` gives, on a CPU with AVX-512 VNNI or AVX2). Needs the kernels built; a
catalog model is pulled with its int8 graph."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from int8 import prefill_ms, timed_ms  # noqa: E402

from attar.runtime import kernels  # noqa: E402
from attar.runtime.engine import Engine  # noqa: E402
from attar.runtime.modeldir import ExportDir  # noqa: E402
from attar.runtime.models import CATALOG, gguf_path, pull  # noqa: E402

import numpy as np  # noqa: E402


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


@contextlib.contextmanager
def without(edit: str, none: object = 0):
    """Engines made inside leave out one of `kernels`' graph edits (e.g. "use_int8_rows"; a pattern
    a fused node takes in, such as "_gate", finds `none`)."""
    real = getattr(kernels, edit)
    setattr(kernels, edit, lambda *args: none)
    try:
        yield
    finally:
        setattr(kernels, edit, real)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,8,16")
    parser.add_argument("--past", default="600,1500", help="tokens in each row's cache")
    parser.add_argument("--no-parity", action="store_true")
    args = parser.parse_args()
    if kernels.library() is None:
        raise SystemExit("the kernel is not built: attar kernel build")
    folder = ExportDir.open(args.model if Path(args.model).is_dir() else pull(args.model, int8=True))
    rows, pasts = [int(r) for r in args.rows.split(",")], [int(p) for p in args.past.split(",")]
    graphs = [("exact", False)] + ([("int8", True)] if folder.int8_decoder is not None else [])
    for graph, int8 in graphs:
        # The engines at once, their steps interleaved: this VM's speed drifts from minute to
        # minute, and one engine timed after the other compared two machines. (Fair since the
        # engine's threads stopped spinning when idle: each took a core from the other before.)
        def engine(kernel: bool) -> Engine:
            return Engine(folder, threads=args.threads, max_rows=max(rows), int8=int8, kernel=kernel)

        engines = {"onnxruntime": engine(False)}
        with without("use_int8_rows"), without("use_q8_matmul"):  # attention alone: the rest onnxruntime's ops
            engines["attention"] = engine(True)
        if not int8 and kernels._q8_packer() is not None:  # MatMulNBits as Q8MatMul
            with without("_bias", None), without("_gate", None):  # the biases and the SwiGLU on onnxruntime's ops
                engines["attention+q8 products"] = engine(True)
            engines["attention+q8 products+bias+swiglu"] = engine(True)
        if int8:
            with without("use_int8_matmul"):
                engines["attention+int8 rows"] = engine(True)
            engines["attention+int8 rows+products"] = engine(True)
        ms: dict[str, dict] = {name: {} for name in engines}
        for p in pasts:
            for r in rows:
                ids = np.full((r, 1), 100, dtype=np.int64)
                runs = {name: [] for name in engines}
                for i in range(8):
                    for name, engine in engines.items():
                        runs[name] += timed_ms(engine, ids, p, 1, fill=i == 0)
                for name in engines:
                    ms[name][r, p] = statistics.median(runs[name][1:])
        prompt = {name: [] for name in engines}
        for _ in range(3):
            for name, engine in engines.items():
                prompt[name].append(prefill_ms(engine, 512))
        for name in engines:
            ms[name]["prefill"] = statistics.median(prompt[name])
        del engines
        base = ms.pop("onnxruntime")
        for p in pasts:
            for r in rows:
                emit(figure="decode step ms", model=folder.name, graph=graph, rows=r, past=p, onnxruntime_ms=round(base[r, p], 1),
                     **{f"{name}_ms": round(m[r, p], 1) for name, m in ms.items()},
                     **{f"{name}_speedup": round(base[r, p] / m[r, p], 2) for name, m in ms.items()})
            if {1, 8} <= set(rows):
                emit(figure="decode step of 8 rows vs 1", model=folder.name, graph=graph, past=p,
                     onnxruntime=round(base[8, p] / base[1, p], 2),
                     **{name: round(m[8, p] / m[1, p], 2) for name, m in ms.items()}, goal=1.3)
        emit(figure="prefill ms, 512 tokens", model=folder.name, graph=graph, onnxruntime_ms=round(base["prefill"]),
             **{f"{name}_ms": round(m["prefill"]) for name, m in ms.items()})
    if args.no_parity or folder.name not in CATALOG:
        return
    from attar.runtime.parity import parity_report
    from attar.runtime.reference import GGUFScorer

    reference = GGUFScorer(gguf_path(folder.name))
    for kernel in (False, True):
        report = parity_report(reference, folder.path, kernel=kernel)
        for graph, part in (("exact", report), ("int8", report.get("int8"))):
            if part:
                emit(figure="parity against the GGUF", model=folder.name, graph=graph, attention=report["attention"],
                     top1=part["top1_agreement"], held_out_top1=part["held_out_top1_agreement"],
                     max_abs_logit_diff=part["max_abs_logit_diff"], perplexity=part["perplexity_export"],
                     perplexity_gguf=report["perplexity_source"])


if __name__ == "__main__":
    main()
