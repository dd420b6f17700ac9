"""attar's SkipRMSNorm (`runtime/norm.cc`, swapped in by `kernels.use_norm`): the residual add and
RMS norm between a layer's blocks must give the bits of onnxruntime's
SkipSimplifiedLayerNormalization, at any number of rows, on this CPU's build and on the AVX2 one;
a node of another form stays on onnxruntime's op."""

import subprocess

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from attar.runtime import kernels


@pytest.fixture(params=["native", "avx2"])
def built(request, tmp_path_factory):
    if request.param == "native":
        return request.getfixturevalue("library")
    compiler, include, flags = request.getfixturevalue("avx2_build")
    library = tmp_path_factory.mktemp("avx2-norm") / "kernels.so"
    subprocess.run([compiler, *flags, "-I", str(include), *map(str, kernels.SOURCES), "-o", str(library)],
                   check=True, capture_output=True, timeout=600)
    return library


def norm_model(width: int, gamma: np.ndarray, outputs=("y", "", "", "sum"), inputs=("x", "s", "g")):
    node = helper.make_node("SkipSimplifiedLayerNormalization", list(inputs), list(outputs), domain="com.microsoft",
                            epsilon=1e-6)
    initializers = [numpy_helper.from_array(gamma, "g")] + \
        [numpy_helper.from_array(np.full(width, 0.25, np.float32), "bias")] * ("bias" in inputs)
    return helper.make_model(helper.make_graph(
        [node], "norm", [helper.make_tensor_value_info(n, T.FLOAT, ["rows", 1, width]) for n in ("x", "s")],
        [helper.make_tensor_value_info(o, T.FLOAT, None) for o in outputs if o], initializers),
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
    plain, swapped = norm_model(width, gamma), norm_model(width, gamma)
    assert kernels.use_norm(swapped) == 1
    assert [(n.op_type, list(n.output)) for n in swapped.graph.node] == [("SkipRMSNorm", ["y", "sum"])]
    # 1 row, a group of 8, and groups with a tail; magnitudes whose squares' sums round often.
    for rows, scale in ((1, 1.0), (8, 30.0), (13, 1e-3), (21, 3.0)):
        x, s = ((rng.standard_normal((rows, 1, width)) * scale).astype(np.float32) for _ in range(2))
        x[0, 0, :3] = [1e19, -1e-30, 0.0]  # a square near float's top, one far below its smallest
        expected, got = run(plain, None, {"x": x, "s": s}), run(swapped, built, {"x": x, "s": s})
        for a, b in zip(expected, got):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_a_norm_of_another_form_stays_on_onnxruntimes_op():
    gamma = np.ones(8, np.float32)
    for model in (norm_model(8, gamma, outputs=("y", "mean", "", "sum")),  # asks for the mean
                  norm_model(8, gamma, outputs=("y",)),  # not for the sum
                  norm_model(8, gamma, inputs=("x", "s", "g", "", "bias")),  # a bias
                  norm_model(8, gamma.astype(np.float16))):  # half precision
        assert kernels.use_norm(model) == 0
        assert model.graph.node[0].op_type == "SkipSimplifiedLayerNormalization"
