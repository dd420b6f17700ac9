"""attar's int8 ops: the int8 graph's per-row quantization and dequantization around
MatMulInteger as one node each (`runtime/int8_rows.cc`, swapped in by `kernels.use_int8_rows`),
and each MatMulInteger with its dequantization as one Int8MatMul on packed weights
(`runtime/int8_matmul.cc`, `kernels.use_int8_matmul`). They must give the bits onnxruntime's own
ops give on the graph the importer writes (with the products' exact integer sums, which
onnxruntime's MatMulInteger does not give on every CPU), ties and an all-zero row included, read a model's
weights only from inside its folder, and refuse inputs of the wrong shape with one line.
On AVX2 (with AVX-512 VNNI or without VNNI) the exact graph's MatMulNBits (and offset terms) run as
Q8MatMul (`kernels.use_q8_matmul`): what MatMulNBits answers, to float rounding, and a row's
outputs the same bits alone or beside others."""

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
    assert sorted(n.op_type for n in packed.graph.node) == ["Int8MatMul"] * 2  # each quantizes its own input
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
    """Codes and weights over their whole range, and every code 255 (a row of one positive value)
    against every weight 127: two products a pair (255 × 127 × 2) overflow the 16-bit sums of
    `vpmaddubsw`, which onnxruntime's MatMulInteger uses on AVX2. Int8MatMul's sums are the exact
    ones, on every CPU it packs for."""
    if not packs():
        pytest.skip("the kernels were built for a CPU they pack nothing for (AMX, AVX-VNNI, no AVX2)")
    rng = np.random.default_rng(2)
    weights = rng.integers(-127, 128, (K, N), dtype=np.int8)
    weights[:, 0] = 127
    column_scale = rng.random(N, dtype=np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("RowQuantize", ["x"], ["codes", "row_scale"], domain="attar"),
         helper.make_node("MatMulInteger", ["codes", "w", "zero"], ["sums"]),
         helper.make_node("RowDequantize", ["sums", "row_scale", "column_scale"], ["y"], domain="attar")],
        "products", [helper.make_tensor_value_info("x", T.FLOAT, ["rows", K])],
        [helper.make_tensor_value_info("y", T.FLOAT, None)],
        [onnx.numpy_helper.from_array(weights, "w"), onnx.numpy_helper.from_array(np.array(128, np.uint8), "zero"),
         onnx.numpy_helper.from_array(column_scale, "column_scale")]),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("attar", 1)])
    options, keep = ort.SessionOptions(), []
    assert kernels.use_int8_matmul(model, tmp_path, options, keep) == 1
    assert [n.op_type for n in model.graph.node] == ["Int8MatMul"]
    fast = session(model, packing, options)
    for rows in (1, 4, 8, 13):
        x = rng.standard_normal((rows, K)).astype(np.float32) * 5
        x[0] = 3.0  # every code 255
        step = np.maximum(np.abs(x).max(-1, keepdims=True), np.float32(1e-8)) / np.float32(127)  # RowQuantize's
        codes = np.rint(x / step).astype(np.int64) + 128
        sums = (codes - 128) @ weights.astype(np.int64)
        expected = (sums.astype(np.float32) * step) * column_scale  # RowDequantize's order
        assert codes[0].min() == 255 and (rows == 1 or codes[1:].min() < 16 and codes[1:].max() > 240)
        assert np.array_equal(fast.run(None, {"x": x})[0], expected)
        assert expected[0, 0] == np.float32(127 * 127 * K) * step[0, 0] * column_scale[0]


