"""A teacher's projections at R rows, three ways in one run: attar's int8 projection (the graph
builder's own MatMulInteger chain with one scale per row, the quantized GEMM through which
onnxruntime reaches AMX or VNNI), torch bf16 (oneDNN; its AMX brgemm where the CPU has AMX) and
torch fp32. It answers whether a torch path for the teacher would win (#21: only "by a wide
margin" would it earn a place under attar[distill]). One JSON line a shape and row count.

    python bench/gemm.py [--rows 1,8,16,32,64] [--threads 2]     # needs torch (attar[distill])
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from attar.runtime.gguf_import import DecoderBuilder, GraphWriter
from attention import median_ms  # bench/attention.py's: the median of timed runs after one warm-up

# Qwen2.5-Coder-1.5B, the local teacher: (inputs, outputs) of its fused Q/K/V, gate+up and down projections.
SHAPES = {"qkv": (1536, 2048), "gate_up": (1536, 17920), "down": (8960, 1536)}


def int8_session(w: np.ndarray, folder: Path, threads: int) -> ort.InferenceSession:
    """x times w as attar's int8 graph computes it (DecoderBuilder.int8_matmul, no calibration)."""
    writer = GraphWriter(folder / "w.data")
    builder = DecoderBuilder(None, None, writer, rope_interleaved=False, int8=True)
    y = builder.int8_matmul("x", w, "proj")
    writer.close()
    n, k = w.shape
    graph = helper.make_graph(writer.nodes + [helper.make_node("Identity", [y], ["y"])], "proj",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])], writer.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, folder / "proj.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = threads, 3
    return ort.InferenceSession(str(folder / "proj.onnx"), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,8,16,32,64")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        raise SystemExit("bench/gemm.py compares against torch: pip install 'attar[distill]'") from None
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    for name, (k, n) in SHAPES.items():
        w = (rng.standard_normal((n, k), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            session = int8_session(w, Path(tmp), args.threads)
            w32 = torch.from_numpy(w)
            w16 = w32.to(torch.bfloat16)
            for rows in map(int, args.rows.split(",")):
                x = rng.standard_normal((rows, k), dtype=np.float32)
                x32, x16 = torch.from_numpy(x), torch.from_numpy(x).to(torch.bfloat16)
                with torch.no_grad():
                    bf16 = median_ms(lambda: torch.nn.functional.linear(x16, w16))
                    fp32 = median_ms(lambda: torch.nn.functional.linear(x32, w32))
                int8 = median_ms(lambda: session.run(None, {"x": x}))
                gflop = 2 * rows * k * n / 1e9
                print(json.dumps({"figure": "teacher projection ms", "shape": name, "k": k, "n": n, "rows": rows,
                                  "onnxruntime_int8_ms": round(int8, 3), "torch_bf16_ms": round(bf16, 3),
                                  "torch_fp32_ms": round(fp32, 3), "bf16_over_int8": round(bf16 / int8, 2),
                                  "int8_gflop_s": round(gflop / int8 * 1000), "bf16_gflop_s": round(gflop / bf16 * 1000)}),
                      flush=True)


if __name__ == "__main__":
    main()
