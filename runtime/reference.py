"""The GGUF itself as a reference scorer: a plain numpy forward pass over weights dequantized by the
`gguf` package (independently of `quants.py`), in float32. Slow, small and torch-free: it only has
to score a few short sequences to tell whether an export computes what the GGUF computes."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from gguf import dequantize

from attar.runtime.gguf_import import Hyper, Reader, Tensors, read_hyper
from attar.runtime.lora import read_adapter


def _rms_norm(x: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * gamma


def _rope(x: np.ndarray, theta: float, interleaved: bool) -> np.ndarray:
    """x (heads, S, D) rotated by position; pairs are adjacent (interleaved) or halves apart."""
    _, s, d = x.shape
    angles = np.outer(np.arange(s), 1.0 / theta ** (np.arange(0, d, 2) / d))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out
    a, b = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


class GGUFScorer:
    """Next-token logits of whole sequences, computed from the GGUF in numpy."""

    name = "GGUF (numpy, float32)"

    def __init__(self, path: Path, lora: Path | None = None):
        self.reader = Reader(path)
        self.h: Hyper = read_hyper(self.reader)
        self.t = Tensors(self.reader)
        self.deltas = read_adapter(lora, self.h.arch, self.h.heads, self.h.kv_heads) if lora else {}
        if lora:
            self.name = "GGUF + LoRA merged (numpy, float32)"

    def _w(self, name: str) -> np.ndarray:
        w = self.t.float(name)  # gguf's own dequantizer, not quants.py
        if name in self.deltas:
            w = w + self.deltas[name].b @ self.deltas[name].a  # float weights may be read-only file views
        return w

    def _b(self, name: str) -> np.ndarray | float:
        return self._w(name) if name in self.t else 0.0

    def logits(self, sequences: list[list[int]], progress: Callable[[int, int], None] = lambda i, n: None,
               positions: list[slice] | None = None) -> list[np.ndarray]:
        """Logits (len, vocab) for each sequence, or only at `positions` of each. All sequences go
        through a layer before the next, so each layer's weights are dequantized once."""
        h = self.h
        embed = self.t.by_name["token_embd.weight"]
        xs = [dequantize(embed.data[np.asarray(ids)], embed.tensor_type).astype(np.float32).reshape(len(ids), h.hidden)
              for ids in sequences]
        group = h.heads // h.kv_heads
        interleaved = h.arch == "llama"
        for layer in range(h.layers):
            progress(layer, h.layers)
            p = f"blk.{layer}"
            wq, wk, wv, wo = (self._w(f"{p}.attn_{n}.weight") for n in ("q", "k", "v", "output"))
            bq, bk, bv = (self._b(f"{p}.attn_{n}.bias") for n in "qkv")
            gate, up, down = (self._w(f"{p}.ffn_{n}.weight") for n in ("gate", "up", "down"))
            attn_norm, ffn_norm = self._w(f"{p}.attn_norm.weight"), self._w(f"{p}.ffn_norm.weight")
            for i, x in enumerate(xs):
                s = x.shape[0]
                a = _rms_norm(x, attn_norm, h.eps)
                q = (a @ wq.T + bq).reshape(s, h.heads, h.head_dim).transpose(1, 0, 2)
                k = (a @ wk.T + bk).reshape(s, h.kv_heads, h.head_dim).transpose(1, 0, 2)
                v = (a @ wv.T + bv).reshape(s, h.kv_heads, h.head_dim).transpose(1, 0, 2)
                q, k = _rope(q, h.rope_theta, interleaved), _rope(k, h.rope_theta, interleaved)
                k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
                scores = q @ k.transpose(0, 2, 1) / np.sqrt(h.head_dim)
                scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
                scores = np.exp(scores - scores.max(-1, keepdims=True))
                attn = (scores / scores.sum(-1, keepdims=True)) @ v
                x = x + attn.transpose(1, 0, 2).reshape(s, h.hidden) @ wo.T
                m = _rms_norm(x, ffn_norm, h.eps)
                g = m @ gate.T
                xs[i] = x + ((g / (1 + np.exp(-g))) * (m @ up.T)) @ down.T
        progress(h.layers, h.layers)
        head = "output.weight" if "output.weight" in self.t else "token_embd.weight"
        norm = self._w("output_norm.weight")
        finals = [_rms_norm(x if positions is None else x[positions[i]], norm, h.eps) for i, x in enumerate(xs)]
        out = [np.empty((f.shape[0], h.vocab), np.float32) for f in finals]
        t = self.t.by_name[head]
        for start in range(0, h.vocab, 8192):  # the LM head in slices: its float32 copy is large
            rows = dequantize(t.data[start:start + 8192], t.tensor_type).astype(np.float32).reshape(-1, h.hidden)
            for f, o in zip(finals, out):
                o[:, start:start + rows.shape[0]] = f @ rows.T
        return out
