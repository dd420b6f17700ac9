"""attar's onnxruntime kernels: build them once, find them, and put them into a graph.

Five sets of ops in one native library, the `attar` domain:

* `attention.cc`: GroupQueryAttention's contract, computed so that each KV head's cache is read
  once per step, not once per query head (the 1.5B has 6 query heads a KV head), which is what
  made a step of many rows cost so much more than a step of one (README, "The attention kernel").
  Putting it in a graph is renaming the domain of its attention nodes.
* `int8_rows.cc`: the int8 graph's per-row quantization and dequantization around each
  MatMulInteger, one node each instead of eight and three, the same bits.
* `int8_matmul.cc`: each projection (its row quantization, the MatMulInteger, the dequantization,
  a bias and the MLP's SwiGLU) as one node, on weights packed (when the session is made) for the
  CPU's integer dot products (AVX-512 VNNI, or AVX2); the bits of the exact integer sums, which
  onnxruntime's MatMulInteger does not give on AVX2 without VNNI (its 16-bit pair sums saturate).
* `norm.cc`: the residual add and RMS norm between a layer's blocks, onnxruntime's bits, with the
  rows' sums of squares advancing side by side where onnxruntime sums one row after another.
* `top.cc`: the sampling's TopK (each position's 64 largest logits), one read of a row against
  the k-th best so far where onnxruntime keeps a heap.

They go in when a session is made (`session`), in memory; the files on disk keep onnxruntime's own
ops, which every other runtime (onnxruntime-genai) reads.

It is native code, so it is built on the machine that runs it (`attar kernel build`, once; with
`-march=native`, for the CPU at hand) against onnxruntime's C API headers. No PyPI package ships
those headers; Debian's `libonnxruntime-dev` does, and the build fetches that package from Debian,
checks it against a pinned SHA-256 and takes only its headers (or uses `--include DIR`). The
custom-op API is stable across releases: headers of 1.21 serve onnxruntime 1.21 and later. Without
the built library everything runs as before, on onnxruntime's own ops.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np

from attar.runtime.fetch import cache_dir, work_folder
from attar.runtime.modeldir import ModelError, edited_session, inside

SOURCES = [Path(__file__).with_name(name) for name in ("kernels.cc", "attention.cc", "int8_rows.cc", "int8_matmul.cc",
                                                        "norm.cc", "top.cc")]
HEADER = Path(__file__).with_name("kernels.h")
DOMAIN = "attar"
SHARED = "attar/shared"  # the attention nodes' input naming each row's leader and shared length
NO_SHARES = np.zeros((0, 2), np.int32)  # no row shares: what a run that does not say feeds it
HEADERS_DEB = ("http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
               "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")
HEADERS = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_cxx_inline.h", "onnxruntime_float16.h")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-std=gnu++17", "-shared", "-fPIC"]
MAX_DEB = 16 << 20  # the package is 85 KB; a larger answer is not it


class KernelError(RuntimeError):
    """The kernels could not be built or used."""


def library() -> Path | None:
    """The built library for these sources and this compiler, or None when it has not been built."""
    path = _target()
    return path if path is not None and path.is_file() else None


def build(include: Path | None = None, log=print) -> Path:
    """Compile the kernels into the user cache (once; atomically) and return the library. `include`:
    a folder holding onnxruntime's C API headers; by default they are fetched from Debian."""
    target, compiler = _target(), _compiler()
    if target is None:
        raise KernelError("no C++ compiler: install g++ (or set CXX) to build attar's kernels")
    if target.is_file():
        return target
    work = work_folder(target)
    try:
        if include is None:
            include = work / "include"
            _fetch_headers(include, log)
        elif not (include / HEADERS[0]).is_file():
            raise KernelError(f"{include} has no {HEADERS[0]}")
        log(f"  compiling {', '.join(p.name for p in SOURCES)} ({compiler} {' '.join(FLAGS)})")
        out = work / target.name
        proc = subprocess.run([compiler, *FLAGS, "-I", str(include), *map(str, SOURCES), "-o", str(out)],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise KernelError(f"compiling attar's kernels failed: {proc.stderr.strip()[-2000:]}")
        os.replace(out, target)
        for old in [*target.parent.glob("kernels-*.so"), *target.parent.glob("attention-*.so")]:
            if old != target:  # builds of earlier sources or another compiler
                old.unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def register(options, kernel: bool | None = None) -> bool:
    """Register the built library with onnxruntime session `options`; whether graphs loaded with
    them should run on it. `kernel`: None, when it is built (and ATTAR_KERNEL is not 0); True, it
    must be; False, never."""
    path = _wanted(kernel)
    if kernel and path is None:
        raise KernelError("attar's kernels are not built: run `attar kernel build`")
    if path is not None:
        options.register_custom_ops_library(str(path))
    return path is not None


def _wanted(kernel: bool | None) -> Path | None:
    """The library a session should run on, as `register` reads `kernel`."""
    if kernel is None and os.environ.get("ATTAR_KERNEL") == "0":  # the user's way back to onnxruntime's ops
        return None
    return library() if kernel is not False else None


def build_name(kernel: bool | None = None) -> str | None:
    """The name of the build a session runs on, as `register` reads `kernel` (None: onnxruntime's
    own ops): a build of other sources computes the logits otherwise, in their last bits or more."""
    path = _wanted(kernel)
    return path.stem if path is not None else None


def int8_sums_exact(kernel: bool | None = None) -> bool:
    """Whether an int8 graph's integer sums come out exact here: on attar's packed products (built,
    and wanted as `register` reads `kernel`), or where onnxruntime's MatMulInteger is exact. On x86
    with AVX2 and neither VNNI nor AMX (AMD Zen 2 and 3, Intel before Ice Lake) that multiplies with
    `vpmaddubsw`, whose 16-bit pair sums saturate: every projection of the default had wrong sums,
    up to a fifth of the largest (README). The CPU is read from Linux's /proc/cpuinfo; elsewhere
    onnxruntime's sums are taken as exact."""
    if _wanted(kernel) is not None and _packer() is not None:
        return True
    flags = cpu_flags()
    return "avx2" not in flags or bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_graph_pays(kernel: bool | None = None) -> bool:
    """Whether batched work (a catalog teacher) should build and run a model's int8 graph here:
    where its sums are exact, and not where the exact graph runs on attar's Q8 products while the
    int8 products have no VNNI (AVX2 without it): there the exact graph measured as fast at 8-16
    rows on the default and faster at every width on the 1.5B teacher, whose 4-bit codes it reads
    as 4 bits (README, "On AVX2 without VNNI"). With AVX-512 VNNI the int8 graph is the faster
    from a few rows on."""
    if _wanted(kernel) is not None and _q8_packer() is not None and "avx512_vnni" not in cpu_flags():
        return False
    return int8_sums_exact(kernel)


def cpu_flags() -> set[str]:
    """The CPU's feature flags, from Linux's /proc/cpuinfo on x86 (none elsewhere): what the engine and the
    trainer choose their arithmetic by."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())


def session(graph: Path, options, kernel: bool | None, edit: Callable[[object], bool]):
    """An onnxruntime session of `graph` as `edit` changes it (`modeldir.edited_session`), on
    attar's kernels where `register` says so (its attention, an int8 graph's row quantization and
    products, an exact graph's Q8 products, the norms and the sampling's TopK); and whether its attention
    runs on the kernel, in which case every run feeds SHARED. The session holds the packed weights
    (`attar_packed`) for as long as it lives."""
    registered = register(options, kernel)
    on_kernel = False
    packed: list = []  # the packed weights: onnxruntime reads them where they are, for the session's life

    def both(model) -> bool:
        nonlocal on_kernel
        edited = edit(model)
        on_kernel = registered and use_attention(model)
        rows = registered and use_int8_rows(model) > 0
        products = rows and use_int8_matmul(model, graph.parent, options, packed) > 0
        q8 = registered and use_q8_matmul(model, graph.parent, options, packed) > 0
        norms = registered and use_norm(model) > 0
        top = registered and use_top(model) > 0
        return edited or on_kernel or rows or products or q8 or norms or top

    made = edited_session(graph, both, options)
    made.attar_packed = packed
    if kernel and not on_kernel:
        raise KernelError(f"{graph} has attention the kernel does not compute")
    return made, on_kernel


def use_attention(model) -> bool:
    """Edit an onnx.ModelProto so that its GroupQueryAttention nodes run on attar's kernel, their
    caches (the graph's past inputs and present outputs) in float16; False when it has none, or one
    whose attributes the kernel does not compute or whose cache another node reads."""
    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
    supported = {"num_heads", "kv_num_heads", "scale", "do_rotary", "rotary_interleaved", "local_window_size"}
    if not nodes:
        return False
    from onnx import TensorProto, helper

    # The kernel keeps the cache in float16: each node's past must be the graph's inputs and its
    # present the graph's outputs, read by nothing else, so that only the caller sees the type.
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    readers = _Graph(model).readers
    for node in nodes:
        if any(a.name not in supported or (a.name == "local_window_size" and a.i != -1) for a in node.attribute):
            return False
        if len(node.input) > 9:  # position ids, attention bias, quantized-cache scales
            return False
        cache, present = node.input[3:5], node.output[1:3]
        if len(cache) < 2 or len(present) < 2 or not all(n in inputs and len(readers[n]) == 1 for n in cache) \
                or not all(n in outputs and n not in readers for n in present):
            return False
    caches = {name for node in nodes for name in [*node.input[3:5], *node.output[1:3]]}
    for info in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if info.name in caches:
            info.type.tensor_type.elem_type = TensorProto.FLOAT16
    for node in nodes:
        node.domain = DOMAIN
        node.input.extend([""] * (9 - len(node.input)) + [SHARED])
    # Which rows hold another's prefix (attention.cc), fed with every run: NO_SHARES for none. (An
    # initializer would make it optional, but an IO binding cannot override one.)
    model.graph.input.append(helper.make_tensor_value_info(SHARED, TensorProto.INT32, ["share_rows", 2]))
    _import_domain(model)
    return True


def cache_dtype(session, name: str) -> type:
    """The numpy type of a session's KV cache input `name`: float16 on attar's attention, else
    float32."""
    kind = {i.name: i.type for i in session.get_inputs()}.get(name)
    types = {"tensor(float16)": np.float16, "tensor(float)": np.float32}
    if kind not in types:
        raise ModelError(f"the graph's KV cache input {name} is {kind}: attar runs float16 or float32 caches")
    return types[kind]


def use_int8_rows(model) -> int:
    """Edit an onnx.ModelProto so that an int8 graph's per-row quantization (`gguf_import`'s
    `row_quantized`: Abs, ReduceMax, Max, Div, Div, Round, Add, Cast, after a smoothing Mul where
    there is one) runs as one RowQuantize node, and each dequantization of MatMulInteger's sums
    (Cast, Mul by the row scale, Mul by the column scale) as one RowDequantize: the same
    arithmetic in the same order, the same bits. Returns how many nodes it put in (0: the graph
    has no such pattern, and is left as it was)."""
    graph = _Graph(model)
    fused: dict[int, object] = {}  # position of a pattern's last node -> the node replacing it
    dropped: set[int] = set()
    row_scales: set[str] = set()  # the row scales RowQuantize makes
    for node in model.graph.node:
        if node.op_type == "Cast" and graph.attribute(node, "to") == 2:  # to uint8
            found = _quantization(graph, node)
            if found:
                nodes, inputs, row_scale = found
                row_scales.add(row_scale)
                fused[graph.position[id(node)]] = _node("RowQuantize", inputs, [node.output[0], row_scale], node.name)
                dropped.update(graph.position[id(n)] for n in nodes)
    for node in model.graph.node:
        if node.op_type == "Mul" and len(graph.dims(node.input[1]) or ()) == 1:  # by a column scale
            inner = graph.made(node.input[0], "Mul")
            cast = inner and inner.input[1] in row_scales and graph.made(inner.input[0], "Cast")
            product = cast and graph.attribute(cast, "to") == 1 and graph.producer.get(cast.input[0])  # to float
            if product and product.op_type == "MatMulInteger":
                fused[graph.position[id(node)]] = _node("RowDequantize", [cast.input[0], inner.input[1], node.input[1]],
                                                        [node.output[0]], node.name)
                dropped.update(graph.position[id(n)] for n in (cast, inner, node))
    if not fused:
        return 0
    _fuse(model, fused, dropped)
    return len(fused)


def use_norm(model) -> int:
    """Edit an onnx.ModelProto so that its SkipSimplifiedLayerNormalization nodes (a residual add
    and an RMS norm) run as attar's SkipRMSNorm (`norm.cc`: the same bits, rows side by side), where
    the node is of the form it computes: input, skip and gamma, float; the mean and the inverse
    deviation read by nothing (the importer names them). Returns how many it swapped."""
    swapped = 0
    floats = {i.name for i in model.graph.initializer if i.data_type == 1}
    uses = _Graph(model).uses
    for i, node in enumerate(model.graph.node):
        if node.op_type != "SkipSimplifiedLayerNormalization" or node.domain != "com.microsoft":
            continue
        outputs = list(node.output) + [""] * (4 - len(node.output))
        if len(node.input) != 3 or node.input[2] not in floats or any(uses.get(o) for o in outputs[1:3] if o):
            continue
        node.op_type, node.domain = "SkipRMSNorm", DOMAIN
        del node.output[:]
        node.output.extend([outputs[0], outputs[3] or f"attar/norm{i}/sum"])  # the sum, read or not
        swapped += 1
    if swapped:
        _import_domain(model)
    return swapped


def use_top(model) -> int:
    """Edit an onnx.ModelProto so that its TopK nodes over float values, on the last axis, largest
    and sorted (the sampling's, `engine.add_top`), run as attar's (`top.cc`: one read of a row
    against the k-th best so far, where onnxruntime keeps a heap). Returns how many it swapped."""
    from onnx import TensorProto

    kinds = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]}
    swapped = 0
    for node in model.graph.node:
        if node.op_type != "TopK" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        given = {a.name: a.i for a in node.attribute}
        if given.get("axis", -1) != -1 or given.get("largest", 1) != 1 or given.get("sorted", 1) != 1 \
                or kinds.get(node.input[0]) != TensorProto.FLOAT:
            continue
        node.domain = DOMAIN
        swapped += 1
    if swapped:
        _import_domain(model)
    return swapped


def use_int8_matmul(model, folder: Path, options, keep: list) -> int:
    """Edit an onnx.ModelProto whose row quantizations and dequantizations are attar's nodes
    (`use_int8_rows`) so that each projection from the float input of its RowQuantize to the float
    output of its RowDequantize, with a bias after it (`_bias`) and, where it is a gate's and an up
    projection's, the SwiGLU after that (`_gate`), runs as one Int8MatMul node, on the weights
    packed for it (`attar_pack_int8`). The packed weights are handed to onnxruntime through
    `options` in place of the graph's (no second copy in memory); `keep` holds them, and must live
    as long as the session. Returns how many products it put in (0: none; and none where the
    library packs nothing: a CPU with AMX or AVX-VNNI, whose MatMulInteger is exact and faster,
    or without AVX2)."""
    from onnx import numpy_helper

    pack = _packer()
    if pack is None:
        return 0
    graph = _Graph(model)
    fused: dict[int, object] = {}
    dropped: set[int] = set()
    replaced: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "RowDequantize" or node.domain != DOMAIN:
            continue
        product = graph.producer.get(node.input[0])
        weights = product is not None and product.op_type == "MatMulInteger" and graph.uses[node.input[0]] == 1 \
            and len(product.input) == 3 and graph.constants.get(product.input[1])
        zero = weights and graph.value(product.input[2])
        quantize = weights and graph.producer.get(product.input[0])
        if not weights or weights.data_type != 3 or len(weights.dims) != 2 or not (zero and len(zero) == 1) \
                or not (quantize and quantize.op_type == "RowQuantize" and quantize.domain == DOMAIN
                        and list(quantize.output) == [product.input[0], node.input[1]]):  # int8 weights, its codes
            continue
        k, n = weights.dims
        scale = graph.constants.get(node.input[2])
        if n % 16 or k % 4 or k > 1 << 16 or scale is None:
            continue  # a shape that does not pack (or whose sums could overflow): MatMulInteger stays
        # The column scale, offsets and a bias, by column; the SwiGLU's pairs of blocks reorder them.
        columns = {"scale": _initializer_values(scale, folder, np.float32, n)}
        tail, output, bias, gated = _tail(graph, node.output[0], n)
        if bias is not None:
            columns["bias"] = _initializer_values(graph.constants[bias], folder, np.float32, n)
        packed, columns["offsets"] = np.empty((n // 16, k // 4, 64), np.int8), np.empty(n, np.int32)
        if pack(_initializer_values(weights, folder, np.int8, k * n), k, n, int(zero[0]), int(gated), packed,
                columns["offsets"]) != 0:
            raise KernelError(f"{weights.name}: attar_pack_int8 refused a {k} × {n} matrix")
        if gated:  # the columns' blocks of 16 in the packed weights' order
            columns = {key: values.reshape(n // 16, 16)[_paired_blocks(n)].reshape(-1) for key, values in columns.items()}
        for key, values in columns.items():
            model.graph.initializer.append(numpy_helper.from_array(values, f"{weights.name}/{key}"))
        smooth = quantize.input[1] if len(quantize.input) > 1 else ""
        inputs = [quantize.input[0], _hand_over(model, options, keep, weights, packed), f"{weights.name}/offsets",
                  f"{weights.name}/scale", smooth, f"{weights.name}/bias" if bias is not None else ""]
        # The zero point is folded into the offsets; the Split's sizes go with the Split.
        replaced.update([weights.name, scale.name, product.input[2], *([bias] if bias else [])],
                        (m.input[1] for m in tail if m.op_type == "Split"))
        dropped.update(graph.position[id(m)] for m in (product, node, *tail))
        while not inputs[-1]:  # optional inputs left out at the end
            inputs.pop()
        last = tail[-1] if tail else node
        fused[graph.position[id(last)]] = _node("Int8MatMul", inputs, [output], node.name, gated=int(gated))
    for node in model.graph.node:  # a RowQuantize read only by products that now quantize for themselves
        if node.op_type != "RowQuantize" or node.domain != DOMAIN:
            continue
        readers = [m for out in node.output for m in graph.readers.get(out, [])]
        if len(readers) == sum(graph.uses.get(out, 0) for out in node.output) \
                and all(graph.position[id(m)] in dropped for m in readers):
            dropped.add(graph.position[id(node)])
    return _replace(model, fused, dropped, replaced)


def use_q8_matmul(model, folder: Path, options, keep: list) -> int:
    """Edit an onnx.ModelProto so that each MatMulNBits of GGUF's block weights (8 or 4 bits, 32 or
    16 inputs a scale, accuracy level 4, neither zero points nor bias: an exact graph's,
    `gguf_import`), with the offset term after it where the weights have one (`offset_term`: the
    input's sums of 32, times the offsets, added), then a bias (`_bias`), and where it is a gate's
    and an up projection's the SwiGLU after it (`_gate`), runs as one Q8MatMul node, on the codes
    packed for it (`attar_pack_q8`), the scales and offsets in their fewest bytes (`_compact`) and
    the bias, handed to onnxruntime as `use_int8_matmul` hands its weights. Returns how many it put in (0: none; and none where the library has no Q8
    products: a CPU with AMX or AVX-VNNI, where they were not measured, or without AVX2). On AVX2
    without VNNI onnxruntime's MatMulNBits and MatMul computed a row alone otherwise than beside
    others; with AVX-512 VNNI they were slower (README)."""
    pack = _q8_packer()
    if pack is None:
        return 0
    graph = _Graph(model)
    fused: dict[int, object] = {}
    dropped: set[int] = set()
    replaced: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" or len(node.input) != 3:
            continue
        settings = {a.name: a.i for a in node.attribute}
        k, n, bits, block = (settings.get(key, 0) for key in ("K", "N", "bits", "block_size"))
        codes, scales = graph.constants.get(node.input[1]), graph.constants.get(node.input[2])
        if bits not in (4, 8) or block not in (16, 32) or settings.get("accuracy_level") != 4 or k <= 0 or n <= 0 \
                or k % 32 or n % 16 or codes is None or scales is None:
            continue
        if codes.data_type != 2 or list(codes.dims) != [n, k // block, block * bits // 8] or scales.data_type != 1 \
                or list(scales.dims) not in ([n, k // block], [n * k // block]):  # uint8 codes, float scales
            continue
        # Q8MatMul's inputs 2-6 (1: the packed codes, below): each initializer the graph has and its
        # values, a block of 16 columns at a time, in their fewest bytes (`_compact`: with units as
        # inputs 5 and 6 where factored); the offsets, a bias and the SwiGLU where it has them.
        scale_values = _initializer_values(scales, folder, np.float32, n * k // block).reshape(n // 16, 16, k // block)
        scale_values = np.ascontiguousarray(scale_values.transpose(0, 2, 1))  # once: factored, or handed over
        given, zero = _compact(scales.name, scale_values, block), 0
        dropped.add(graph.position[id(node)])  # with each node the fused one replaces: it takes the last's place
        last, output = node, node.output[0]
        offset = _offset_term(graph, node, folder, k, n)
        if offset is not None:
            last, output, offsets, pattern = offset
            offset_values = _initializer_values(graph.constants[offsets], folder, np.float32, k // 32 * n)
            more, zero = _compact_offsets(offsets, np.ascontiguousarray(offset_values.reshape(k // 32, n // 16, 16).transpose(1, 0, 2)),
                                          scale_values if block == 32 and 5 in given else None)
            given |= more
            dropped.update(graph.position[id(m)] for m in pattern)
            replaced.update(m.input[1] for m in pattern if m.op_type == "MatMul")  # the block sums' ones too
        tail, output, bias, gated = _tail(graph, output, n)
        last = tail[-1] if tail else last
        if bias is not None:
            given[4] = bias, _initializer_values(graph.constants[bias], folder, np.float32, n).reshape(n // 16, 16)
        if gated:  # the blocks of 16 in the order the packer puts the codes
            given = {i: (name, values[_paired_blocks(n)]) for i, (name, values) in given.items()}
        dropped.update(graph.position[id(m)] for m in tail)
        replaced.update(m.input[1] for m in tail if m.op_type == "Split")  # the Split's sizes
        values, peak = _initializer_values(codes, folder, np.uint8, n * k * bits // 8), np.zeros(1, np.int32)
        for layout in (5, 8) if bits == 8 else (4,):  # 8-bit codes as 5 bits where they fit (Q5_0's): 40 bytes a
            packed = np.empty((n // 16, k // 4, {8: 64, 5: 40, 4: 32}[layout]), np.int8)  # group of 4, not 64
            status = pack(values, k, n, layout, int(gated), packed, peak)
            if status != 2:  # 2: the codes do not fit 5 bits (nothing written)
                break
        if status != 0:
            raise KernelError(f"{codes.name}: attar_pack_q8 refused a {k} × {n} matrix")
        given[1] = codes.name, packed
        replaced.update(name for name, _ in given.values())
        inputs = [node.input[0]] + [_hand_over(model, options, keep, graph.constants[given[i][0]],
                                               np.ascontiguousarray(given[i][1]), "units" if i >= 5 else "packed")
                                    if i in given else "" for i in range(1, max(given) + 1)]
        fused[graph.position[id(last)]] = _node("Q8MatMul", inputs, [output], node.name, peak=int(peak[0]),
                                                gated=int(gated), zero=zero)
    return _replace(model, fused, dropped, replaced)


UNIT = 256  # inputs a Q8MatMul unit covers (int8_matmul.cc's UNIT: GGUF's k-quant super-block)


def _compact(name: str, values: np.ndarray, group: int) -> dict[int, tuple[str, np.ndarray]]:
    """Q8MatMul's scales (input 2; `values` (blocks of 16 columns, K / group, 16)) in the fewest bytes
    that hold the same numbers, which a one-row step reads with the weights: int8 factors, with
    their float16 units as input 5, where each is exactly a factor times its unit (`_factored`;
    GGUF's k-quants: d times a sub-scale); else float16 where each is a float16 number (GGUF's
    Q8_0 and Q5_0 keep d as float16); else as they are."""
    factored = _factored(values, UNIT // group)
    if factored is not None:
        return {2: (name, factored[0]), 5: (name, factored[1])}
    half = values.astype(np.float16)
    return {2: (name, half if np.array_equal(half.astype(np.float32), values) else values)}


def _compact_offsets(name: str, values: np.ndarray, scales: np.ndarray | None) -> tuple[dict, int]:
    """Q8MatMul's offsets (input 3; `values` (blocks, K / 32, 16)) as int8 factors with float16 units
    (input 6) where each is exactly one plus zero times its scale (Q8MatMul's `zero`; `scales`: the
    factored scales, one a 32 inputs, else None): GGUF's Q4_K and Q5_K weights are d·sc·q − dmin·m,
    which the importer writes as scale·(code − zero) + offset, offset = zero·scale − dmin·m (zero 8
    for 4-bit codes, 16 for Q5_K's). Else as they are. Returns the inputs and the zero."""
    for zero in (0, 8, 16) if scales is not None else (0,):
        factored = _factored(values, UNIT // 32, np.float32(zero) * scales if zero else None)
        if factored is not None:
            return {3: (name, factored[0]), 6: (name, factored[1])}, zero
    return {3: (name, values)}, 0


def _factored(values: np.ndarray, per_unit: int, base: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """`values` (blocks, groups, 16) as int8 factors (the same shape) and a float16 unit per `per_unit`
    groups × column (blocks, groups / per_unit, 16) whose float products, added to `base` where it
    is given, are `values`, bit for bit, as Q8MatMul computes them (`attar_factor_q8` finds and
    checks them); None where some unit's numbers are not so. GGUF's k-quants scale each 256 inputs
    by d (float16) times an integer sub-scale of 6 or 8 bits, and offset them by dmin times a 6-bit
    minimum: the unit is d (or dmin), the factor the integer."""
    blocks, groups, width = values.shape
    factors, units = np.empty(values.shape, np.int8), np.empty((blocks, groups // per_unit, width), np.float16)
    given = 0 if base is None else np.ascontiguousarray(base, np.float32)
    if width != 16 or groups % per_unit or _q8_factorer()(np.ascontiguousarray(values, np.float32), given, blocks,
                                                           groups, per_unit, factors, units) != 0:
        return None
    return factors, units


def _offset_term(graph: "_Graph", node, folder: Path, k: int, n: int) -> tuple | None:
    """Where `gguf_import` added an offset term to MatMulNBits `node`'s output (Add of it and
    MatMul(MatMul(x, block sums of 32), offsets)): the Add, its output, the offsets' name and the
    nodes the fused op replaces (the block sums' MatMul too where nothing else reads them)."""
    from onnx import TensorProto

    x, out = node.input[0], node.output[0]
    add = next((m for m in graph.readers.get(out, []) if m.op_type == "Add" and m.domain in ("", "ai.onnx")), None)
    if add is None or graph.uses.get(out) != 1:
        return None
    term = graph.made(add.input[1] if add.input[0] == out else add.input[0], "MatMul")
    sums = term and graph.made(term.input[0], "MatMul", once=False)
    offsets = term and graph.constants.get(term.input[1])
    ones = sums and graph.constants.get(sums.input[1])
    if not (sums and sums.input[0] == x and offsets is not None and ones is not None):
        return None
    if offsets.data_type != TensorProto.FLOAT or list(offsets.dims) != [k // 32, n] or list(ones.dims) != [k, k // 32]:
        return None
    if ones.name not in graph.checked:  # the block sums' matrix: a 1 where input i is in block i // 32
        expected = np.kron(np.eye(k // 32, dtype=np.float32), np.ones((32, 1), np.float32))
        graph.checked[ones.name] = np.array_equal(_initializer_values(ones, folder, np.float32, k * k // 32).reshape(k, -1), expected)
    if not graph.checked[ones.name]:
        return None
    pattern = [term, add] + ([sums] if graph.uses.get(sums.output[0]) == 1 else [])
    return add, add.output[0], offsets.name, pattern


def _tail(graph: "_Graph", out: str, n: int) -> tuple[list, str, str | None, bool]:
    """What a fused product (Int8MatMul, Q8MatMul) takes in after its sums `out`, where the graph has
    it: a bias (`_bias`), then a gate's and an up projection's SwiGLU (`_gate`). Returns the nodes
    taken in (the fused node takes the last one's place), the output it then makes, the bias's name
    (None: no bias) and whether it is gated."""
    nodes, bias = [], None
    add = _bias(graph, out, n)
    if add is not None:
        last, out, bias = add
        nodes.append(last)
    gated = _gate(graph, out, n)
    if gated is not None:
        last, out, pattern = gated
        nodes += [*pattern, last]
    return nodes, out, bias, gated is not None


def _paired_blocks(n: int) -> np.ndarray:
    """A gated product's blocks of 16 columns in the packers' order: the gate's block j, then the
    up projection's block j (`attar_pack_int8`, `attar_pack_q8`)."""
    return np.arange(n // 16).reshape(2, -1).T.reshape(-1)


def _bias(graph: "_Graph", out: str, n: int) -> tuple | None:
    """Where the product `out` has a bias added (`gguf_import`: an Add of it and a constant of N
    floats) and nothing else reads it: the Add, its output and the bias's name."""
    add = next(iter(graph.readers.get(out, [])), None)
    if add is None or graph.uses.get(out) != 1 or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    other = add.input[1] if add.input[0] == out else add.input[0]
    bias = graph.constants.get(other)
    if bias is None or bias.data_type != 1 or list(bias.dims) != [n]:  # float
        return None
    return add, add.output[0], other


def _gate(graph: "_Graph", out: str, n: int) -> tuple | None:
    """Where the product `out` of a gate's and an up projection's weights (`gguf_import`: their rows
    concatenated) is split in halves, x = the first, and y = (x × Sigmoid(x)) × the second, read by
    nothing else: the last Mul, its output and the nodes a gated Q8MatMul replaces."""
    split = next(iter(graph.readers.get(out, [])), None)
    if split is None or graph.uses.get(out) != 1 or split.op_type != "Split" or split.domain not in ("", "ai.onnx") \
            or len(split.output) != 2 or len(split.input) != 2 or graph.attribute(split, "axis") not in (-1, 2) \
            or graph.value(split.input[1]) != [n // 2, n // 2] or n % 32:
        return None
    gate, up = split.output
    sigmoid = next((m for m in graph.readers.get(gate, []) if m.op_type == "Sigmoid" and m.domain in ("", "ai.onnx")), None)
    silu = sigmoid and graph.uses.get(sigmoid.output[0]) == 1 and graph.readers[sigmoid.output[0]][0]
    if not (silu and silu.op_type == "Mul" and sorted(silu.input) == sorted([gate, sigmoid.output[0]])
            and graph.uses.get(gate) == 2 and graph.uses.get(silu.output[0]) == 1 and graph.uses.get(up) == 1):
        return None
    times = graph.readers[silu.output[0]][0]
    if times.op_type != "Mul" or times.domain not in ("", "ai.onnx") or sorted(times.input) != sorted([silu.output[0], up]):
        return None
    return times, times.output[0], [split, sigmoid, silu]


def _hand_over(model, options, keep: list, like, array: np.ndarray, form: str = "packed") -> str:
    """Declare `array` in `model` as `like`'s packed form (or another `form` of it) and give
    onnxruntime the array itself through `options` (`keep` holds it for the session's life); the
    new initializer's name."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    name = f"{like.name}/{form}"
    declared = type(like)()
    declared.CopyFrom(like)  # its bytes, inline or in the weights file, are never read:
    declared.name = name     # onnxruntime takes the packed array given below instead
    declared.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    del declared.dims[:]
    declared.dims.extend(array.shape)
    if declared.data_location != TensorProto.EXTERNAL:  # inline (small): bytes of the packed size, also unread
        for field in ("raw_data", "int32_data", "float_data", "int64_data", "double_data", "uint64_data"):
            declared.ClearField(field)
        declared.raw_data = bytes(array.nbytes)
    model.graph.initializer.append(declared)
    value = ort.OrtValue.ortvalue_from_numpy(array)
    options.add_initializer(name, value)
    keep.append((array, value))
    return name


def _replace(model, fused: dict[int, object], dropped: set[int], replaced: set[str]) -> int:
    """Put the fused nodes in (`_fuse`) and take out the initializers they `replaced` that no node
    reads any more (a tied LM head's codes stay for the embedding's Gather); how many were fused."""
    if not fused:
        return 0
    _fuse(model, fused, dropped)
    still = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name not in replaced or t.name in still]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return len(fused)


def _fuse(model, fused: dict[int, object], dropped: set[int]) -> None:
    """Put the fused nodes into `model` (position of a pattern's last node -> the node replacing
    the pattern) and take out the nodes at the `dropped` positions. Each fused node takes its
    pattern's last place: its inputs come before, its outputs' users after."""
    nodes = [fused.get(i, n) for i, n in enumerate(model.graph.node) if i in fused or i not in dropped]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _import_domain(model)


def _packer() -> Callable | None:
    """The library's `attar_pack_int8`, called with numpy arrays; None where the library was built
    for a CPU it packs nothing for (AMX, AVX-VNNI, no AVX2: a 4 × 16 matrix is refused)."""
    return _packer_in(str(library()))


@functools.cache  # an engine asks twice as it starts (`int8_sums_exact`, `use_int8_matmul`)
def _packer_in(path: str) -> Callable | None:
    pack = _c_function(path, "attar_pack_int8", "p", "i64", "i64", "i32", "i32", "p", "p")  # w, k, n, zero, gated, packed, offsets
    probe = np.zeros(64, np.int8)
    return pack if pack(probe, 4, 16, 0, 0, np.empty(64, np.int8), np.empty(16, np.int32)) == 0 else None


def _q8_packer() -> Callable | None:
    """The library's `attar_pack_q8`, called with numpy arrays; None where the library was built
    without Q8 products (a CPU with AMX or AVX-VNNI, or without AVX2: a 32 × 16 matrix is refused)."""
    return _q8_packer_in(str(library()))


@functools.cache
def _q8_packer_in(path: str) -> Callable | None:
    pack = _c_function(path, "attar_pack_q8", "p", "i64", "i64", "i32", "i32", "p", "p")  # codes, k, n, bits, gated, packed, peak
    return pack if pack(np.zeros(512, np.uint8), 32, 16, 8, 0, np.empty(512, np.int8), np.zeros(1, np.int32)) == 0 else None


def _q8_factorer() -> Callable[..., int]:
    """The library's `attar_factor_q8`, called with numpy arrays (`_factored`)."""
    return _q8_factorer_in(str(library()))


@functools.cache
def _q8_factorer_in(path: str) -> Callable[..., int]:
    return _c_function(path, "attar_factor_q8", "p", "p", "i64", "i64", "i32", "p", "p")  # values, base, blocks, groups, per unit, factors, units


def _c_function(path: str, name: str, *kinds: str) -> Callable[..., int]:
    """The library's C function `name` returning int, called with numpy arrays where `kinds` says
    "p" (passed as pointers to their data) and integers where it says "i64" or "i32"."""
    import ctypes

    types = {"p": ctypes.c_void_p, "i64": ctypes.c_int64, "i32": ctypes.c_int32}
    function = getattr(ctypes.CDLL(path), name)
    function.restype, function.argtypes = ctypes.c_int, [types[kind] for kind in kinds]
    return lambda *args: function(*(a.ctypes.data if isinstance(a, np.ndarray) else a for a in args))


def _initializer_values(tensor, folder: Path, dtype, count: int) -> np.ndarray:
    """An initializer's `count` values of `dtype`, inline or in an external file inside `folder` (a
    model folder is untrusted: its file must lie inside it and hold the bytes the graph says)."""
    from onnx import TensorProto, numpy_helper

    if tensor.data_location != TensorProto.EXTERNAL:
        values = numpy_helper.to_array(tensor).reshape(-1)
    else:
        info = {e.key: e.value for e in tensor.external_data}
        try:
            path = inside(folder, info.get("location"), f"{tensor.name}'s external data")
        except ModelError:  # in onnxruntime's words, which an exact graph's load gives for the same fault
            raise KernelError(f"{tensor.name}: external data path {info.get('location')!r} escapes model directory "
                              f"{folder}") from None
        size = count * np.dtype(dtype).itemsize
        offset, length = (int(v) if v.isdigit() else -1 for v in (info.get("offset", "0"), info.get("length", str(size))))
        if not path.is_file() or length != size or offset < 0 or offset + length > path.stat().st_size:
            raise KernelError(f"{tensor.name}: its external data is not {size} bytes inside {folder}")
        values = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))  # read once, not copied
    if values.size != count:
        raise KernelError(f"{tensor.name} holds {values.size} values, not {count}")
    return np.ascontiguousarray(values, dtype=dtype)


def _quantization(graph: "_Graph", cast) -> tuple[list, list[str], str] | None:
    """The nodes of one row quantization ending in `cast`, RowQuantize's inputs and the name of
    the row scale it makes; None when they are not that pattern."""
    add = graph.made(cast.input[0], "Add")
    rounded = add and graph.scalar(add.input[1], 128.0) and graph.made(add.input[0], "Round")
    div = rounded and graph.made(rounded.input[0], "Div")
    scale = div and graph.made(div.input[1], "Div", once=False)  # the dequantization reads it too
    peak = scale and graph.scalar(scale.input[1], 127.0) and graph.made(scale.input[0], "Max")
    top = peak and graph.scalar(peak.input[1], 1e-8) and graph.made(peak.input[0], "ReduceMax")
    absolute = top and graph.made(top.input[0], "Abs")
    x = div and div.input[0]
    if not absolute or absolute.input[0] != x or graph.attribute(top, "keepdims") != 1 or len(top.input) != 2 \
            or graph.value(top.input[1]) != [-1]:
        return None
    nodes, inputs = [absolute, top, peak, scale, div, rounded, add, cast], [x]
    smooth = graph.made(x, "Mul", once=False)
    if smooth and graph.uses[x] == 2 and len(graph.dims(smooth.input[1]) or ()) == 1:  # x = input × a factor a channel
        nodes.insert(0, smooth)
        inputs = [smooth.input[0], smooth.input[1]]
    return nodes, inputs, scale.output[0]


class _Graph:
    """What the pattern matching asks of a graph: who makes a value, how often it is read, and the
    constants' shapes and (small ones') values."""

    def __init__(self, model):
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.position = {id(n): i for i, n in enumerate(model.graph.node)}
        self.readers: dict[str, list] = {}
        for n in model.graph.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        self.checked: dict[str, bool] = {}  # large constants whose contents were checked
        self.uses: dict[str, int] = {}
        for name in [i for n in model.graph.node for i in n.input] + [o.name for o in model.graph.output]:
            self.uses[name] = self.uses.get(name, 0) + 1
        self.constants = {t.name: t for t in model.graph.initializer}

    def made(self, name: str, op: str, once: bool = True):
        """The standard-domain `op` node making `name` (read by one node only, when `once`), or None."""
        node = self.producer.get(name)
        if node is None or node.op_type != op or node.domain not in ("", "ai.onnx"):
            return None
        return node if not once or self.uses.get(name) == 1 else None

    def dims(self, name: str) -> list[int] | None:
        tensor = self.constants.get(name)
        return list(tensor.dims) if tensor is not None else None

    def value(self, name: str) -> list | None:
        """A small constant's values (large ones live in the weights file, unread)."""
        from onnx import numpy_helper

        tensor = self.constants.get(name)
        if tensor is None or tensor.external_data:
            return None
        return numpy_helper.to_array(tensor).reshape(-1).tolist()

    def scalar(self, name: str, value: float) -> bool:
        tensor = self.constants.get(name)
        return tensor is not None and tensor.data_type == 1 and self.value(name) == [float(np.float32(value))]

    @staticmethod
    def attribute(node, name: str) -> int | None:
        return next((a.i for a in node.attribute if a.name == name), None)


def _import_domain(model) -> None:
    """Declare the `attar` domain in `model`, once."""
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.add(domain=DOMAIN, version=1)


def _node(op: str, inputs: list[str], outputs: list[str], name: str, **attributes):
    from onnx import helper

    return helper.make_node(op, inputs, outputs, name=f"{name}/{op}", domain=DOMAIN, **attributes)


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _target() -> Path | None:
    """Where the library for these sources, these flags and this compiler lives (one per CPU's
    cache folder: -march=native builds for the machine that builds it)."""
    compiler = _compiler()
    key = _key(compiler) if compiler else None
    return cache_dir() / "kernels" / f"kernels-{key}.so" if key else None


@functools.cache
def _key(compiler: str) -> str | None:
    """The build's name: a hash of the sources, the flags and the compiler's version, asked once a
    process (every engine and scorer looks for the library)."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    sources = b"".join(p.read_bytes() for p in (HEADER, *SOURCES))
    return hashlib.sha256(sources + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]


def _fetch_headers(into: Path, log) -> None:
    """onnxruntime's C API headers out of Debian's libonnxruntime-dev, checked against its SHA-256.
    Only the named headers are taken, as plain files, whatever else the archive holds."""
    url, digest = HEADERS_DEB
    log(f"  fetching onnxruntime's C API headers ({url.rsplit('/', 1)[-1]})")
    try:
        with urllib.request.urlopen(url, timeout=60) as answer:
            deb = answer.read(MAX_DEB + 1)
    except OSError as exc:
        raise KernelError(f"cannot fetch {url}: {exc}; pass --include DIR with onnxruntime's headers") from None
    if len(deb) > MAX_DEB or hashlib.sha256(deb).hexdigest() != digest:
        raise KernelError(f"{url} is not the package attar pins (SHA-256 mismatch)")
    data = _ar_member(deb, "data.tar")
    into.mkdir(parents=True, exist_ok=True)
    wanted = {f"./usr/include/onnxruntime/{name}": name for name in HEADERS}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            if member.name in wanted and member.isfile():
                (into / wanted.pop(member.name)).write_bytes(tar.extractfile(member).read())
    if wanted:
        raise KernelError(f"the package lacks {', '.join(sorted(wanted))}")


def _ar_member(archive: bytes, prefix: str) -> bytes:
    """The first member of a Debian package (an `ar` archive) whose name starts with `prefix`."""
    if not archive.startswith(b"!<arch>\n"):
        raise KernelError("not a Debian package")
    at = 8
    while at + 60 <= len(archive):
        name, size = archive[at:at + 16].decode().strip().rstrip("/"), int(archive[at + 48:at + 58].decode().strip())
        if name.startswith(prefix):
            return archive[at + 60:at + 60 + size]
        at += 60 + size + (size & 1)
    raise KernelError(f"the package has no {prefix}")
