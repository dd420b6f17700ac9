"""A GGUF file (llama or qwen2 architecture) -> an onnxruntime-genai model folder, with the GGUF's
own quantized weights: no torch, no re-quantization, little memory.

The graph is the one onnxruntime-genai's builder writes for these models (GroupQueryAttention with
rotary embedding, SkipSimplifiedLayerNormalization, MatMulNBits), but every weight comes from
`quants.block_quant`: the codes and scales llama.cpp multiplies with. Weights are streamed into
model.onnx.data as they are converted, so peak memory is about one tensor, not the model.
"""

from __future__ import annotations

import itertools
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from onnx import TensorProto, helper

from attar.runtime.lora import LoraDelta, LoraError, read_adapter
from attar.runtime.gguf_tokenizer import build_tokenizer, write_tokenizer
from attar.runtime.modeldir import (ADAPTER_SUFFIX, ADAPTERS_DIR, GENAI_CONFIG, INT8_FILE, LAST_POSITION,
                                    ModelError, edited_session, write_adapters_file)
from attar.runtime.quants import OFFSET_BLOCK, SUPPORTED, BlockQuant, block_quant, concat_rows

ARCHITECTURES = ("llama", "qwen2")
# MatMulNBits compute type: level 4 quantizes activations to int8 per block, as llama.cpp does;
# it is the fast CPU path (float32 activations, level 1, cost SmolLM2 30% of its decode speed
# for 98.8% instead of 98.3% top-1 agreement; 8-bit weights have no fast float32 kernel at all).
ACCURACY_LEVEL = 4
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
MAX_CONTEXT = 1 << 18  # tokens; the rotary tables written into the graph grow with it


class GGUFError(ModelError):
    """The GGUF cannot be imported; the message is one line for the user."""


class Reader(GGUFReader):
    """gguf's reader, over a plain array view of the file's memory map. Its parser slices the map
    a few times per metadata value, and a slice of an `np.memmap` runs Python code (a Qwen
    vocabulary's 300,000 strings and merges took 13 s to read, 4.7 s this way): the views are the
    same bytes, still mapped, not read."""

    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, mapped: np.ndarray) -> None:
        self._plain = mapped.view(np.ndarray)


@dataclass
class Hyper:
    arch: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    eps: float
    rope_theta: float
    context: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def field(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_hyper(reader: GGUFReader) -> Hyper:
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"unsupported GGUF architecture {arch!r}; attar imports {', '.join(ARCHITECTURES)}")
    if field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise GGUFError(f"{arch} GGUF with rope scaling is not supported")

    def get(key: str, default=None):
        value = field(reader, f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"GGUF metadata lacks {arch}.{key}")
        return value

    def count(key: str, high: int, default=None) -> int:
        value = get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= int(value) <= high:
            raise GGUFError(f"GGUF metadata {arch}.{key} is {value!r}, not a whole number from 1 to {high}")
        return int(value)

    def positive(key: str, default=None) -> float:
        value = get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 < float(value) < 1e12:
            raise GGUFError(f"GGUF metadata {arch}.{key} is {value!r}, not a positive number")
        return float(value)

    heads = count("attention.head_count", 1024)
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    h = Hyper(arch, count("block_count", 1024), count("embedding_length", 1 << 16), heads,
              count("attention.head_count_kv", 1024, heads), count("feed_forward_length", 1 << 18),
              positive("attention.layer_norm_rms_epsilon"), positive("rope.freq_base", 10000.0),
              count("context_length", MAX_CONTEXT), count("vocab_size", 1 << 21, len(tokens) or None))
    if h.hidden % h.heads or h.heads % h.kv_heads or h.head_dim % 2:
        raise GGUFError(f"GGUF metadata is inconsistent: {h.hidden} wide with {h.heads} heads and {h.kv_heads} KV heads")
    return h


