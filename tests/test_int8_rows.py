"""attar's int8 ops: the int8 graph's per-row quantization and dequantization around
MatMulInteger as one node each (`runtime/int8_rows.cc`, swapped in by `kernels.use_int8_rows`),
and each MatMulInteger with its dequantization as one Int8MatMul on packed weights
(`runtime/int8_matmul.cc`, `kernels.use_int8_matmul`). They must give the bits onnxruntime's own
ops give on the graph the importer writes (with the products' exact integer sums, which
onnxruntime's MatMulInteger does not give on every CPU), ties and an all-zero row included, read a model's
weights only from inside its folder, and refuse inputs of the wrong shape with one line."""

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


def session(model: onnx.ModelProto, library, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    options = options or ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def packs() -> bool:
    return kernels._packer() is not None


@pytest.fixture(scope="module")
def avx2_library(tmp_path_factory, avx2_build):
    """The library built for an AVX2 CPU without AVX-512: its Int8MatMul is the `vpmaddwd` one."""
    import subprocess

    compiler, include, flags = avx2_build
    library = tmp_path_factory.mktemp("avx2") / "kernels.so"
    subprocess.run([compiler, *flags, "-I", str(include), *map(str, kernels.SOURCES), "-o", str(library)],
                   check=True, capture_output=True, timeout=600)
    return library


@pytest.fixture(params=["native", "avx2"])
def packing(request, monkeypatch):
    """The library the products run on: this CPU's build, and the AVX2 one (`avx2_library`)."""
    if request.param == "native":
        return request.getfixturevalue("library")
    path = request.getfixturevalue("avx2_library")
    monkeypatch.setattr(kernels, "library", lambda: path)
    return path


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


def exact_sums(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with each MatMulInteger computed as an int32 MatMul of the codes less their zero point:
    the sums MatMulInteger defines. (onnxruntime's own MatMulInteger saturates 16-bit pair sums on
    a CPU with AVX2 and no VNNI, so it is no reference there.)"""
    nodes = []
    for node in model.graph.node:
        if node.op_type != "MatMulInteger":
            nodes.append(node)
            continue
        a, w, zero = node.input
        nodes += [helper.make_node("Cast", [a], [a + "/i32"], to=T.INT32),
                  helper.make_node("Cast", [zero], [node.name + "/zero"], to=T.INT32),
                  helper.make_node("Sub", [a + "/i32", node.name + "/zero"], [node.name + "/centred"]),
                  helper.make_node("Cast", [w], [node.name + "/w"], to=T.INT32),
                  helper.make_node("MatMul", [node.name + "/centred", node.name + "/w"], list(node.output))]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


@pytest.mark.parametrize("external", [False, True])
def test_the_packed_products_give_the_bits_of_the_exact_sums(packing, tmp_path, external):
    library = packing
    if not packs():
        pytest.skip("the kernels were built for a CPU they pack nothing for (AMX, AVX-VNNI, no AVX2)")
    plain = exact_sums(projections(tmp_path))
    packed = projections(tmp_path) if not external else onnx.load(tmp_path / "int8.onnx", load_external_data=False)
    kernels.use_int8_rows(packed)
    options, keep = ort.SessionOptions(), []
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(tmp_path))
    assert kernels.use_int8_matmul(packed, tmp_path, options, keep) == 2
    assert sorted(n.op_type for n in packed.graph.node) == ["Int8MatMul"] * 2 + ["RowQuantize"] * 2
    assert not any(t.name.endswith(".int8") for t in packed.graph.initializer)  # only the packed copy is held
    fast, reference = session(packed, library, options), session(plain, library)
    rng = np.random.default_rng(1)
    # 1 to 8 rows (a tile; on AVX2 in passes of 3), 9 and 70 (tiles and items of 64 rows with
    # tails); N = 48: a strip of two blocks and one of one.
    for rows in (1, 3, 5, 8, 9, 70):
        x = rng.standard_normal((1, rows, K)).astype(np.float32) * 3
        x[0, 0] = 0.0
        x[0, -1, :3] = [1e30, -1e30, 7.0]
        for a, b in zip(reference.run(None, {"x": x}), fast.run(None, {"x": x})):
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


def test_the_packed_products_do_not_saturate(packing, tmp_path):
    """Codes and weights over their whole range, and every code 255 against every weight 127: two
    products a pair (255 × 127 × 2) overflow the 16-bit sums of `vpmaddubsw`, which onnxruntime's
    MatMulInteger uses on AVX2. Int8MatMul's sums are the exact ones, on every CPU it packs for."""
    if not packs():
        pytest.skip("the kernels were built for a CPU they pack nothing for (AMX, AVX-VNNI, no AVX2)")
    rng = np.random.default_rng(2)
    weights = rng.integers(-127, 128, (K, N), dtype=np.int8)
    weights[:, 0] = 127
    column_scale = rng.random(N, dtype=np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMulInteger", ["codes", "w", "zero"], ["sums"]),
         helper.make_node("RowDequantize", ["sums", "row_scale", "column_scale"], ["y"], domain="attar")],
        "products", [helper.make_tensor_value_info("codes", T.UINT8, ["rows", K]),
                     helper.make_tensor_value_info("row_scale", T.FLOAT, ["rows", 1])],
        [helper.make_tensor_value_info("y", T.FLOAT, None)],
        [onnx.numpy_helper.from_array(weights, "w"), onnx.numpy_helper.from_array(np.array(128, np.uint8), "zero"),
         onnx.numpy_helper.from_array(column_scale, "column_scale")]),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("attar", 1)])
    options, keep = ort.SessionOptions(), []
    assert kernels.use_int8_matmul(model, tmp_path, options, keep) == 1
    fast = session(model, packing, options)
    for rows in (1, 4, 8, 13):
        codes = rng.integers(0, 256, (rows, K), dtype=np.uint8)
        codes[0] = 255
        row_scale = rng.random((rows, 1), dtype=np.float32)
        sums = (codes.astype(np.int64) - 128) @ weights.astype(np.int64)
        expected = (sums.astype(np.float32) * row_scale) * column_scale  # RowDequantize's order
        assert np.array_equal(fast.run(None, {"codes": codes, "row_scale": row_scale})[0], expected)
        assert expected[0, 0] == np.float32(127 * 127 * K) * row_scale[0, 0] * column_scale[0]