def int8_gated_projections(tmp_path) -> onnx.ModelProto:
    """The int8 graph's MLP and attention input, as the importer writes them: x (rows × 96) times a
    gate's and an up projection's int8 weights (rows concatenated), a bias added, split in halves
    and joined by silu(gate) × up; and x times the Q, K, V weights with a bias. Their int8 rows
    and products already attar's (`use_int8_rows`)."""
    rng = np.random.default_rng(8)
    k, n = 96, 64
    graph = GraphWriter(tmp_path / "int8_gated.data")
    builder = DecoderBuilder(None, None, graph, rope_interleaved=False, int8=True, ranges={})
    g = builder.g
    y = builder.int8_matmul("x", rng.standard_normal((n, k)).astype(np.float32), "gate+up")
    y = g.one("Add", [y, g.const("gate+up.bias", rng.standard_normal(n).astype(np.float32))])
    gate, up = g.node("Split", [y, g.small("gate+up/sizes", np.array([n // 2, n // 2]))], n_out=2, axis=-1)
    mlp = g.one("Mul", [g.one("Mul", [gate, g.one("Sigmoid", [gate])]), up])
    attention = g.one("Add", [builder.int8_matmul("x", rng.standard_normal((n, k)).astype(np.float32), "qkv"),
                              g.const("qkv.bias", rng.standard_normal(n).astype(np.float32))])
    graph.close()
    model = helper.make_model(
        helper.make_graph(graph.nodes, "int8_gated", [helper.make_tensor_value_info("x", T.FLOAT, ["b", "s", k])],
                          [helper.make_tensor_value_info(o, T.FLOAT, None) for o in (mlp, attention)], graph.initializers),
        opset_imports=[helper.make_opsetid("", 21)])
    onnx.save(model, tmp_path / "int8_gated.onnx")
    model = onnx.load(tmp_path / "int8_gated.onnx")
    assert kernels.use_int8_rows(model) == 3
    return model


def test_a_gate_and_up_product_and_a_bias_run_inside_int8matmul(packing, tmp_path, monkeypatch):
    """As in Q8MatMul (below): the int8 graph's bias Add and the SwiGLU after its gate-up product run
    on each tile's outputs, one node a projection. The bias gives the bits the graph's Add gives on
    the exact sums; silu(gate) × up is onnxruntime's to float rounding; a row's outputs are the same
    bits alone and beside others."""
    library = packing
    if not packs():
        pytest.skip("the kernels were built for a CPU they pack nothing for (AMX, AVX-VNNI, no AVX2)")
    fused, apart = int8_gated_projections(tmp_path), int8_gated_projections(tmp_path)
    options, keep = ort.SessionOptions(), []
    assert kernels.use_int8_matmul(fused, tmp_path, options, keep) == 2
    assert [n.op_type for n in fused.graph.node] == ["Int8MatMul", "Int8MatMul"]
    assert [a.i for n in fused.graph.node for a in n.attribute if a.name == "gated"] == [1, 0]
    assert not any(t.name.endswith(("/sizes", ".bias", ".int8", ".int8_scale")) for t in fused.graph.initializer)
    monkeypatch.setattr(kernels, "_gate", lambda *a: None)
    monkeypatch.setattr(kernels, "_bias", lambda *a: None)
    apart_options = ort.SessionOptions()
    assert kernels.use_int8_matmul(apart, tmp_path, apart_options, keep) == 2  # the Adds, Split and silu on onnxruntime
    assert sorted(n.op_type for n in apart.graph.node) == ["Add", "Add", "Int8MatMul", "Int8MatMul", "Mul", "Mul",
                                                           "Sigmoid", "Split"]
    rng = np.random.default_rng(9)
    fast, slow = session(fused, library, options), session(apart, library, apart_options)
    for rows in (1, 3, 8, 9, 40):  # a tile and its tails (AVX2: passes of 3), two tiles, several
        x = rng.standard_normal((1, rows, 96)).astype(np.float32) * 3
        x[0, 0] = 0.0
        (mlp, attention), (mlp_apart, attention_apart) = fast.run(None, {"x": x}), slow.run(None, {"x": x})
        assert np.array_equal(attention, attention_apart)
        assert mlp.shape == (1, rows, 32)
        assert np.abs(mlp - mlp_apart).max() <= 1e-6 * np.abs(mlp_apart).max()  # measured: 1e-8
        for part in (slice(0, 1), slice(rows // 2, rows)):
            for alone, together in zip(fast.run(None, {"x": x[:, part]}), (mlp, attention)):
                assert np.array_equal(alone, together[:, part])


def q8_projections(tmp_path, ones: np.ndarray | None = None, extreme: bool = False, q6_worst: int = 32,
                   numbers: str = "float", k: int = 96) -> onnx.ModelProto:
    """x (rows × k) times block weights through the importer's exact path, one of each layout the
    Q8 products take: 8 bits a scale per 32 inputs (Q8_0), the same with codes of -16 to 15 (Q5_0:
    packed as 5 bits), 8 bits per 16 (Q6_K), and 4 bits with offsets (Q4_K: MatMulNBits, then the
    offset term). `ones`: another block-sums matrix. `extreme`: every code the one that makes the
    products' 16-bit sums largest as they are multiplied (8 bits: w = -128; 5 bits: +15, which is 31
    once biased by 16; +`q6_worst` in the 16-input layout, twice that once biased by the largest
    |w|; 4 bits: 15), so that an input of one sign puts each at its bound. `numbers`: the scales
    and offsets "float" (few of them float16 numbers), "half" (each a float16 number, as GGUF's
    Q8_0, Q5_0 and Q4_1 keep them) or "factored" (each a float16 unit per 256 inputs and column
    times an integer, as GGUF's k-quants make them: its largest magnitude 63, or -128 for Q6_K's)."""
    from attar.runtime.quants import BlockQuant

    rng = np.random.default_rng(3)
    n = 48

    def codes(low: int, high: int, worst: int) -> np.ndarray:
        return np.full((n, k), worst, np.uint8) if extreme else rng.integers(low, high, (n, k), dtype=np.uint8)

    def scales(groups: int, size: float, signed: bool = False) -> np.ndarray:
        if numbers == "factored":
            unit = (rng.random((n, k // 256), np.float32) / size).astype(np.float16).astype(np.float32)
            factors = rng.integers(-127 if signed else 0, 64, (n, k // 256, groups * 256 // k)).astype(np.float32)
            factors[:, :, 0] = -128 if signed else 63  # the largest, as the quantizers leave it
            return (unit[:, :, None] * factors).reshape(n, groups)
        values = rng.random((n, groups), np.float32) / size
        return values.astype(np.float16).astype(np.float32) if numbers == "half" else values

    graph = GraphWriter(tmp_path / "q8.data")
    builder = DecoderBuilder(None, None, graph, rope_interleaved=False, int8=False)
    q4 = scales(k // 32, 5)
    # Q4_K's offsets as the importer writes them (quants.py): 8·scale − dmin·m.
    offsets = np.float32(8) * q4 - scales(k // 32, 0.5) if numbers == "factored" else \
        rng.standard_normal((n, k // 32)).astype(np.float16 if numbers == "half" else np.float32).astype(np.float32)
    layouts = {"q8": BlockQuant(8, 32, codes(0, 256, 0), scales(k // 32, 50), None),
               "q5": BlockQuant(8, 32, codes(112, 144, 143), scales(k // 32, 20), None),
               "q6": BlockQuant(8, 16, codes(96, 160, 128 + q6_worst), scales(k // 16, 9, signed=True), None),
               "q4": BlockQuant(4, 32, codes(0, 16, 15), q4, offsets)}
    outputs = [builder.block_matmul("x", w, key, *builder._quant_inputs(key, w)) for key, w in layouts.items()]
    graph.close()
    model = helper.make_model(
        helper.make_graph(graph.nodes, "q8", [helper.make_tensor_value_info("x", T.FLOAT, ["b", "s", k])],
                          [helper.make_tensor_value_info(o, T.FLOAT, None) for o in outputs], graph.initializers),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, tmp_path / "q8.onnx")
    model = onnx.load(tmp_path / "q8.onnx")
    if ones is not None:
        summer = next(t for t in model.graph.initializer if t.name.startswith("/block_sum/"))
        summer.CopyFrom(onnx.numpy_helper.from_array(ones, summer.name))
    return model


def q8_reference(x: np.ndarray, model: onnx.ModelProto) -> list[np.ndarray]:
    """Q8MatMul's arithmetic in float64, from the graph's own codes, scales and offsets: x quantized
    per row and group of inputs (times 127 / max|x|, to nearest even), exact integer sums, scaled."""
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    outputs = []
    for node in (m for m in model.graph.node if m.op_type == "MatMulNBits"):
        settings = {a.name: a.i for a in node.attribute}
        k, n, bits, block = settings["K"], settings["N"], settings["bits"], settings["block_size"]
        raw = values[node.input[1]].reshape(n, -1)
        codes = raw.astype(np.int64) - 128 if bits == 8 else \
            np.stack([raw & 15, raw >> 4], -1).reshape(n, k).astype(np.int64) - 8
        rows = x.reshape(-1, k // block, block).astype(np.float32)
        peak = np.abs(rows).max(-1, keepdims=True)
        inverse = np.divide(np.float32(127), peak, out=np.zeros_like(peak), where=peak > 0)
        quantized = np.rint(np.nan_to_num(rows * inverse)).astype(np.int64)  # a NaN row: checked apart
        step = peak / np.float32(127)
        sums = np.einsum("rgi,ngi->rgn", quantized, codes.reshape(n, k // block, block)).astype(np.float64)
        y = (sums * step.astype(np.float64) * values[node.input[2]].T[None].astype(np.float64)).sum(1)
        offsets = next((values[t.input[1]] for t in model.graph.node if t.op_type == "MatMul" and
                        t.input[1].endswith(".offsets") and t.input[1].startswith(node.input[1].rsplit(".", 1)[0])), None)
        if offsets is not None:
            y += x.reshape(-1, k // 32, 32).astype(np.float64).sum(-1) @ offsets.astype(np.float64)
        outputs.append(y.reshape(*x.shape[:-1], n))
    return outputs


def q8_packs() -> bool:
    return kernels._q8_packer() is not None


def test_the_q8_products_answer_as_matmulnbits_and_a_row_alone_as_beside_others(packing, tmp_path):
    library = packing
    if not q8_packs():
        pytest.skip("the kernels were built for a CPU with AMX or AVX-VNNI (or without AVX2): MatMulNBits stays")
    plain, packed = q8_projections(tmp_path), q8_projections(tmp_path)
    reference = q8_reference  # float64, from the untouched graph's weights
    options, keep = ort.SessionOptions(), []
    assert kernels.use_q8_matmul(packed, tmp_path, options, keep) == 4
    assert sorted(n.op_type for n in packed.graph.node) == ["Q8MatMul"] * 4  # the offset term folded in
    weights = {t.name: t for t in packed.graph.initializer}
    assert [weights[n.input[1]].dims[2] for n in packed.graph.node] == [64, 40, 64, 32]  # bytes a group of 4 inputs
    assert not any(t.name.endswith((".codes", ".scales", ".offsets")) for t in packed.graph.initializer)
    fast, onnxruntime_ops = session(packed, library, options), session(plain, library)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 70, 96)).astype(np.float32) * 3
    x[0, 0] = 0.0  # all zero: its scale is 0
    x[0, 1, :32] *= 1e4  # one group far larger than the rest
    x[0, 2, 40] = np.nan  # a NaN in the second group
    batch = fast.run(None, {"x": x})
    for got, ours, theirs in zip(batch, reference(x, plain), onnxruntime_ops.run(None, {"x": x})):
        finite = np.ones(70, bool)
        finite[2] = False
        assert np.isnan(got[0, 2]).all() and np.isfinite(got[0, finite]).all()
        scale = np.abs(ours[0, finite]).max()
        assert np.abs(got[0, finite] - ours[0, finite]).max() <= 1e-5 * scale
        assert np.abs(got[0, finite] - theirs[0, finite]).max() <= 1e-4 * scale
    # A row's outputs are the same bits alone and beside others (a tile of 8 rows in passes of 2,
    # items of 64 rows and their tails).
    for rows in (slice(5, 6), slice(3, 11), slice(0, 70)):
        for alone, together in zip(fast.run(None, {"x": x[:, rows]}), batch):
            assert np.array_equal(alone, together[:, rows], equal_nan=True)


@pytest.mark.parametrize("numbers", ["half", "factored"])
def test_scales_and_offsets_go_to_the_products_in_fewer_bytes_with_the_same_bits(packing, tmp_path, monkeypatch, numbers):
    """GGUF's Q8_0 and Q5_0 scales are float16 numbers, its k-quants' a float16 unit per 256 inputs
    times an integer (their offsets 8·scale minus such a product): Q8MatMul takes them as float16,
    or as int8 factors and float units (fewer of the bytes a one-row step reads with the weights),
    and answers the same bits as with them all float32. Numbers that are not so, one of them off by
    a last bit included, stay float32."""
    library = packing
    if not q8_packs():
        pytest.skip("the kernels were built for a CPU with AMX or AVX-VNNI (or without AVX2): MatMulNBits stays")
    k = 512 if numbers == "factored" else 96
    compact = {"half": T.FLOAT16, "factored": T.INT8}[numbers]

    def types(model) -> list[list[int]]:  # each node's scales and offsets (if any), and its units' count
        kinds = {t.name: t.data_type for t in model.graph.initializer}
        return [[kinds[i] for i in n.input[2:4] if i] + [sum(i.endswith("/units") for i in n.input)] for n in model.graph.node]

    small, kept, other = (q8_projections(tmp_path, numbers=numbers, k=k), q8_projections(tmp_path, numbers=numbers, k=k),
                          q8_projections(tmp_path, k=k))
    small_options, kept_options, keep = ort.SessionOptions(), ort.SessionOptions(), []  # keep: the packed arrays
    units = 1 if numbers == "factored" else 0
    assert kernels.use_q8_matmul(small, tmp_path, small_options, keep) == 4
    offsets = T.INT8 if numbers == "factored" else T.FLOAT  # offsets are factored or floats
    assert types(small) == [[compact, units]] * 3 + [[compact, offsets, 2 * units]]
    zeros = [a.i for n in small.graph.node for a in n.attribute if a.name == "zero"]
    assert zeros == [0, 0, 0, 8 if numbers == "factored" else 0]  # Q4_K's offsets: 8·scale − dmin·m
    assert kernels.use_q8_matmul(other, tmp_path, ort.SessionOptions(), keep) == 4
    assert types(other) == [[T.FLOAT, 0]] * 3 + [[T.FLOAT, T.FLOAT, 0]]
    monkeypatch.setattr(kernels, "_compact", lambda name, values, group: {2: (name, values)})
    monkeypatch.setattr(kernels, "_compact_offsets", lambda name, values, scales: ({3: (name, values)}, 0))
    assert kernels.use_q8_matmul(kept, tmp_path, kept_options, keep) == 4
    monkeypatch.undo()
    x = np.random.default_rng(6).standard_normal((1, 20, k)).astype(np.float32)
    small_run, kept_run = session(small, library, small_options), session(kept, library, kept_options)
    floats = kept_run.run(None, {"x": x})
    # One row, a few and many: items of one row and of many make the factors floats alike.
    for rows in (slice(5, 6), slice(2, 5), slice(0, 20)):
        for a, b in zip(small_run.run(None, {"x": x[:, rows]}), floats):
            assert np.array_equal(a, b[:, rows]) and np.abs(a).max() > 0
    # One number a last bit off a unit's multiple (or off float16): that matrix's numbers stay float32.
    odd = q8_projections(tmp_path, numbers=numbers, k=k)
    scales = next(t for t in odd.graph.initializer if t.name == odd.graph.node[0].input[2])
    values = onnx.numpy_helper.to_array(scales).copy()
    values.flat[7] = np.nextafter(values.flat[7], np.float32(1))
    scales.CopyFrom(onnx.numpy_helper.from_array(values, scales.name))
    assert kernels.use_q8_matmul(odd, tmp_path, ort.SessionOptions(), keep) == 4
    assert types(odd)[0] == [T.FLOAT, 0] and types(odd)[1] == [compact, units]


@pytest.mark.parametrize("q6_worst", [32, 64, 65])
def test_the_q8_products_sums_hold_at_their_16_bit_bound(packing, tmp_path, q6_worst):
    """Products of small weights add up in 16 bits before they are widened, as many as the
    matrix's largest |w| allows (4-bit codes: a group of 32; 5-bit: 4 groups of 4 inputs): with
    every code at its worst and every input of one sign, each 16-bit sum is at its bound (32,512,
    31,496 and 30,480 of 32,767), and the outputs are still exact. Weights up to 64 are multiplied
    biased (64 + 64 = 128 at the bound alone), 65 and over signed."""
    library = packing
    if not q8_packs():
        pytest.skip("the kernels were built for a CPU with AMX or AVX-VNNI (or without AVX2): MatMulNBits stays")
    plain, packed = (q8_projections(tmp_path, extreme=True, q6_worst=q6_worst) for _ in range(2))
    options, keep = ort.SessionOptions(), []
    assert kernels.use_q8_matmul(packed, tmp_path, options, keep) == 4
    assert [a.i for n in packed.graph.node for a in n.attribute if a.name == "peak"] == [128, 15, q6_worst, 7]
    x = -np.random.default_rng(5).random((1, 9, 96)).astype(np.float32) - 0.5  # codes of -64 to -127
    x[0, 0] = -1.0  # every code -127
    for got, ours in zip(session(packed, library, options).run(None, {"x": x}), q8_reference(x, plain)):
        assert np.abs(got - ours).max() <= 1e-5 * np.abs(ours).max()


def test_an_offset_term_that_is_not_the_importers_stays_on_onnxruntimes_ops(tmp_path):
    if not q8_packs():
        pytest.skip("the kernels were built for a CPU with AMX or AVX-VNNI (or without AVX2): MatMulNBits stays")
    ones = np.kron(np.eye(3, dtype=np.float32), np.ones((32, 1), np.float32))
    ones[5, 0] = 2.0  # not the sums of 32 inputs: folding it into Q8MatMul would change the answer
    model = q8_projections(tmp_path, ones)
    assert kernels.use_q8_matmul(model, tmp_path, ort.SessionOptions(), []) == 4
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Q8MatMul") == 4 and ops.count("MatMul") == 2 and ops.count("Add") == 1
    level = q8_projections(tmp_path)
    for node in level.graph.node:
        for a in node.attribute:
            if a.name == "accuracy_level":
                a.i = 0  # float inputs: not what the Q8 products compute
    assert kernels.use_q8_matmul(level, tmp_path, ort.SessionOptions(), []) == 0


def gated_projections(tmp_path, bits: int = 4) -> onnx.ModelProto:
    """The importer's MLP and attention input, as `DecoderBuilder.linear` writes them: x (rows ×
    96) times a gate's and an up projection's weights (4 bits with offsets, as Q4_K has; or 8-bit
    codes of -16 to 15, Q5_0's, which pack as 5 bits), their rows concatenated, a bias added, split
    in halves and joined by silu(gate) × up; and x times 8-bit weights with a bias (Qwen's packed
    Q, K, V)."""
    from attar.runtime.quants import BlockQuant

    rng = np.random.default_rng(6)
    k, n = 96, 64
    graph = GraphWriter(tmp_path / "gated.data")
    builder = DecoderBuilder(None, None, graph, rope_interleaved=False, int8=False)
    g = builder.g
    gate_up = BlockQuant(4, 32, rng.integers(0, 16, (n, k), dtype=np.uint8), rng.random((n, k // 32), np.float32) / 5,
                         rng.standard_normal((n, k // 32)).astype(np.float32)) if bits == 4 else \
        BlockQuant(8, 32, rng.integers(112, 144, (n, k), dtype=np.uint8), rng.random((n, k // 32), np.float32) / 20, None)
    y = builder.block_matmul("x", gate_up, "gate+up", *builder._quant_inputs("gate+up", gate_up))
    y = g.one("Add", [y, g.const("gate+up.bias", rng.standard_normal(n).astype(np.float32))])
    gate, up = g.node("Split", [y, g.small("gate+up/sizes", np.array([n // 2, n // 2]))], n_out=2, axis=-1)
    mlp = g.one("Mul", [g.one("Mul", [gate, g.one("Sigmoid", [gate])]), up])
    qkv = BlockQuant(8, 32, rng.integers(96, 160, (n, k), dtype=np.uint8), rng.random((n, k // 32), np.float32) / 9, None)
    attention = g.one("Add", [builder.block_matmul("x", qkv, "qkv", *builder._quant_inputs("qkv", qkv)),
                              g.const("qkv.bias", rng.standard_normal(n).astype(np.float32))])
    graph.close()
    model = helper.make_model(
        helper.make_graph(graph.nodes, "gated", [helper.make_tensor_value_info("x", T.FLOAT, ["b", "s", k])],
                          [helper.make_tensor_value_info(o, T.FLOAT, None) for o in (mlp, attention)], graph.initializers),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, tmp_path / "gated.onnx")
    return onnx.load(tmp_path / "gated.onnx")


@pytest.mark.parametrize("bits", [4, 5])
def test_a_gate_and_up_product_and_a_bias_run_inside_q8matmul(packing, tmp_path, monkeypatch, bits):
    """The SwiGLU after a gate-up product (Split, Sigmoid, two Muls) runs on each tile's sums, and
    a bias Add is added there too: one node a projection. The bias gives the bits the graph's Add
    gives; silu(gate) × up is onnxruntime's to float rounding (its logistic is an approximation of
    its own: at gates below about -18 it gives exactly 0, where silu is about -3e-7), and a row's
    outputs are the same bits alone and beside others."""
    library = packing
    if not q8_packs():
        pytest.skip("the kernels were built for a CPU with AMX or AVX-VNNI (or without AVX2): MatMulNBits stays")
    plain, fused, apart = (gated_projections(tmp_path, bits) for _ in range(3))
    options, keep = ort.SessionOptions(), []
    assert kernels.use_q8_matmul(fused, tmp_path, options, keep) == 2
    assert [n.op_type for n in fused.graph.node] == ["Q8MatMul"] * 2
    assert [a.i for n in fused.graph.node for a in n.attribute if a.name == "gated"] == [1, 0]
    assert not any(t.name.endswith(("/sizes", ".bias")) for t in fused.graph.initializer)
    monkeypatch.setattr(kernels, "_gate", lambda *a: None)
    monkeypatch.setattr(kernels, "_bias", lambda *a: None)
    apart_options = ort.SessionOptions()
    assert kernels.use_q8_matmul(apart, tmp_path, apart_options, keep) == 2  # the Adds, Split and silu on onnxruntime
    assert sorted(n.op_type for n in apart.graph.node) == ["Add", "Add", "Mul", "Mul", "Q8MatMul", "Q8MatMul", "Sigmoid",
                                                           "Split"]
    x = np.random.default_rng(7).standard_normal((1, 40, 96)).astype(np.float32) * 3
    x[0, 0] = 0.0
    fast = session(fused, library, options)
    (mlp, attention), (mlp_apart, attention_apart) = fast.run(None, {"x": x}), \
        session(apart, library, apart_options).run(None, {"x": x})
    assert np.array_equal(attention, attention_apart)
    assert mlp.shape == (1, 40, 32)
    assert np.abs(mlp - mlp_apart).max() <= 1e-6 * np.abs(mlp_apart).max()  # measured: 1e-8
    theirs = session(plain, library).run(None, {"x": x})[0]
    assert np.abs(mlp - theirs).max() <= 1e-3 * np.abs(theirs).max()
    for rows in (slice(5, 6), slice(3, 11)):
        for alone, together in zip(fast.run(None, {"x": x[:, rows]}), (mlp, attention)):
            assert np.array_equal(alone, together[:, rows])


def test_a_split_read_by_anything_else_stays_on_onnxruntimes_ops(tmp_path):
    """The gate fused only where nothing else reads its halves or the sums: here the up half is
    also an output of the graph, so Split and silu stay (the bias still goes in)."""
    if not q8_packs():
        pytest.skip("the kernels were built for a CPU with AMX or AVX-VNNI (or without AVX2): MatMulNBits stays")
    model = gated_projections(tmp_path)
    split = next(n for n in model.graph.node if n.op_type == "Split")
    model.graph.output.append(helper.make_tensor_value_info(split.output[1], T.FLOAT, None))
    assert kernels.use_q8_matmul(model, tmp_path, ort.SessionOptions(), []) == 2
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Split") == 1 and ops.count("Sigmoid") == 1 and ops.count("Add") == 0

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
    ("Int8MatMul", {"a": np.zeros((2, 8), np.float32), "b": np.zeros((1, 3, 64), np.int8), "c": np.zeros(16, np.int32),
                    "d": np.ones(16, np.float32)},
     "attar Int8MatMul: the weights must be packed (N/16, K/4, 64) for an input of K"),
    ("Int8MatMul", {"a": np.zeros((2, 8), np.float32), "b": np.zeros((1, 2, 64), np.int8), "c": np.zeros(15, np.int32),
                    "d": np.ones(16, np.float32)},
     "attar Int8MatMul: the offsets, column scale and bias must hold one value a column"),
    ("Int8MatMul", {"a": np.zeros((2, 8), np.float32), "b": np.zeros((1, 2, 64), np.int8), "c": np.zeros(16, np.int32),
                    "d": np.ones(16, np.float32), "e": np.ones(8, np.float32), "f": np.ones(17, np.float32)},
     "attar Int8MatMul: the offsets, column scale and bias must hold one value a column"),
    ("Int8MatMul", {"a": np.zeros((2, 8), np.float32), "b": np.zeros((1, 2, 64), np.int8), "c": np.zeros(16, np.int32),
                    "d": np.ones(16, np.float32), "e": np.ones(9, np.float32)},
     "attar Int8MatMul: smooth must hold one factor an input"),
    ("Q8MatMul", {"a": np.zeros((2, 32), np.float32), "b": np.zeros((1, 8, 64), np.int8), "c": np.ones((1, 3, 16), np.float32)},
     "attar Q8MatMul: the scales must be packed (N/16, K/32 or K/16, 16)"),
    ("Q8MatMul", {"a": np.zeros((2, 24), np.float32), "b": np.zeros((1, 6, 64), np.int8), "c": np.ones((1, 1, 16), np.float32)},
     "attar Q8MatMul: the weights must be packed (N/16, K/4, 64, 40 or 32) for an input of K (a multiple of 32)"),
    ("Q8MatMul", {"a": np.zeros((2, 32), np.float32), "b": np.zeros((1, 8, 64), np.int8), "c": np.ones((1, 1, 16), np.float32),
                  "d": np.ones((1, 1, 16), np.float32), "e": np.ones(16, np.float32)},
     "attar Q8MatMul: the bias must be packed (N/16, 16)"),
    ("SkipRMSNorm", {"a": np.zeros((2, 8), np.float32), "b": np.zeros((2, 7), np.float32), "c": np.ones(8, np.float32)},
     "attar norm: skip must have the input's shape or one row's"),
    ("SkipRMSNorm", {"a": np.zeros((2, 8), np.float32), "b": np.zeros((2, 8), np.float32), "c": np.ones(9, np.float32)},
     "attar norm: gamma must hold one number a channel"),
])
def test_inputs_of_the_wrong_shape_are_refused_with_one_line(library, op, feeds, message):
    if op == "Int8MatMul" and not packs() or op == "Q8MatMul" and not q8_packs():
        pytest.skip("the kernels were built for a CPU they pack nothing for")
    types = {np.dtype(np.int32): T.INT32, np.dtype(np.float32): T.FLOAT, np.dtype(np.uint8): T.UINT8,
             np.dtype(np.int8): T.INT8}
    outputs = {"codes": T.UINT8, "scale": T.FLOAT} if op == "RowQuantize" else \
        {"y": T.FLOAT, "sum": T.FLOAT} if op == "SkipRMSNorm" else {"y": T.FLOAT}
    node = helper.make_node(op, list(feeds), list(outputs), domain="attar")
    model = helper.make_model(helper.make_graph(
        [node], "bad", [helper.make_tensor_value_info(k, types[v.dtype], None) for k, v in feeds.items()],
        [helper.make_tensor_value_info(o, t, None) for o, t in outputs.items()]),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("attar", 1)])
    with pytest.raises(Exception) as error:
        session(model, library).run(None, feeds)
    assert str(error.value).endswith(message)