def check_tensors(h: Hyper, tensors: "Tensors") -> None:
    """Every tensor the graph reads exists with the shape the metadata implies; checked before
    anything is converted, so a malformed file fails in one line, not halfway through."""
    kv = h.kv_heads * h.head_dim
    want = {"token_embd.weight": (h.vocab, h.hidden), "output_norm.weight": (h.hidden,)}
    if "output.weight" in tensors:
        want["output.weight"] = (h.vocab, h.hidden)
    for i in range(h.layers):
        p = f"blk.{i}"
        want |= {f"{p}.attn_norm.weight": (h.hidden,), f"{p}.ffn_norm.weight": (h.hidden,),
                 f"{p}.attn_q.weight": (h.hidden, h.hidden), f"{p}.attn_k.weight": (kv, h.hidden),
                 f"{p}.attn_v.weight": (kv, h.hidden), f"{p}.attn_output.weight": (h.hidden, h.hidden),
                 f"{p}.ffn_gate.weight": (h.ffn, h.hidden), f"{p}.ffn_up.weight": (h.ffn, h.hidden),
                 f"{p}.ffn_down.weight": (h.hidden, h.ffn)}
        for n, size in (("q", h.hidden), ("k", kv), ("v", kv)):
            if f"{p}.attn_{n}.bias" in tensors:
                want[f"{p}.attn_{n}.bias"] = (size,)
    for name, shape in want.items():
        if name not in tensors:
            raise GGUFError(f"the GGUF has no tensor {name}")
        if tensors.shape(name) != shape:
            raise GGUFError(f"tensor {name} has shape {tensors.shape(name)}; the metadata implies {shape}")


class Tensors:
    """GGUF tensors by name, as (N, K) weights in the GGUF's own encoding."""

    def __init__(self, reader: GGUFReader):
        self.by_name = {t.name: t for t in reader.tensors}

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def float(self, name: str) -> np.ndarray:
        t = self.by_name[name]
        if t.tensor_type not in FLOAT_TYPES:
            from gguf import dequantize

            return dequantize(t.data, t.tensor_type).astype(np.float32).reshape(self.shape(name))
        if t.tensor_type == Q.BF16:
            return (np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(self.shape(name))
        return np.asarray(t.data, dtype=np.float32).reshape(self.shape(name))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.by_name[name].shape))  # GGUF lists dims innermost first

    def weight(self, name: str) -> BlockQuant | np.ndarray:
        """A BlockQuant where the GGUF's type maps exactly, else float32 (N, K)."""
        t = self.by_name[name]
        n, k = self.shape(name)
        if t.tensor_type in SUPPORTED:
            return block_quant(t.tensor_type, t.data, n, k)
        if t.tensor_type in FLOAT_TYPES:
            return self.float(name)
        raise GGUFError(f"{name}: GGUF type {t.tensor_type.name} is not supported (supported: "
                        f"{', '.join(q.name for q in (*SUPPORTED, *FLOAT_TYPES))})")