def test_weights_outside_the_model_folder_or_of_the_wrong_size_are_refused(library, tmp_path):
    if not packs():
        pytest.skip("the kernels were built for a CPU they pack nothing for: nothing is read")
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(projections(tmp_path), folder / "int8.onnx", save_as_external_data=True, location="w.data")
    (tmp_path / "w.data").write_bytes((folder / "w.data").read_bytes())  # the same bytes, outside the folder
    for key, value, words in (("location", "../w.data", "escapes model directory"), ("length", "8", "is not .* bytes inside"),
                              ("offset", "-64", "is not .* bytes inside"), ("offset", "sixty", "is not .* bytes inside")):
        bad = onnx.load(folder / "int8.onnx", load_external_data=False)
        kernels.use_int8_rows(bad)
        weights = next(t for t in bad.graph.initializer if t.name.endswith(".int8"))
        entry = next((e for e in weights.external_data if e.key == key), None) or weights.external_data.add()
        entry.key, entry.value = key, value
        with pytest.raises(kernels.KernelError, match=words):
            kernels.use_int8_matmul(bad, folder, ort.SessionOptions(), [])


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
    ("Int8MatMul", {"a": np.zeros((2, 8), np.uint8), "b": np.zeros((1, 3, 64), np.int8), "c": np.zeros(16, np.int32),
                    "d": np.ones((2, 1), np.float32), "e": np.ones(16, np.float32)},
     "attar Int8MatMul: the weights must be packed (N/16, K/4, 64) for codes of K inputs"),
    ("Int8MatMul", {"a": np.zeros((2, 8), np.uint8), "b": np.zeros((1, 2, 64), np.int8), "c": np.zeros(16, np.int32),
                    "d": np.ones((1, 1), np.float32), "e": np.ones(16, np.float32)},
     "attar Int8MatMul: the row scale must hold one scale a row"),
    ("Int8MatMul", {"a": np.zeros((2, 8), np.uint8), "b": np.zeros((1, 2, 64), np.int8), "c": np.zeros(15, np.int32),
                    "d": np.ones((2, 1), np.float32), "e": np.ones(16, np.float32)},
     "attar Int8MatMul: the offsets and column scale must hold one value a column"),
])
def test_inputs_of_the_wrong_shape_are_refused_with_one_line(library, op, feeds, message):
    if op == "Int8MatMul" and not packs():
        pytest.skip("the kernels were built for a CPU they pack nothing for")
    types = {np.dtype(np.int32): T.INT32, np.dtype(np.float32): T.FLOAT, np.dtype(np.uint8): T.UINT8,
             np.dtype(np.int8): T.INT8}
    outputs = {"codes": T.UINT8, "scale": T.FLOAT} if op == "RowQuantize" else {"y": T.FLOAT}
    node = helper.make_node(op, list(feeds), list(outputs), domain="attar")
    model = helper.make_model(helper.make_graph(
        [node], "bad", [helper.make_tensor_value_info(k, types[v.dtype], None) for k, v in feeds.items()],
        [helper.make_tensor_value_info(o, t, None) for o, t in outputs.items()]),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("attar", 1)])
    with pytest.raises(Exception) as error:
        session(model, library).run(None, feeds)
    assert str(error.value).endswith(message)
