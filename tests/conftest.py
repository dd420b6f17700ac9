"""Shared fixtures: a tiny random-weight llama with SmolLM2's real tokenizer, and its ONNX export."""

import importlib.util
import pytest


# A two-step agent trajectory in the student format (system, task, step, observation, step).
TRAJECTORY = [
    {"role": "system", "content": "SYSTEM PROMPT with tools"},
    {"role": "user", "content": "New task:\nWhat is 2+3?"},
    {"role": "assistant", "content": "Thought: add.\nCode:\n```py\nprint(2+3)\n```<end_code>"},
    {"role": "user", "content": "Observation:\nExecution logs:\n5\nLast output from code snippet:\nNone"},
    {"role": "assistant", "content": "Thought: done.\nCode:\n```py\nfinal_answer(5)\n```<end_code>"},
]


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_torch = pytest.mark.skipif(not has("torch") or not has("transformers"), reason="needs attar[export]")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from attar.distill.tiny import save_default_tokenizer

    return save_default_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tokenizer_dir):
    from attar.distill.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny_hf"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_hf):
    from attar.export.convert import export_model

    out = tmp_path_factory.mktemp("tiny_onnx_parent") / "tiny-int4"
    export_model(tiny_hf, out, check=False, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def library():
    """attar's native kernels (`attar kernel build`), built once for the run; skipped only on a
    machine with no C++ compiler."""
    from attar.runtime import kernels

    if kernels._compiler() is None:
        pytest.skip("no C++ compiler")
    return kernels.build(log=lambda m: None)


@pytest.fixture(scope="session")
def avx2_build(tmp_path_factory):
    """How to compile attar's sources for an AVX2 CPU without AVX-512, whatever CPU runs the suite
    (a native build on an AVX-512 machine never compiles the AVX2 code): the compiler, a folder of
    onnxruntime's headers (fetched once) and the build's flags with `-march=x86-64-v3`. Skipped
    where this CPU cannot run such a build."""
    from attar.runtime import kernels

    compiler = kernels._compiler()
    if compiler is None:
        pytest.skip("no C++ compiler")
    if not {"avx2", "fma"} <= kernels.cpu_flags():
        pytest.skip("this CPU cannot run an AVX2 build")
    include = tmp_path_factory.mktemp("avx2-include")
    kernels._fetch_headers(include, log=lambda m: None)
    flags = ["-march=x86-64-v3" if f == "-march=native" else f for f in kernels.FLAGS]
    return compiler, include, flags


@pytest.fixture(scope="session")
def avx2_library(tmp_path_factory, avx2_build):
    """The library built for an AVX2 CPU without AVX-512 (its Int8MatMul is the `vpmaddwd` one), once
    for the run."""
    import subprocess

    from attar.runtime import kernels

    compiler, include, flags = avx2_build
    library = tmp_path_factory.mktemp("avx2") / "kernels.so"
    subprocess.run([compiler, *flags, "-I", str(include), *map(str, kernels.SOURCES), "-o", str(library)],
                   check=True, capture_output=True, timeout=600)
    return library
