"""Token-level generation over an exported decoder, driven by onnxruntime directly.

onnxruntime-genai re-prefills the whole conversation at every agent step and prefills a SAG
prompt once per candidate. The decoder graph itself is plain ONNX with explicit KV inputs and
outputs (GroupQueryAttention), so this engine keeps the cache between calls:

- A `Sequence` owns one KV cache and the token ids it covers. `extend(ids)` keeps the longest
  common prefix of those ids and prefills only the rest: an agent's next step prefills the
  observation and the new turn header, not the conversation.
- `Sequence.rows(n)` copies the prefilled prompt's cache into n rows that then decode in one
  batch: SAG prefills its prompt once.

The cache is "share-buffer": each layer's past and present are one preallocated buffer that
GroupQueryAttention writes the new keys and values into, in place (no copy per token).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GROW = 1024  # cache capacity grows in steps of this many tokens (doubling beyond)


@dataclass(frozen=True)
class Shape:
    layers: int
    kv_heads: int
    head: int
    context: int
    names: dict  # genai_config's input/output names


class Engine:
    """One onnxruntime session over a decoder folder; sequences share it."""

    def __init__(self, model_dir: str | os.PathLike, threads: int | None = None,
                 extra_inputs: dict[str, np.ndarray] | None = None):
        import onnxruntime as ort

        self.ort = ort
        model_dir = Path(model_dir)
        config = json.loads((model_dir / "genai_config.json").read_text())["model"]
        decoder = config["decoder"]
        self.shape = Shape(decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"],
                           config.get("context_length", 2048), {**decoder["inputs"], **decoder["outputs"]})
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or min(os.cpu_count() or 1, 8)
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_dir / decoder["filename"]), options)
        inputs = {i.name for i in self.session.get_inputs()}
        if "position_ids" in inputs:
            raise ValueError("this graph takes position_ids; the engine drives GroupQueryAttention graphs only")
        # LoRA inputs of an export (rank 0 unless an adapter is fed) and their values.
        self.extra = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in (extra_inputs or {}).items()}

    def sequence(self) -> "Sequence":
        return Sequence(self, rows=1)

    def binding(self, cache: "Sequence"):
        """An IO binding with the cache's buffers bound as both past and present (in place)."""
        names = self.shape.names
        io = self.session.io_binding()
        for i in range(self.shape.layers):
            for kind in ("key", "value"):
                value = cache.ort_values[kind][i]
                io.bind_ortvalue_input(names[f"past_{kind}_names"] % i, value)
                io.bind_ortvalue_output(names[f"present_{kind}_names"] % i, value)
        for name, value in self.extra.items():
            io.bind_ortvalue_input(name, value)
        return io

    def _run(self, rows: int, ids: np.ndarray, total: int, cache: "Sequence") -> np.ndarray:
        """Feed `ids` (rows × S) at positions total−S..total−1; logits of the last position."""
        names = self.shape.names
        io = cache.io
        io.bind_cpu_input(names["input_ids"], np.ascontiguousarray(ids, dtype=np.int64))
        io.bind_cpu_input(names["attention_mask"], np.ones((rows, total), dtype=np.int64))
        io.bind_output(names["logits"])
        self.session.run_with_iobinding(io)
        logits = io.get_outputs()[-1].numpy()
        return logits[:, -1, :]


class Sequence:
    """A KV cache of `rows` sequences that all hold the same `ids` so far."""

    def __init__(self, engine: Engine, rows: int, capacity: int = GROW):
        self.engine, self.rows = engine, rows
        self.ids: list[int] = []
        self.reused = 0  # ids the last extend() found already in the cache
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self._allocate(capacity)

    def _allocate(self, capacity: int, keep: int = 0) -> None:
        s = self.engine.shape
        shape = (self.rows, s.kv_heads, capacity, s.head)
        keys = [np.zeros(shape, np.float32) for _ in range(s.layers)]
        values = [np.zeros(shape, np.float32) for _ in range(s.layers)]
        for new, old in zip(keys + values, self.keys + self.values):
            new[:, :, :keep] = old[:, :, :keep]
        self.keys, self.values, self.capacity = keys, values, capacity
        ortvalue = self.engine.ort.OrtValue.ortvalue_from_numpy  # views: onnxruntime writes into these arrays
        self.ort_values = {"key": [ortvalue(k) for k in keys], "value": [ortvalue(v) for v in values]}
        self.io = self.engine.binding(self)

    def _reserve(self, total: int) -> None:
        if total > self.engine.shape.context:
            raise ValueError(f"{total} tokens exceed the model's context of {self.engine.shape.context}")
        if total > self.capacity:
            self._allocate(min(self.engine.shape.context, max(total + GROW, 2 * self.capacity)), keep=len(self.ids))

    def extend(self, ids: list[int]) -> np.ndarray:
        """Make the cache hold exactly `ids`, prefilling only what differs from what it holds;
        the logits after the last id (rows × vocab)."""
        keep = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)  # at least one id is fed: its logits are the answer
        self.reused = keep
        self._reserve(len(ids))
        new = np.array([ids[keep:]] * self.rows)
        logits = self.engine._run(self.rows, new, len(ids), self)
        self.ids = list(ids)
        return logits

    def step(self, tokens: list[int]) -> np.ndarray:
        """Feed one token per row (rows that diverge keep their own KV; `ids` then tracks row 0)."""
        total = len(self.ids) + 1
        self._reserve(total)
        logits = self.engine._run(self.rows, np.array(tokens).reshape(self.rows, 1), total, self)
        self.ids.append(int(tokens[0]))
        return logits

    def rows_from(self, n: int) -> "Sequence":
        """n rows that each start from this (one-row) cache: the prompt prefilled once."""
        batch = Sequence(self.engine, rows=n, capacity=self.capacity)
        length = len(self.ids)
        for dst, src in zip(batch.keys + batch.values, self.keys + self.values):
            dst[:, :, :length] = src[:, :, :length]
        batch.ids = list(self.ids)
        return batch


def sample(logits: np.ndarray, temperature: float, top_p: float, top_k: int, rng: np.random.Generator) -> int:
    """Greedy at temperature 0, else softmax(logits / T) restricted to the top-k, then to the
    smallest set whose probability reaches top-p."""
    if temperature <= 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / temperature
    k = min(top_k, x.size) if top_k and top_k > 0 else x.size
    top = np.argpartition(-x, k - 1)[:k]
    top = top[np.argsort(-x[top])]
    p = np.exp(x[top] - x[top[0]])
    p /= p.sum()
    if top_p < 1.0:
        cut = int(np.searchsorted(np.cumsum(p), top_p)) + 1
        top, p = top[:cut], p[:cut] / p[:cut].sum()
    return int(top[rng.choice(len(top), p=p)])
