"""attar's int8 row ops (`runtime/int8_rows.cc`): the int8 graph's per-row quantization and
dequantization around MatMulInteger as one node each, swapped in by `kernels.use_int8_rows`.
They must give the bits onnxruntime's own ops give on the graph the importer writes, ties and
an all-zero row included, and refuse inputs of the wrong shape with one line."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper

from attar.runtime import kernels
from attar.runtime.gguf_import import DecoderBuilder, GraphWriter

K, N = 72, 48  # K: 4 vectors of 16 and a tail


def projections(tmp_path) -> onnx.ModelProto:
    """x (rows × K) times two weights through the importer's own int8 path: one smoothed (as
    calibration makes it), one not; each output dequantized."""
    rng = np.random.default_rng(0)
    graph = GraphWriter(tmp_path / "w.data")
    builder = DecoderBuilder(None, None, graph, rope_interleaved=False, int8=True,
                             ranges={"smoothed": np.abs(rng.standard_normal(K)).astype(np.float32) * 4})
    outputs = [builder.int8_matmul("x", rng.standard_normal((N, K)).astype(np.float32), key)
               for key in ("smoothed", "plain")]
    graph.close()
    model = helper.make_model(
        helper.make_graph(graph.nodes, "int8", [helper.make_tensor_value_info("x", T.FLOAT, ["b", "s", K])],
                          [helper.make_tensor_value_info(o, T.FLOAT, None) for o in outputs], graph.initializers),
        opset_imports=[helper.make_opsetid("", 21)])
    onnx.save(model, tmp_path / "int8.onnx")
    return onnx.load(tmp_path / "int8.onnx")  # its weights read back from the data file


def session(model: onnx.ModelProto, library) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_the_row_ops_give_the_bits_of_onnxruntimes_ops(library, tmp_path):
    plain = projections(tmp_path)
    fused = projections(tmp_path)
    assert kernels.use_int8_rows(fused) == 4  # x quantized twice (once smoothed), two dequantizations
    assert sorted(n.op_type for n in fused.graph.node) == ["MatMulInteger"] * 2 + ["RowDequantize"] * 2 + ["RowQuantize"] * 2
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, K)).astype(np.float32) * 3
    x[0, 0] = 0.0  # an all-zero row: the scale's floor
    x[0, 1, :4] = [127.0, 0.5, 1.5, -2.5]  # max 127 -> scale 1: ties, rounded to even
    x[0, 1, 4:] = 0.0
    x[1, 2] = 1e30  # far outside what the weights were smoothed for
    for rows in (x, x[:1, :1], x[2:]):
        expected = session(plain, library).run(None, {"x": rows})
        got = session(fused, library).run(None, {"x": rows})
        for a, b in zip(expected, got):
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


def test_what_is_not_the_importers_pattern_stays_on_onnxruntimes_ops(tmp_path):
    model = projections(tmp_path)
    rounding = next(n for n in model.graph.node if n.op_type == "Round")
    rounding.op_type = "Floor"  # another quantization: it and its dequantization stay as they were
    assert kernels.use_int8_rows(model) == 2
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Floor") == 1 and ops.count("RowQuantize") == ops.count("RowDequantize") == 1
    no_int8 = projections(tmp_path)
    for node in no_int8.graph.node:
        if node.op_type == "MatMulInteger":
            node.op_type = "MatMul"  # not integer sums: nothing to dequantize either
    quantizations = kernels.use_int8_rows(no_int8)
    assert quantizations == 2 and "RowDequantize" not in [n.op_type for n in no_int8.graph.node]


@pytest.mark.parametrize("op, feeds, message", [
    ("RowDequantize", {"a": np.zeros((2, 8), np.int32), "b": np.ones((2, 1), np.float32), "c": np.ones(7, np.float32)},
     "attar RowDequantize: the column scale must hold one scale a column"),
    ("RowDequantize", {"a": np.zeros((2, 8), np.int32), "b": np.ones((3, 1), np.float32), "c": np.ones(8, np.float32)},
     "attar RowDequantize: the row scale must hold one scale a row"),
    ("RowQuantize", {"a": np.zeros((2, 8), np.float32), "b": np.ones(9, np.float32)},
     "attar RowQuantize: smooth must hold one factor a channel"),
])
def test_inputs_of_the_wrong_shape_are_refused_with_one_line(library, op, feeds, message):
    types = {np.dtype(np.int32): T.INT32, np.dtype(np.float32): T.FLOAT}
    outputs = {"codes": T.UINT8, "scale": T.FLOAT} if op == "RowQuantize" else {"y": T.FLOAT}
    node = helper.make_node(op, list(feeds), list(outputs), domain="attar")
    model = helper.make_model(helper.make_graph(
        [node], "bad", [helper.make_tensor_value_info(k, types[v.dtype], None) for k, v in feeds.items()],
        [helper.make_tensor_value_info(o, t, None) for o, t in outputs.items()]),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("attar", 1)])
    with pytest.raises(Exception) as error:
        session(model, library).run(None, feeds)
    assert str(error.value).endswith(message)
