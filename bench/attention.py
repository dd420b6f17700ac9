"""One decode step's attention, alone, at a model's shape: onnxruntime's GroupQueryAttention against
attar's kernel (`attar kernel build`; each KV head read once for its group of query heads), the
same attention as batched MatMuls over the KV pool, GroupQueryAttention over an int8 cache, and
reading those bytes with numpy. One JSON line per figure; `gb_s` is the KV cache read per second
(attar's kernel keeps it in float16: half the bytes of the others).
It is where a multi-row step's time goes at long rows (README, "The int8 graph"), and what a
better kernel would have to beat.

    python bench/attention.py [--model qwen2.5-coder-1.5b | FOLDER] [--rows 8,16] [--cached 600,1500]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from attar.runtime import kernels
from attar.runtime.modeldir import ExportDir
from attar.runtime.models import CATALOG, pull

F = TensorProto.FLOAT


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def session(nodes, inputs, outputs, threads: int) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*(o if isinstance(o, tuple) else (o, F)), None) for o in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid(kernels.DOMAIN, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if any(n.domain == kernels.DOMAIN for n in nodes):
        kernels.register(options, kernel=True)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def median_ms(run, repeat: int = 15) -> float:
    run()
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - began))
    return statistics.median(times)


def gqa_ms(rows, heads, kv, head, cached, capacity, threads, rng, int8_cache: bool = False, kernel: bool = False) -> float:
    """GroupQueryAttention on one new token a row, past and present sharing one buffer (as the
    engine runs it); `int8_cache`: the cache in int8 with a scale per channel (onnxruntime 1.32's
    quantized KV cache), a quarter of the bytes; `kernel`: on attar's kernel, whose cache is float16."""
    inputs, attrs, kv_type = ["q", "k", "v", "past_k", "past_v", "seqlens", "total"], {}, TensorProto.FLOAT16 if kernel else F
    if int8_cache:
        inputs += ["", "", "", "", "", "k_scale", "v_scale"]
        attrs = dict(kv_cache_bit_width=8, k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL")
        kv_type = TensorProto.INT8
    node = helper.make_node("GroupQueryAttention", inputs, ["out", "present_k", "present_v"],
                            domain=kernels.DOMAIN if kernel else "com.microsoft",
                            num_heads=heads, kv_num_heads=kv, scale=head ** -0.5, **attrs)
    pool = [(rows, kv, capacity, head)] * 2
    s = session([node], [("q", F, [rows, 1, heads * head]), ("k", F, [rows, 1, kv * head]), ("v", F, [rows, 1, kv * head]),
                         ("past_k", kv_type, pool[0]), ("past_v", kv_type, pool[1]), ("seqlens", TensorProto.INT32, [rows]),
                         ("total", TensorProto.INT32, [])] + [(n, F, [kv, 1, head]) for n in ("k_scale", "v_scale") if int8_cache],
                ["out", ("present_k", kv_type), ("present_v", kv_type)], threads)
    io = s.io_binding()
    for name, width in (("q", heads), ("k", kv), ("v", kv)):
        io.bind_cpu_input(name, rng.standard_normal((rows, 1, width * head), dtype=np.float32))
    io.bind_cpu_input("seqlens", np.full(rows, cached - 1, np.int32))
    io.bind_cpu_input("total", np.array(cached, np.int32))
    for name in ("k_scale", "v_scale") if int8_cache else ():
        io.bind_cpu_input(name, np.full((kv, 1, head), 0.02, np.float32))
    for kind in ("k", "v"):
        cache = rng.integers(-100, 100, pool[0]).astype(np.int8) if int8_cache else \
            rng.standard_normal(pool[0], dtype=np.float32).astype(np.float16 if kernel else np.float32)
        buffer = ort.OrtValue.ortvalue_from_numpy(cache)
        io.bind_ortvalue_input(f"past_{kind}", buffer)
        io.bind_ortvalue_output(f"present_{kind}", buffer)
    io.bind_output("out")
    return median_ms(lambda: s.run_with_iobinding(io))


def grouped_ms(rows, heads, kv, head, cached, capacity, threads, rng) -> float:
    """softmax(q·Kᵀ + mask)·V with the query heads of each KV head as the rows of one GEMM; the
    GEMMs span the pool's whole capacity, masked past each row's length."""
    nodes = [helper.make_node("FusedMatMul", ["q", "keys"], ["scores"], domain="com.microsoft", transB=1, alpha=head ** -0.5),
             helper.make_node("Add", ["scores", "mask"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "values"], ["out"])]
    pool = [rows, kv, capacity, head]
    s = session(nodes, [("q", F, [rows, kv, heads // kv, head]), ("keys", F, pool), ("values", F, pool),
                        ("mask", F, [rows, 1, 1, capacity])], ["out"], threads)
    feeds = {"q": rng.standard_normal((rows, kv, heads // kv, head), dtype=np.float32),
             "keys": rng.standard_normal(pool, dtype=np.float32), "values": rng.standard_normal(pool, dtype=np.float32),
             "mask": np.broadcast_to(np.where(np.arange(capacity) < cached, 0, -1e30).astype(np.float32),
                                     (rows, 1, 1, capacity)).copy()}
    io = s.io_binding()
    for name, value in feeds.items():
        io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))
    io.bind_output("out")
    return median_ms(lambda: s.run_with_iobinding(io))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--rows", default="8,16")
    parser.add_argument("--cached", default="600,1500", help="tokens in each row's cache")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    folder = ExportDir.open(args.model if Path(args.model).is_dir() else pull(args.model) if args.model in CATALOG else args.model)
    heads = json.loads((folder.path / "genai_config.json").read_text())["model"]["decoder"]["num_attention_heads"]
    kv, head, layers = folder.kv_heads, folder.head, folder.layers
    rng = np.random.default_rng(0)
    for rows in map(int, args.rows.split(",")):
        for cached in map(int, args.cached.split(",")):
            kv_bytes = 2 * rows * kv * cached * head * 4  # K and V, fp32, what one layer's step must read
            block = np.ones(kv_bytes // 4, np.float32)
            numpy_ms = median_ms(lambda: block.sum())
            gqa = gqa_ms(rows, heads, kv, head, cached, cached + 64, args.threads, rng)
            kernel = gqa_ms(rows, heads, kv, head, cached, cached + 64, args.threads, rng, kernel=True)
            int8 = gqa_ms(rows, heads, kv, head, cached, cached + 64, args.threads, rng, int8_cache=True)
            tight = grouped_ms(rows, heads, kv, head, cached, cached + 64, args.threads, rng)
            loose = grouped_ms(rows, heads, kv, head, cached, 2 * cached, args.threads, rng)
            gb_s = lambda ms: round(kv_bytes / ms / 1e6, 1)  # noqa: E731
            emit(figure="attention ms a layer, one decode step", model=folder.name, rows=rows, cached=cached,
                 heads=heads, kv_heads=kv, head=head, gqa_ms=round(gqa, 2), gqa_gb_s=gb_s(gqa),
                 kernel_ms=round(kernel, 2), kernel_gb_s=round(gb_s(kernel) / 2, 1), kernel_vs_gqa=round(gqa / kernel, 2),
                 gqa_int8_cache_ms=round(int8, 2), int8_cache_vs_gqa=round(gqa / int8, 2), grouped_ms=round(tight, 2), grouped_vs_gqa=round(gqa / tight, 2),
                 grouped_pool_twice_ms=round(loose, 2), grouped_pool_twice_vs_gqa=round(gqa / loose, 2),
                 numpy_read_gb_s=gb_s(numpy_ms), gqa_all_layers_ms=round(gqa * layers, 1))


if __name__ == "__main__":
    main()
