"""attar's attention kernel (`runtime/attention.cc`) against onnxruntime's own GroupQueryAttention on
the same inputs, the invariants the engine rests on (a row does not depend on its batch, a token
not on the width of its step), what it refuses, and the engine and `attar kernel build` using it.

The kernel is built once for the session (it fetches onnxruntime's headers from Debian unless
built already); only a machine with no C++ compiler skips these tests."""

import shutil

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper

from attar.runtime import kernels

MAX_POS = 512
# attar's cache is float16: its new keys and values are rounded (relatively 2^-11), onnxruntime's
# are not, so what each computes from them differs by up to about this much on these inputs.
ROUNDED = 2e-3


def gqa_model(domain: str, heads: int, kv: int, head: int, packed: bool = True, rotary: int = 1, shares: bool = False,
              **extra) -> bytes:
    """One attention node; `shares`: with attar's 10th input, which rows hold another's prefix."""
    qkv = ["query", "", ""] if packed else ["query", "key", "value"]
    node = helper.make_node("GroupQueryAttention", qkv + ["past_key", "past_value", "seqlens_k", "total", "cos", "sin"]
                            + ["shares"] * shares,
                            ["out", "present_key", "present_value"], domain=domain, num_heads=heads, kv_num_heads=kv,
                            do_rotary=rotary, scale=head ** -0.5, **extra)
    width = (heads + 2 * kv) * head if packed else heads * head
    inputs = [helper.make_tensor_value_info("query", T.FLOAT, ["b", "s", width])]
    if not packed:
        inputs += [helper.make_tensor_value_info(n, T.FLOAT, ["b", "s", kv * head]) for n in ("key", "value")]
    cache = T.FLOAT16 if domain == "attar" else T.FLOAT
    inputs += [helper.make_tensor_value_info(n, cache, ["b", kv, "c", head]) for n in ("past_key", "past_value")]
    inputs += [helper.make_tensor_value_info("seqlens_k", T.INT32, ["b"]), helper.make_tensor_value_info("total", T.INT32, []),
               helper.make_tensor_value_info("cos", T.FLOAT, [MAX_POS, head // 2]),
               helper.make_tensor_value_info("sin", T.FLOAT, [MAX_POS, head // 2])]
    inputs += [helper.make_tensor_value_info("shares", T.INT32, ["b", 2])] * shares
    outputs = [helper.make_tensor_value_info("out", T.FLOAT, None),
               helper.make_tensor_value_info("present_key", cache, None),
               helper.make_tensor_value_info("present_value", cache, None)]
    graph = helper.make_graph([node], "attention", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)]).SerializeToString()


def run(library, domain, heads, kv, head, past, new, capacity=None, shared=True, packed=True, rotary=1, seed=0, feeds=None,
        shares=None, **extra):
    """One call on rows whose caches hold `past[b]` tokens, `new` tokens each; (out, keys, values),
    the caches as float32. Shared: past and present are one buffer, as the engine binds them.
    `shares`: attar's input naming each row's leader and shared length, when given. The caches
    fed hold float16's numbers, whichever the kernel: attar's takes them as float16."""
    rows, capacity = len(past), capacity or max(past) + new + 5
    rng = np.random.default_rng(seed)
    if feeds is None:
        angle = np.arange(MAX_POS)[:, None] / 10000 ** (np.arange(head // 2) / (head // 2))
        feeds = {"cos": np.cos(angle).astype(np.float32), "sin": np.sin(angle).astype(np.float32),
                 "query": rng.standard_normal((rows, new, ((heads + 2 * kv) if packed else heads) * head), dtype=np.float32)}
        if not packed:
            feeds |= {n: rng.standard_normal((rows, new, kv * head), dtype=np.float32) for n in ("key", "value")}
        feeds |= {n: rng.standard_normal((rows, kv, capacity, head), dtype=np.float32) for n in ("past_key", "past_value")}
    cache = np.float16 if domain == "attar" else np.float32
    feeds = {k: v.astype(np.float16).astype(cache) if k.startswith("past_") else v.copy() for k, v in feeds.items()}
    feeds["seqlens_k"] = np.array([p + new - 1 for p in past], np.int32)
    feeds["total"] = np.array(max(past) + new, np.int32)
    if shares is not None:
        feeds["shares"] = np.array(shares, np.int32).reshape(-1, 2)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if domain == "attar":
        options.register_custom_ops_library(str(library))
    model = gqa_model(domain, heads, kv, head, packed, rotary, shares is not None, **extra)
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    io = session.io_binding()
    for name, value in feeds.items():
        if name.startswith("past_"):
            buffer = ort.OrtValue.ortvalue_from_numpy(value)
            io.bind_ortvalue_input(name, buffer)
            io.bind_ortvalue_output(name.replace("past", "present"), buffer) if shared else io.bind_output(name.replace("past", "present"))
        else:
            io.bind_cpu_input(name, value)
    io.bind_output("out")
    session.run_with_iobinding(io)
    if shared:
        return io.get_outputs()[-1].numpy(), feeds["past_key"].astype(np.float32), feeds["past_value"].astype(np.float32)
    present_key, present_value, out = (v.numpy() for v in io.get_outputs())
    return out, present_key.astype(np.float32), present_value.astype(np.float32)


def assert_rounded(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Our float16 cache holds onnxruntime's float32 one rounded to nearest: all of it but the
    rare key whose rotation, a last bit apart, falls on the other side of a rounding point."""
    rounded = theirs.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(ours, rounded, rtol=1e-3, atol=1e-7)
    assert (ours == rounded).mean() > 0.99


CASES = {  # heads, kv heads, head size, each row's cached tokens, new tokens a row
    "decode, 0.5B's heads, rows of different lengths": (14, 2, 64, [3, 17, 40, 0], 1),
    "decode, 1.5B's heads": (12, 2, 128, [100, 1, 63], 1),
    "a prompt after a cached prefix": (12, 2, 128, [130], 37),
    "a first prompt longer than a tile": (14, 2, 64, [0], 70),
    "one query head a KV head": (4, 4, 32, [9], 2),
    "SmolLM2's heads, a speculating step": (9, 3, 64, [21], 6),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shared", [True, False], ids=["in place", "copied"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "q-k-v"])
def test_it_computes_what_onnxruntime_computes(library, case, shared, packed):
    heads, kv, head, past, new = CASES[case]
    theirs = run(library, "com.microsoft", heads, kv, head, past, new, shared=shared, packed=packed)
    ours = run(library, "attar", heads, kv, head, past, new, shared=shared, packed=packed)
    np.testing.assert_allclose(ours[0], theirs[0], atol=ROUNDED)
    for b, p in enumerate(past):  # the cache it leaves, up to each row's length (the rest is not anyone's)
        for kind in (1, 2):
            assert_rounded(ours[kind][b, :, :p + new], theirs[kind][b, :, :p + new])
    assert np.abs(ours[0]).max() > 0.01  # not an all-zero answer


@pytest.mark.parametrize("rotary", [dict(rotary=0), dict(rotary_interleaved=1)], ids=["no rotary", "interleaved"])
def test_either_rotary_or_none_it_computes_what_onnxruntime_computes(library, rotary):
    theirs = run(library, "com.microsoft", 9, 3, 64, [5, 30], 1, **rotary)
    ours = run(library, "attar", 9, 3, 64, [5, 30], 1, **rotary)
    np.testing.assert_allclose(ours[0], theirs[0], atol=ROUNDED)
    assert_rounded(ours[1][1, :, :31], theirs[1][1, :, :31])


def test_a_row_and_a_token_come_out_the_same_bit_for_bit_whatever_else_is_in_the_step(library):
    heads, kv, head = 12, 2, 128
    rng = np.random.default_rng(3)
    angle = np.arange(MAX_POS)[:, None] / 10000 ** (np.arange(head // 2) / (head // 2))
    base = {"cos": np.cos(angle).astype(np.float32), "sin": np.sin(angle).astype(np.float32)}
    cache = {n: rng.standard_normal((3, kv, 300, head), dtype=np.float32) for n in ("past_key", "past_value")}
    tokens = rng.standard_normal((3, 8, (heads + 2 * kv) * head), dtype=np.float32)
    # A row alone and in a batch of three of other lengths.
    batch = run(library, "attar", heads, kv, head, [200, 37, 120], 1,
                feeds=base | {"query": tokens[:, :1]} | cache)[0]
    alone = run(library, "attar", heads, kv, head, [37], 1,
                feeds=base | {"query": tokens[1:2, :1]} | {k: v[1:2] for k, v in cache.items()})[0]
    assert np.array_equal(batch[1], alone[0])
    # A token in a step of 1, of 2 and of 8 (the first token of each step is the same).
    first = [run(library, "attar", heads, kv, head, [150], width,
                 feeds=base | {"query": tokens[:1, :width]} | {k: v[:1] for k, v in cache.items()})[0][0, 0]
             for width in (1, 2, 8)]
    assert np.array_equal(first[0], first[1]) and np.array_equal(first[0], first[2])


def copies(rng, kv, head, past, shares, capacity):
    """Caches of random numbers where each follower's first positions are its leader's."""
    cache = {n: rng.standard_normal((len(past), kv, capacity, head), dtype=np.float32) for n in ("past_key", "past_value")}
    for row, (leader, length) in enumerate(shares):
        for buf in cache.values():
            buf[row, :, :length] = buf[leader, :, :length]
    return cache


# Each row: (leader, shared length). Row 0 leads six rows (two spans of the kernel's four), one
# sharing less than a block (so not at all), row 2 leads one, row 8 shares with none.
PAST = [300, 300, 120, 317, 40, 300, 250, 180, 60]
SHARES = [(0, 0), (0, 300), (2, 0), (0, 290), (2, 40), (0, 17), (0, 250), (0, 100), (8, 0)]


@pytest.mark.parametrize("heads, kv, head", [(14, 2, 64), (12, 2, 128), (4, 2, 32)])
@pytest.mark.parametrize("new", [1, 3], ids=["decode", "speculating"])
def test_rows_that_share_a_prefix_read_it_once_and_come_out_the_same_bits(library, heads, kv, head, new):
    """SAG's candidates and agents in flight hold copies of one prompt's cache: told which, the
    kernel reads those blocks once for all the rows that share them, and every output and cache
    is the same bits as when each row reads its own copy."""
    rng = np.random.default_rng(5)
    angle = np.arange(MAX_POS)[:, None] / 10000 ** (np.arange(head // 2) / (head // 2))
    feeds = {"cos": np.cos(angle).astype(np.float32), "sin": np.sin(angle).astype(np.float32),
             "query": rng.standard_normal((len(PAST), new, (heads + 2 * kv) * head), dtype=np.float32)}
    feeds |= copies(rng, kv, head, PAST, SHARES, max(PAST) + new + 3)
    alone = run(library, "attar", heads, kv, head, PAST, new, feeds=feeds)
    told = run(library, "attar", heads, kv, head, PAST, new, feeds=feeds, shares=SHARES)
    untold = run(library, "attar", heads, kv, head, PAST, new, feeds=feeds, shares=np.zeros((0, 2)))
    for got in (told, untold):
        for a, b in zip(got, alone):
            assert np.array_equal(a, b)
    if new == 1:  # onnxruntime's kernel takes one row at a time past a token
        theirs = run(library, "com.microsoft", heads, kv, head, PAST, new, feeds=feeds)
        np.testing.assert_allclose(told[0], theirs[0], atol=ROUNDED)


@pytest.mark.parametrize("shares", [
    [(0, 0), (2, 10)],  # a leader that is no row
    [(0, 0), (0, 31)],  # more than the row holds
    [(1, 25), (0, 0)],  # more than the leader holds
    [(0, 0), (0, -16)],
    [(1, 16), (0, 16)],  # a leader that follows another
    [(0, 0)],  # not one pair a row
], ids=["no such leader", "past the row", "past the leader", "negative", "chained", "too few"])
def test_a_bad_shared_prefix_is_an_error_not_a_read_outside_a_row(library, shares):
    rng = np.random.default_rng(0)
    angle = np.zeros((MAX_POS, 32), np.float32)
    feeds = {"cos": angle, "sin": angle, "query": np.zeros((2, 1, 18 * 64), np.float32)}
    feeds |= copies(rng, 2, 64, [30, 20], [(0, 0), (0, 0)], 40)
    with pytest.raises(Exception, match="attar attention: (a row's shared prefix is out of range|shared must hold)"):
        run(library, "attar", 14, 2, 64, [30, 20], 1, feeds=feeds, shares=shares)


@pytest.mark.parametrize("attribute", [{"local_window_size": 64}, {"softcap": 30.0}, {"smooth_softmax": 1}])
def test_attention_it_does_not_compute_stays_on_onnxruntime(library, attribute):
    import onnx

    model = onnx.load_from_string(gqa_model("com.microsoft", 14, 2, 64, **attribute))
    assert not kernels.use_attention(model)
    assert model.graph.node[0].domain == "com.microsoft"
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    model.graph.node[0].domain = "attar"  # forced onto the kernel anyway: refused at load, not computed wrong
    for info in [*model.graph.input, *model.graph.output]:
        if info.name.startswith(("past_", "present_")):
            info.type.tensor_type.elem_type = T.FLOAT16
    model.opset_import.add(domain="attar", version=1)
    with pytest.raises(Exception, match="not supported"):
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_a_cache_that_another_node_reads_stays_on_onnxruntime():
    """The kernel's cache is float16, so its past and present may be only the graph's inputs and
    outputs: a graph that reads them elsewhere (here a copy of the past as an output) keeps
    onnxruntime's attention and its float32 cache."""
    import onnx

    model = onnx.load_from_string(gqa_model("com.microsoft", 14, 2, 64))
    model.graph.node.append(helper.make_node("Identity", ["past_key"], ["seen"]))
    model.graph.output.append(helper.make_tensor_value_info("seen", T.FLOAT, None))
    assert not kernels.use_attention(model)
    assert model.graph.node[0].domain == "com.microsoft" and model.graph.input[1].type.tensor_type.elem_type == T.FLOAT
    plain = onnx.load_from_string(gqa_model("com.microsoft", 14, 2, 64))
    assert kernels.use_attention(plain)
    caches = [i for i in [*plain.graph.input, *plain.graph.output] if i.name.startswith(("past_", "present_"))]
    assert len(caches) == 4 and all(i.type.tensor_type.elem_type == T.FLOAT16 for i in caches)


def test_a_cache_of_another_type_is_a_one_line_model_error():
    from attar.runtime.modeldir import ModelError

    graph = helper.make_graph([helper.make_node("Identity", ["past"], ["present"])], "cache",
                              [helper.make_tensor_value_info("past", T.BFLOAT16, [1, 2, None, 64])],
                              [helper.make_tensor_value_info("present", T.BFLOAT16, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(ModelError, match=r"KV cache input past is tensor\(bfloat16\)"):
        kernels.cache_dtype(session, "past")


def test_the_engines_cache_is_float16_on_the_kernel_and_holds_twice_the_context(library):
    from attar.runtime.engine import Engine, Request
    from attar.runtime.modeldir import ExportDir
    from attar.runtime.models import pull

    folder = ExportDir.open(pull("smollm2-135m", log=lambda m: None, check=False))
    float32_token = 2 * folder.layers * folder.kv_heads * folder.head * 4  # K and V, every layer
    on, off = (Engine(folder, kernel=k, max_rows=1, kv_budget=256 * float32_token) for k in (True, False))
    assert on.pool.keys[0].dtype == np.float16 and off.pool.keys[0].dtype == np.float32
    assert on.context == 2 * off.context == 512
    assert len(on.run(Request(list(range(100, 400)), 4)).out) == 4  # 300 tokens: past what float32 would hold


def test_lengths_out_of_range_are_an_error_not_a_read_past_the_cache(library):
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(gqa_model("attar", 14, 2, 64), options, providers=["CPUExecutionProvider"])
    angle = np.zeros((MAX_POS, 32), np.float32)
    feeds = {"query": np.zeros((1, 1, 18 * 64), np.float32), "cos": angle, "sin": angle,
             "past_key": np.zeros((1, 2, 8, 64), np.float16), "past_value": np.zeros((1, 2, 8, 64), np.float16)}
    for lengths, total in (([900], 901), ([-5], 1), ([7], 3), ([MAX_POS + 10], MAX_POS + 11)):
        with pytest.raises(Exception, match="attar attention"):
            session.run(None, feeds | {"seqlens_k": np.array(lengths, np.int32), "total": np.array(total, np.int32)})


def test_the_engine_runs_on_the_kernel_and_answers_as_on_onnxruntimes(library):
    """SmolLM2 (interleaved rotary, 3 query heads a KV head): the engine's greedy text on the
    kernel is what one pass over it predicts, on the kernel and on onnxruntime's attention alike
    (at 9 positions in 10: near ties fall either way between a step of one token and a pass)."""
    from attar.runtime.engine import Engine, Request
    from attar.runtime.llm import EngineBackend
    from attar.runtime.modeldir import ExportDir
    from attar.runtime.models import pull
    from attar.runtime.parity import OnnxScorer

    folder = ExportDir.open(pull("smollm2-135m", log=lambda m: None, check=False))
    ids = EngineBackend(folder).encode([{"role": "user", "content": "Write Python that prints the squares of 1 to 9."}])
    engine = Engine(folder, kernel=True)
    assert engine.kernel and not Engine(folder, kernel=False).kernel
    out = engine.run(Request(ids, 48)).out
    at = slice(len(ids) - 1, len(ids) - 1 + len(out))
    for kernel in (True, False):
        scorer = OnnxScorer(folder, kernel=kernel)
        assert scorer.kernel == kernel
        assert (scorer.logits([ids + out])[0][at].argmax(-1) == np.array(out)).mean() >= 0.9


def test_attar_kernel_build_prints_the_library_and_a_bad_include_folder_is_one_line(library, tmp_path):
    import subprocess

    attar = shutil.which("attar")
    done = subprocess.run([attar, "kernel", "build"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == str(library)
    empty = tmp_path / "include"
    empty.mkdir()
    env = {"ATTAR_CACHE": str(tmp_path / "cache"), "PATH": __import__("os").environ["PATH"]}
    done = subprocess.run([attar, "kernel", "build", "--include", str(empty)], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"Error: {empty} has no onnxruntime_c_api.h"]


LANES_PROBE = r"""
#include <cmath>
#include <cstdio>
#include <random>
#include "attention.cc"
// Random blocks of 16 lanes (some huge, some with a NaN or an infinity) through the lane trees,
// and random blocks of keys and values (float16, some partial) through widen_block() and visit_heads(), a KV head's 7
// query vectors' whole step on a block (one pass of 7 on 16-lane registers; 3, 3, then 1 on AVX2's 8);
// every result's bytes to stdout.
int main() {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.f, 1.f);
  constexpr int G = 7;
  static float raw[16], query[G * 64], keys[1024], acc[G * 64], top[G], sum[G];
  static attar::Half rows[1024], values[1024], padded[2048];
  attar::Call c{};
  c.head = 64;
  c.scale = 0.125f;
  c.queries = query;
  c.acc = acc;
  c.top = top;
  c.sum = sum;
  for (int t = 0; t < 4000; ++t) {
    for (float& x : raw) x = normal(rng) * (t % 7 == 0 ? 1e6f : 1.0f);
    for (float& x : query) x = normal(rng) * (t % 5 == 0 ? 30.f : 1.0f);
    for (attar::Half& x : rows) x = static_cast<attar::Half>(normal(rng));
    for (attar::Half& x : values) x = static_cast<attar::Half>(normal(rng));
    if (t % 11 == 0) raw[t % 16] = NAN;
    if (t % 13 == 0) raw[(t * 7) % 16] = -INFINITY;
    if (t % 100 == 0)  // fresh query vectors now and then
      for (int h = 0; h < G; ++h) top[h] = -INFINITY, sum[h] = 0.f;
    attar::vec x[attar::PARTS], first[attar::PARTS], last[attar::PARTS], exps[attar::PARTS];
    for (int i = 0; i < attar::PARTS; ++i) {
      x[i] = attar::load_vec(raw + attar::LANES * i);
      first[i] = attar::first_lanes(x[i], t % 17 - attar::LANES * i, -INFINITY);
      last[i] = attar::first_lanes(x[i], (t * 3) % 17 - attar::LANES * i, 0.0f);
      exps[i] = attar::exp_nonpositive(-x[i] * x[i]);
    }
    float out[48 + 2 + G * 64 + 2 * G];
    for (int i = 0; i < attar::PARTS; ++i) {
      attar::store_vec(out + attar::LANES * i, first[i]);
      attar::store_vec(out + 16 + attar::LANES * i, last[i]);
      attar::store_vec(out + 32 + attar::LANES * i, exps[i]);
    }
    out[48] = attar::add_16(first);
    out[49] = attar::max_16(last);
    const attar::Half* block = attar::widen_block(rows, values, 1 + t % 16, 64, keys, padded);  // AVX2's shuffles, or one half at a time
    attar::visit_heads<64>(c, 0, G, keys, block, 1 + t % 16);
    std::memcpy(out + 50, acc, sizeof acc);
    std::memcpy(out + 50 + G * 64, top, sizeof top);
    std::memcpy(out + 50 + G * 64 + G, sum, sizeof sum);
    fwrite(out, sizeof out, 1, stdout);
  }
}
"""


def test_the_avx2_lane_trees_give_the_bits_of_the_portable_ones(tmp_path, avx2_build):
    """Where the CPU has AVX2 and not AVX-512, the kernel works on 8-lane registers: a block's 16
    scores are two of them, its sums, maxima and selects run with AVX2's shuffles (GCC's own
    lowering of 16 lanes moved one float at a time, through memory), and a group's query vectors go
    through a block 3 at a time, not 8. Both forms, compiled side by side for an AVX2 CPU
    (`-mno-avx2` leaves the portable one), must give the same bits, lane trees and the query
    vectors' whole step on a block alike, whichever CPU runs the suite."""
    import subprocess

    compiler, include, flags = avx2_build
    program = [f for f in flags if f not in ("-shared", "-fPIC")]  # a program, not the library
    (tmp_path / "probe.cc").write_text(LANES_PROBE)
    results = []
    for extra in ([], ["-mno-avx2"]):
        binary = tmp_path / f"probe{len(extra)}"
        subprocess.run([compiler, *program, *extra, "-I", str(include), "-I", str(kernels.HEADER.parent),
                        str(tmp_path / "probe.cc"), "-o", str(binary)], check=True, capture_output=True, timeout=300)
        results.append(subprocess.run([str(binary)], check=True, capture_output=True, timeout=60).stdout)
    assert len(results[0]) == 4000 * (50 + 7 * 65 + 7) * 4 and results[0] == results[1]


@pytest.mark.parametrize("target", ["x86-64", "x86-64-v3", "icelake-server", "sapphirerapids"])
def test_the_kernels_compile_for_each_x86_level(avx2_build, target):
    """`attar kernel build` compiles for the CPU at hand, and each level takes other code paths (SSE
    only; AVX2 without VNNI; AVX-512 VNNI, both with Q8MatMul; AMX): a suite builds only its machine's,
    so the others are compiled here (not run)."""
    import subprocess

    compiler, include, flags = avx2_build
    flags = [f for f in flags if f not in ("-shared", "-fPIC") and not f.startswith("-march=")]
    for source in kernels.SOURCES:
        done = subprocess.run([compiler, *flags, f"-march={target}", "-fsyntax-only", "-I", str(include),
                               "-I", str(kernels.HEADER.parent), str(source)], capture_output=True, text=True, timeout=300)
        if "bad value" in done.stderr:
            pytest.skip(f"this compiler does not know -march={target}")
        assert done.returncode == 0, done.stderr[-3000:]