class GraphWriter:
    """Nodes plus initializers whose bytes go straight into one external data file."""

    def __init__(self, data_path: Path):
        self.data_path = data_path
        self.data = open(data_path, "wb")
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0
        self._small: dict[str, np.ndarray] = {}

    def close(self) -> None:
        self.data.close()

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer whose bytes go to the data file."""
        array = np.ascontiguousarray(array)
        offset = self.data.tell()
        pad = -offset % 64  # aligned, so onnxruntime can map it
        self.data.write(b"\0" * pad)
        self.data.write(array.tobytes())
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=list(array.shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(offset + pad)),
                           ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name

    def view(self, source: str, name: str, shape: tuple[int, ...]) -> str:
        """Another name and shape for the bytes of initializer `source` (a tied embedding and LM
        head share them), without writing them again."""
        tensor = TensorProto()
        tensor.CopyFrom(next(t for t in self.initializers if t.name == source))
        tensor.name = name
        del tensor.dims[:]
        tensor.dims.extend(shape)
        self.initializers.append(tensor)
        return name

    def small(self, name: str, array: np.ndarray) -> str:
        """A small initializer kept in the graph itself; one name is written once, however often
        the builder asks for it (every int8 projection shares /int8/zero, say)."""
        if name not in self._small:
            self._small[name] = np.asarray(array)
            self.initializers.append(onnx.numpy_helper.from_array(self._small[name], name))
        elif not np.array_equal(self._small[name], array):
            raise ValueError(f"two values for the initializer {name}")
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str | None = None,
             **attrs) -> list[str]:
        self._count += 1
        name = name or f"/{op}_{self._count}"
        outputs = [f"{name}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs

    def one(self, op: str, inputs: list[str], **kw) -> str:
        return self.node(op, inputs, **kw)[0]


class DecoderBuilder:
    """Writes the decoder graph layer by layer."""

    def __init__(self, hyper: Hyper, tensors: Tensors, graph: GraphWriter, rope_interleaved: bool,
                 adapters: dict[str, dict[str, LoraDelta]] | None = None, int8: bool = False,
                 ranges: dict[str, np.ndarray] | None = None):
        self.h, self.t, self.g, self.int8, self.ranges = hyper, tensors, graph, int8, ranges or {}
        self.inputs: dict[str, str] = {}  # weight key -> the graph tensor it multiplies (for calibration)
        self.adapters = adapters or {}
        self.hooked = {name for deltas in self.adapters.values() for name in deltas}
        self.adapter_params: dict[str, dict[str, np.ndarray]] = {a: {} for a in self.adapters}
        self.lora_inputs: list[onnx.ValueInfoProto] = []
        self.rope_interleaved = rope_interleaved
        self._block_sums: dict[str, str] = {}
        self._row_codes: dict[str, tuple[str, str]] = {}
        self._summers: dict[int, str] = {}
        self._embedding: tuple[BlockQuant, str, str] | str | None = None  # for a tied LM head

    # -- weights ----------------------------------------------------------------------------
    def _quant_inputs(self, name: str, q: BlockQuant) -> tuple[str, str]:
        n, k = q.codes.shape
        packed = q.packed().reshape(n, k // q.block, q.block * q.bits // 8)
        return self.g.const(f"{name}.codes", packed), self.g.const(f"{name}.scales", q.scales)

    def linear(self, x: str, names: list[str], biases: list[str] = (), split: bool = True) -> list[str]:
        """x times each named weight. Weights that share a quantization layout are fused into one
        MatMulNBits (their rows concatenated), then split again unless `split` is False (the
        attention takes packed Q/K/V): fewer, larger kernels."""
        ws = [self.t.weight(n) for n in names]
        fusable = all(isinstance(w, BlockQuant) for w in ws) and len({(w.bits, w.block) for w in ws}) == 1
        if len(ws) > 1 and not fusable:
            return [self.linear(x, [n], [b] if b else [])[0] for n, b in itertools.zip_longest(names, biases)]
        sizes = [w.shape[0] if isinstance(w, np.ndarray) else w.codes.shape[0] for w in ws]
        key = "+".join(names)
        self.inputs[key] = x
        if isinstance(ws[0], BlockQuant):
            w = ws[0] if len(ws) == 1 else concat_rows(ws)
            y = self.int8_matmul(x, w.dequantize(), key) if self.int8 else \
                self.block_matmul(x, w, key, *self._quant_inputs(key, w))
        else:
            y = self.g.one("MatMul", [x, self.g.const(f"{key}.T", ws[0].T.astype(np.float32))])
        y = self.low_rank(x, y, names, sizes)
        present = [b for b in biases if b in self.t]
        if present:
            y = self.g.one("Add", [y, self.g.const(f"{key}.bias", np.concatenate(
                [self.t.float(b) if b in self.t else np.zeros(size, np.float32) for b, size in zip(biases, sizes)]))])
        if len(ws) == 1 or not split:
            return [y]
        return self.g.node("Split", [y, self.g.small(f"{key}/sizes", np.array(sizes))], n_out=len(ws), axis=-1)

    def block_matmul(self, x: str, w: BlockQuant, key: str, codes: str, scales: str) -> str:
        """x times the BlockQuant `w` (its codes and scales already initializers), offsets included."""
        n, k = w.codes.shape
        y = self.g.one("MatMulNBits", [x, codes, scales], domain="com.microsoft", K=k, N=n, bits=w.bits,
                       block_size=w.block, accuracy_level=ACCURACY_LEVEL)
        if w.offsets is None:
            return y
        return self.g.one("Add", [y, self.offset_term(x, k, self.g.const(f"{key}.offsets", w.offsets.T))])

    def int8_matmul(self, x: str, w: np.ndarray, key: str) -> str:
        """x times w (N, K) where the integer matrix units do the work (onnxruntime reaches AMX only
        through its quantized GEMM, MatMulInteger): w rounded to int8 with one scale per output
        column, x to uint8 with one scale per row (token), so a row's result never depends on the
        other rows of its batch. Not exact: its parity against the GGUF is reported per graph."""
        if key in self.ranges:
            # SmoothQuant (Xiao et al. 2023): divide each input channel by s and multiply the
            # weights' column by it, s = (max|x| / max|w|)^½ over calibration text, so the few
            # channels with outlier activations no longer set the step for all the others.
            s = np.sqrt(np.maximum(self.ranges[key], 1e-5) / np.maximum(np.abs(w).max(axis=0), 1e-5)).astype(np.float32)
            w = w * s[None, :]
            x = self.g.one("Mul", [x, self.g.const(f"{key}.smooth", 1.0 / s)])
        scale = np.abs(w).max(axis=1).astype(np.float32) / 127
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
        codes, row_scale = self.row_quantized(x)
        acc = self.g.one("MatMulInteger", [codes, self.g.const(f"{key}.int8", np.ascontiguousarray(q.T)),
                                           self.g.small("/int8/zero", np.array(128, np.uint8))])
        y = self.g.one("Mul", [self.g.one("Cast", [acc], to=TensorProto.FLOAT), row_scale])
        return self.g.one("Mul", [y, self.g.const(f"{key}.int8_scale", scale)])

    def row_quantized(self, x: str) -> tuple[str, str]:
        """x as uint8 codes around 128 with one scale per row (max |x| / 127), made once per x."""
        if x not in self._row_codes:
            small = self.g.small
            peak = self.g.one("ReduceMax", [self.g.one("Abs", [x]), small("/int8/last", np.array([-1]))], keepdims=1)
            row_scale = self.g.one("Div", [self.g.one("Max", [peak, small("/int8/eps", np.array(1e-8, np.float32))]),
                                           small("/int8/127", np.array(127, np.float32))])
            shifted = self.g.one("Add", [self.g.one("Round", [self.g.one("Div", [x, row_scale])]),
                                         small("/int8/128", np.array(128, np.float32))])
            self._row_codes[x] = (self.g.one("Cast", [shifted], to=TensorProto.UINT8), row_scale)
        return self._row_codes[x]

    def low_rank(self, x: str, y: str, names: list[str], sizes: list[int]) -> str:
        """y + x·Aᵀ·Bᵀ, the LoRA term of these weights (one pair of MatMuls for a fused group).

        A and B are graph inputs whose defaults have rank 0, so the base runs exactly as the GGUF
        when no adapter is active; each adapter's A and B (at its own rank) live in its
        .onnx_adapter file and onnxruntime-genai feeds the active one's."""
        if not self.hooked.intersection(names):
            return y
        k = self.t.shape(names[0])[1]
        key = "+".join(names)
        a_name, b_name = f"lora.{key}.A", f"lora.{key}.B"
        for adapter, all_deltas in self.adapters.items():
            deltas = [all_deltas.get(n) for n in names]
            for name, d, n in zip(names, deltas, sizes):
                if d is not None and (d.a.shape[1] != k or d.b.shape[0] != n):
                    raise GGUFError(f"adapter {adapter}: {name} is {d.b.shape[0]}x{d.a.shape[1]}, the model's "
                                    f"{n}x{k}: was it trained on this base?")
            rank = sum(d.a.shape[0] for d in deltas if d is not None)
            a, b = np.zeros((k, rank), np.float32), np.zeros((rank, sum(sizes)), np.float32)
            row = col = 0
            for d, n in zip(deltas, sizes):
                if d is not None:
                    r = d.a.shape[0]
                    a[:, col:col + r], b[col:col + r, row:row + n] = d.a.T, d.b.T
                    col += r
                row += n
            self.adapter_params[adapter][a_name], self.adapter_params[adapter][b_name] = a, b
        self.lora_inputs += [helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [k, f"{key}.rank"]),
                             helper.make_tensor_value_info(b_name, TensorProto.FLOAT, [f"{key}.rank", sum(sizes)])]
        self.g.small(a_name, np.zeros((k, 0), np.float32))
        self.g.small(b_name, np.zeros((0, sum(sizes)), np.float32))
        low = self.g.one("MatMul", [x, a_name])
        return self.g.one("Add", [y, self.g.one("MatMul", [low, b_name])])

    def offset_term(self, x: str, k: int, offsets_t: str) -> str:
        """Σ over each block of 32 inputs, times the (K/32, N) offsets: w = s·(q − z) + o exactly.
        The block sums are one small MatMul per input (a 0/1 matrix), shared by every weight it feeds."""
        if x not in self._block_sums:
            if k not in self._summers:
                ones = np.kron(np.eye(k // OFFSET_BLOCK, dtype=np.float32), np.ones((OFFSET_BLOCK, 1), np.float32))
                self._summers[k] = self.g.const(f"/block_sum/{k}", ones)
            self._block_sums[x] = self.g.one("MatMul", [x, self._summers[k]])
        return self.g.one("MatMul", [self._block_sums[x], offsets_t])

    def embedding(self, ids: str) -> str:
        name = "token_embd.weight"
        w = self.t.weight(name)
        if not isinstance(w, BlockQuant):
            self._embedding = self.g.const(name, w)
            return self.g.one("Gather", [self._embedding, ids], axis=0)
        v, k = w.codes.shape
        codes = self.g.const(f"{name}.codes", w.packed())
        scales = self.g.const(f"{name}.scales", w.scales)
        self._embedding = (w, codes, scales)
        x = self.g.one("GatherBlockQuantized", [codes, ids, scales], domain="com.microsoft", gather_axis=0,
                       quantize_axis=1, block_size=w.block, bits=w.bits)
        if w.offsets is not None:
            rows = self.g.one("Gather", [self.g.const(f"{name}.offsets", w.offsets), ids], axis=0)  # (B, S, K/32)
            rows = self.g.one("Unsqueeze", [rows, self.g.small("/embed/last", np.array([-1]))])
            rows = self.g.one("Expand", [rows, self.g.small("/embed/block", np.array([1, 1, 1, OFFSET_BLOCK]))])
            rows = self.g.one("Reshape", [rows, self.g.small("/embed/shape", np.array([0, 0, k]))])
            x = self.g.one("Add", [x, rows])
        return x

    def lm_head(self, x: str) -> str:
        if "output.weight" in self.t:
            return self.linear(x, ["output.weight"])[0]
        # Tied: the embedding's own bytes, viewed as MatMulNBits wants them.
        if isinstance(self._embedding, str):
            return self.g.one("MatMul", [x, self.g.one("Transpose", [self._embedding])])
        w, codes, scales = self._embedding
        self.inputs["lm_head"] = x
        if self.int8:
            return self.int8_matmul(x, w.dequantize(), "lm_head")
        n, k = w.codes.shape
        codes = self.g.view(codes, "lm_head.codes", (n, k // w.block, w.block * w.bits // 8))
        return self.block_matmul(x, w, "lm_head", codes, scales)

    # -- graph --------------------------------------------------------------------------------
    def rope_caches(self) -> tuple[str, str]:
        dim = self.h.head_dim
        inv_freq = 1.0 / (self.h.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        angles = np.outer(np.arange(self.h.context, dtype=np.float64), inv_freq)
        return (self.g.const("cos_cache", np.cos(angles).astype(np.float32)),
                self.g.const("sin_cache", np.sin(angles).astype(np.float32)))

    def build(self, progress: Callable[[int, int], None]) -> tuple[list, list]:
        h, g = self.h, self.g
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", h.vocab])]
        kv_shape = lambda s: ["batch_size", h.kv_heads, s, h.head_dim]  # noqa: E731

        # The attention mask -> what GroupQueryAttention wants: per-row length − 1, and the total.
        one = g.small("/one", np.array([1], dtype=np.int64))
        lengths = g.one("ReduceSum", ["attention_mask", one], keepdims=0)
        seqlens_k = g.one("Cast", [g.one("Sub", [lengths, one])], to=TensorProto.INT32)
        total = g.one("Cast", [g.one("Gather", [g.one("Shape", ["attention_mask"]), g.small("/idx1", np.array(1))], axis=0)],
                      to=TensorProto.INT32)
        cos, sin = self.rope_caches()

        x = self.embedding("input_ids")
        residual, hidden = None, None
        for i in range(h.layers):
            progress(i, h.layers)
            p = f"blk.{i}"
            hidden, residual = self.norm(x, residual, f"{p}.attn_norm.weight")
            qkv = self.linear(hidden, [f"{p}.attn_{n}.weight" for n in "qkv"], [f"{p}.attn_{n}.bias" for n in "qkv"],
                              split=False)
            q, k, v = qkv if len(qkv) == 3 else (qkv[0], "", "")  # packed: GroupQueryAttention splits it
            past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
            inputs += [helper.make_tensor_value_info(past_k, TensorProto.FLOAT, kv_shape("past_sequence_length")),
                       helper.make_tensor_value_info(past_v, TensorProto.FLOAT, kv_shape("past_sequence_length"))]
            attn = f"/layers.{i}/attn/out0"
            g.nodes.append(helper.make_node(
                "GroupQueryAttention", [q, k, v, past_k, past_v, seqlens_k, total, cos, sin],
                [attn, f"present.{i}.key", f"present.{i}.value"], name=f"/layers.{i}/attn", domain="com.microsoft",
                num_heads=h.heads, kv_num_heads=h.kv_heads, scale=1.0 / float(np.sqrt(h.head_dim)), do_rotary=1,
                rotary_interleaved=int(self.rope_interleaved), local_window_size=-1))
            outputs += [helper.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT,
                                                      kv_shape("total_sequence_length")) for kv in ("key", "value")]
            x = self.linear(attn, [f"{p}.attn_output.weight"])[0]
            hidden, residual = self.norm(x, residual, f"{p}.ffn_norm.weight")
            gate, up = self.linear(hidden, [f"{p}.ffn_gate.weight", f"{p}.ffn_up.weight"])
            silu = g.one("Mul", [gate, g.one("Sigmoid", [gate])])
            x = self.linear(g.one("Mul", [silu, up]), [f"{p}.ffn_down.weight"])[0]
        progress(h.layers, h.layers)
        inputs += self.lora_inputs
        hidden, _ = self.norm(x, residual, "output_norm.weight")
        # genai only needs the last position's logits: a prefill of S tokens then costs one row
        # of the LM head, not S (S × 151936 floats for Qwen). The parity check turns this Slice
        # into an Identity to score every position (`parity.OnnxScorer`).
        last = g.one("Slice", [hidden, g.small("/last/start", np.array([-1])), g.small("/last/end", np.array([2**62])),
                               g.small("/last/axis", np.array([1]))], name=LAST_POSITION)
        g.nodes.append(helper.make_node("Identity", [self.lm_head(last)], ["logits"]))
        outputs[0] = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 1, h.vocab])
        return inputs, outputs

    def norm(self, x: str, residual: str | None, weight: str) -> tuple[str, str]:
        """RMSNorm of x + residual; returns (normalized, the new residual)."""
        gamma = self.g.const(weight, self.t.float(weight))
        if residual is None:
            return self.g.one("SimplifiedLayerNormalization", [x, gamma], axis=-1, epsilon=self.h.eps,
                              stash_type=1), x
        out = self.g.node("SkipSimplifiedLayerNormalization", [x, residual, gamma], n_out=4, domain="com.microsoft",
                          epsilon=self.h.eps)
        return out[0], out[3]


def genai_config(h: Hyper, fields: dict) -> dict:
    eos = fields.get("tokenizer.ggml.eos_token_id")
    # Chat models end a turn with <|im_end|> and a document with <|endoftext|>: stop at either.
    eos_ids = sorted({i for i in (eos, _token_id(fields, "<|im_end|>"), _token_id(fields, "<|endoftext|>"),
                                  _token_id(fields, "<|eot_id|>")) if i is not None})
    return {
        "model": {
            "bos_token_id": fields.get("tokenizer.ggml.bos_token_id", eos),
            "context_length": h.context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx", "head_size": h.head_dim, "hidden_size": h.hidden,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": h.heads, "num_hidden_layers": h.layers, "num_key_value_heads": h.kv_heads,
            },
            "eos_token_id": eos_ids if len(eos_ids) > 1 else eos,
            "pad_token_id": fields.get("tokenizer.ggml.padding_token_id", eos),
            "type": h.arch,
            "vocab_size": h.vocab,
        },
        "search": {"do_sample": False, "max_length": h.context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 50, "top_p": 1.0},
    }


def _token_id(fields: dict, text: str) -> int | None:
    index = fields.get("_token_index")
    return index.get(text) if index else None


def tokenizer_fields(reader: GGUFReader) -> dict:
    fields = {k: field(reader, k) for k in reader.fields if k.startswith("tokenizer.")}
    fields["_token_index"] = {t: i for i, t in enumerate(fields.get("tokenizer.ggml.tokens") or [])}
    return fields


def gguf_tokenizer(source: Path):
    """The tokenizer an import of `source` writes (a `tokenizers.Tokenizer`), without importing it."""
    try:
        return build_tokenizer(tokenizer_fields(Reader(source)))
    except Exception as exc:  # the gguf package raises ValueError, struct errors, ... on a bad file
        raise GGUFError(f"cannot read the tokenizer of {source}: {type(exc).__name__}: {str(exc)[:200]}") from None


def import_gguf(source: Path, out: Path, log: Callable[[str], None] = print,
                adapters: dict[str, Path] | None = None, int8: bool = False) -> dict:
    """Write the ONNX model, genai_config.json and tokenizer files of `source` into `out` (a new,
    empty folder). `adapters` (name -> PEFT LoRA folder) stay unmerged: out/adapters/NAME.onnx_adapter,
    the first one active by default. `int8` adds a second graph whose projections run in
    int8 on the CPU's integer matrix units (INT8_FILE), which the engine then runs instead.
    Returns a summary of what was written.

    The file is untrusted: its metadata and tensor shapes are checked before anything is
    converted, and whatever else a malformed file makes the readers raise ends as a GGUFError."""
    try:
        return _import(source, out, log, adapters, int8)
    except GGUFError:
        raise
    except (ValueError, KeyError, IndexError, TypeError, ZeroDivisionError, OverflowError, struct.error) as exc:
        raise GGUFError(f"{source}: malformed GGUF ({type(exc).__name__}: {str(exc)[:200]})") from None


def _write_graph(hyper: Hyper, tensors: Tensors, deltas: dict, path: Path, int8: bool,
                 log: Callable[[str], None], ranges: dict[str, np.ndarray] | None = None) -> "DecoderBuilder":
    graph = GraphWriter(path.with_name(path.name + ".data"))
    try:
        # llama.cpp's converter permutes llama's Q/K rows so that rotary pairs are adjacent
        # (its "normal" rope); qwen2 keeps HF's layout and rotates halves ("neox").
        builder = DecoderBuilder(hyper, tensors, graph, rope_interleaved=hyper.arch == "llama", adapters=deltas,
                                 int8=int8, ranges=ranges)
        step = max(1, hyper.layers // 4)

        def progress(i: int, n: int) -> None:
            if i % step == 0 or i == n:
                log(f"  layers {i}/{n}")

        inputs, outputs = builder.build(progress)
    finally:
        graph.close()
    model = helper.make_model(
        helper.make_graph(graph.nodes, "attar-gguf-decoder", inputs, outputs, graph.initializers),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
        producer_name="attar", ir_version=10)
    onnx.save_model(model, path)
    return builder


def _import(source: Path, out: Path, log: Callable[[str], None], adapters: dict[str, Path] | None,
            int8: bool) -> dict:
    try:
        reader = Reader(source)
    except Exception as exc:  # the gguf package raises ValueError, struct errors, ... on a bad file
        raise GGUFError(f"cannot read {source} as GGUF: {type(exc).__name__}: {exc}") from None
    hyper = read_hyper(reader)
    fields = tokenizer_fields(reader)
    fields["context_length"] = hyper.context
    if fields.get("tokenizer.ggml.model") != "gpt2":
        raise GGUFError(f"{source}: only byte-level BPE tokenizers (Qwen, SmolLM2, Llama 3) are supported, not "
                        f"{fields.get('tokenizer.ggml.model')!r} (a sentencepiece model such as Llama 2 or Mistral)")
    tensors = Tensors(reader)
    check_tensors(hyper, tensors)
    write_tokenizer(fields, out)  # before the weights: an unsupported vocabulary fails at once
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    log(f"  {field(reader, 'general.name', source.name)}: {hyper.arch}, {hyper.layers} layers, hidden {hyper.hidden}, "
        f"tensors {', '.join(f'{k}×{v}' for k, v in sorted(types.items()))}")
    deltas = {}
    for name, folder in (adapters or {}).items():
        try:
            deltas[name] = read_adapter(folder, hyper.arch, hyper.heads, hyper.kv_heads)
        except LoraError as exc:
            raise GGUFError(str(exc)) from None
        log(f"  LoRA adapter {name!r} ({folder}): {len(deltas[name])} weights, kept unmerged")

    builder = _write_graph(hyper, tensors, deltas, out / "model.onnx", int8=False, log=log)
    if int8:
        log("  the int8 graph (projections on the CPU's integer matrix units), calibrated on agent text")
        ranges = activation_ranges(out / "model.onnx", builder.inputs, hyper, calibration_ids(out))
        _write_graph(hyper, tensors, deltas, out / INT8_FILE, int8=True, log=log, ranges=ranges)
    (out / GENAI_CONFIG).write_text(json.dumps(genai_config(hyper, fields), indent=2))
    if deltas:
        write_adapters_file(out, list(deltas), {k: str(v) for k, v in adapters.items()})
        write_adapters(builder.adapter_params, out / ADAPTERS_DIR)
    return {"architecture": hyper.arch, "layers": hyper.layers, "gguf_types": types, "adapters": list(deltas),
            "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file())}


def calibration_ids(folder: Path) -> list[list[int]]:
    """Token ids of text like what the model will read: the student prompt, a task, a step."""
    from tokenizers import Tokenizer

    from attar.runtime import prompts, turns

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    step = ("Thought: I will compute the total cost and the discount, then answer.\nCode:\n```py\n"
            "price = 17 * 23\ndiscount = price * 0.15\nprint(price - discount)\n```<end_code>")
    conversations = [
        [{"role": "system", "content": prompts.system("- web_search(query: str) -> str\n- final_answer(answer: Any)")},
         {"role": "user", "content": prompts.TASK.format(question="A shop sells 17 boxes of 23 pens at 15% off. "
                                                         "How much does it take in?")},
         {"role": "assistant", "content": step},
         {"role": "user", "content": prompts.OBSERVATION.format(logs="332.35\n", output="None")}],
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "Which river flows through the capital of France, and how long is it? "
                                     "Explain in two sentences, with the numbers."}],
    ]
    return [tokenizer.encode(turns.render(c), add_special_tokens=False).ids for c in conversations]


def activation_ranges(model_file: Path, inputs: dict[str, str], h: Hyper, sequences: list[list[int]]) -> dict:
    """Per input channel, the largest |activation| each projection sees on `sequences`, read off
    the exact graph (its projection inputs added as outputs, in memory)."""
    names = sorted(set(inputs.values()))

    def expose(model: onnx.ModelProto) -> bool:
        model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
        return True

    session = edited_session(model_file, expose)
    peak: dict[str, np.ndarray] = {}
    for ids in sequences:
        feeds = whole_sequence_feeds(ids, h.layers, h.kv_heads, h.head_dim)
        for name, value in zip(names, session.run(names, feeds)):
            seen = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            peak[name] = np.maximum(peak.get(name, seen), seen)
    return {key: peak[x] for key, x in inputs.items()}


def whole_sequence_feeds(ids: list[int], layers: int, kv_heads: int, head_dim: int,
                         cache: type = np.float32) -> dict[str, np.ndarray]:
    """The inputs that run one whole sequence through a decoder graph with an empty KV cache (of
    numpy type `cache`: `kernels.cache_dtype`)."""
    empty = np.zeros((1, kv_heads, 0, head_dim), dtype=cache)
    feeds = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    for i in range(layers):
        feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = empty
    return feeds


def write_adapters(params: dict[str, dict[str, np.ndarray]], folder: Path) -> None:
    """One .onnx_adapter file per adapter (onnxruntime's LoRA format), for og.Adapters."""
    import onnxruntime as ort

    folder.mkdir()
    for name, tensors in params.items():
        adapter = ort.AdapterFormat()
        adapter.set_adapter_version(1)
        adapter.set_model_version(1)
        adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
        adapter.export_adapter(str(folder / f"{name}{ADAPTER_SUFFIX}"))
