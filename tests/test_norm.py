"""attar's SkipRMSNorm (`runtime/norm.cc`, swapped in by `kernels.use_norm`) and TopK (`top.cc`,
`kernels.use_top`): the residual add and RMS norm between a layer's blocks must give the bits of
onnxruntime's SkipSimplifiedLayerNormalization, at any number of rows, and the sampling's TopK
onnxruntime's values and ids, on this CPU's build and on the AVX2 one; a node of another form
stays on onnxruntime's op."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from attar.runtime import kernels


@pytest.fixture(params=["native", "avx2"])
def built(request):
    return request.getfixturevalue("library" if request.param == "native" else "avx2_library")


def norm_model(width: int, gamma: np.ndarray, outputs=("y", "", "", "sum"), inputs=("x", "s", "g")):
    node = helper.make_node("SkipSimplifiedLayerNormalization", list(inputs), list(outputs), domain="com.microsoft",
                            epsilon=1e-6)
    initializers = [numpy_helper.from_array(gamma, "g")] + \
        [numpy_helper.from_array(np.full(width, 0.25, np.float32), "bias")] * ("bias" in inputs)
    return helper.make_model(helper.make_graph(
        [node], "norm", [helper.make_tensor_value_info(n, T.FLOAT, ["rows", 1, width]) for n in ("x", "s")],
        [helper.make_tensor_value_info(o, T.FLOAT, None) for o in outputs if o and not o.startswith("unread/")],
        initializers),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def run(model, library, feeds):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if library is not None:
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("width", [896, 1536, 17])
def test_the_norm_gives_the_bits_of_onnxruntimes_op(built, width):
    rng = np.random.default_rng(width)
    gamma = (rng.standard_normal(width) * 0.5 + 1).astype(np.float32)
    # As the importer writes it: the mean and inverse deviation named, read by nothing.
    plain, swapped = (norm_model(width, gamma, outputs=("y", "unread/mean", "unread/inverse", "sum")) for _ in range(2))
    assert kernels.use_norm(swapped) == 1
    assert [(n.op_type, list(n.output)) for n in swapped.graph.node] == [("SkipRMSNorm", ["y", "sum"])]
    # 1 row, a group of 8, and groups with a tail; magnitudes whose squares' sums round often.
    for rows, scale in ((1, 1.0), (8, 30.0), (13, 1e-3), (21, 3.0)):
        x, s = ((rng.standard_normal((rows, 1, width)) * scale).astype(np.float32) for _ in range(2))
        x[0, 0, :3] = [1e19, -1e-30, 0.0]  # a square near float's top, one far below its smallest
        expected, got = run(plain, None, {"x": x, "s": s}), run(swapped, built, {"x": x, "s": s})
        for a, b in zip(expected, got):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_a_norm_whose_sum_is_not_asked_for_still_runs_on_attars(built):
    model = norm_model(8, np.ones(8, np.float32), outputs=("y",))
    assert kernels.use_norm(model) == 1
    x = np.arange(16, dtype=np.float32).reshape(2, 1, 8)
    (y,) = run(model, built, {"x": x, "s": x})
    assert np.allclose(y, 2 * x / np.sqrt(np.mean((2 * x) ** 2, axis=-1, keepdims=True) + 1e-6))


def test_a_norm_of_another_form_stays_on_onnxruntimes_op():
    gamma = np.ones(8, np.float32)
    for model in (norm_model(8, gamma, outputs=("y", "mean", "", "sum")),  # the mean read (a graph output)
                  norm_model(8, gamma, inputs=("x", "s", "g", "", "bias")),  # a bias
                  norm_model(8, gamma.astype(np.float16))):  # half precision
        assert kernels.use_norm(model) == 0
        assert model.graph.node[0].op_type == "SkipSimplifiedLayerNormalization"


def top_model(width: int, k: int, **attributes):
    node = helper.make_node("TopK", ["x", "k"], ["values", "ids"], **attributes)
    return helper.make_model(helper.make_graph(
        [node], "top", [helper.make_tensor_value_info("x", T.FLOAT, ["rows", "positions", width])],
        [helper.make_tensor_value_info("values", T.FLOAT, None), helper.make_tensor_value_info("ids", T.INT64, None)],
        [numpy_helper.from_array(np.array([k], np.int64), "k")]), opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("width,k", [(151936, 64), (1000, 64), (100, 100), (130, 0), (70, 3)])
def test_the_top_logits_are_onnxs_topk_ties_by_the_lower_id(built, width, k):
    """The sampling's TopK (`engine.add_top`) on attar's: onnxruntime's values and ids, equal
    values by the lower id first, at the default's vocabulary and at widths not a multiple of 64."""
    plain, swapped = top_model(width, k, axis=-1), top_model(width, k, axis=-1)
    assert kernels.use_top(swapped) == 1 and swapped.graph.node[0].domain == "attar"
    rng = np.random.default_rng(width)
    for case in ("spread", "ties", "rising", "flat"):
        x = rng.standard_normal((3, 2, width)).astype(np.float32) * 4
        if case == "ties":
            x = np.round(x)  # ~9 values: ties at the k-th everywhere
        elif case == "rising":
            x = np.sort(x, axis=-1)  # each value joins the list: it is cut back again and again
        elif case == "flat":
            x[:] = 2.0
        expected, got = run(plain, None, {"x": x}), run(swapped, built, {"x": x})
        for a, b in zip(expected, got):
            assert a.dtype == b.dtype and np.array_equal(a, b)


def test_nan_logits_come_first_and_every_id_is_in_range(built):
    model = top_model(300, 64, axis=-1)
    kernels.use_top(model)
    x = np.random.default_rng(0).standard_normal((2, 1, 300)).astype(np.float32)
    x[0, 0, [5, 250]] = np.nan
    x[1] = np.nan  # a row of NaNs still gives 64 ids
    values, ids = run(model, built, {"x": x})
    assert list(ids[0, 0, :2]) == [5, 250] and np.isnan(values[0, 0, :2]).all()
    assert np.array_equal(ids[0, 0, 2:], np.argsort(-x[0, 0], kind="stable")[:62])
    assert np.array_equal(ids[1, 0], np.arange(64))


def test_a_topk_of_another_form_stays_on_onnxruntimes_op():
    for attributes in ({"axis": 1}, {"largest": 0}, {"sorted": 0}):
        model = top_model(100, 5, **attributes)
        assert kernels.use_top(model) == 0 and model.graph.node[0].domain == ""
