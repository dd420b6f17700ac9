"""A PEFT LoRA adapter read with numpy, as low-rank deltas on a GGUF's weights (kept unmerged, so
the quantized base stays exactly the one the student was trained on: the QLoRA way)."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# PEFT module name -> GGUF tensor name (llama and qwen2 share them).
MODULES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
           "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class LoraError(ValueError):
    """The adapter cannot be applied; the message is one line for the user."""


@dataclass
class LoraDelta:
    """W' = W + b @ a, with the adapter's scale already in b."""

    a: np.ndarray  # (r, K) float32
    b: np.ndarray  # (N, r) float32


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """float32 copies of every tensor in a .safetensors file (F32, F16 or BF16)."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        data = raw[8 + size + start:8 + size + end]
        if info["dtype"] == "BF16":
            array = (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in ("F16", "F32"):
            array = np.frombuffer(data, np.float16 if info["dtype"] == "F16" else np.float32).astype(np.float32)
        else:
            raise LoraError(f"{path.name}: tensor {name} has dtype {info['dtype']}; expected F32, F16 or BF16")
        out[name] = array.reshape(info["shape"])
    return out


def _llama_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order (rotary pairs adjacent) from HF's (pairs half a head apart)."""
    n = rows.shape[0]
    return rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def read_adapter(path: Path, arch: str, heads: int, kv_heads: int) -> dict[str, LoraDelta]:
    """The adapter's deltas by GGUF tensor name, in the GGUF's row order."""
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file():
        raise LoraError(f"not a LoRA adapter folder (no adapter_config.json): {path}")
    if not weights_file.is_file():
        raise LoraError(f"{path} has no adapter_model.safetensors (save the adapter with safe_serialization)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("modules_to_save") or config.get("use_dora"):
        raise LoraError(f"{path}: only plain LoRA adapters (no DoRA, no modules_to_save) can stay unmerged")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scale = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in read_safetensors(weights_file).items():
        match = _KEY.search(key)
        if match is None or match.group(2) not in MODULES:
            raise LoraError(f"{path}: adapter tensor {key} is not on a layer's attention or MLP projection")
        pairs.setdefault((int(match.group(1)), match.group(2)), {})[match.group(3)] = value
    deltas = {}
    for (layer, module), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LoraError(f"{path}: layer {layer} {module} lacks lora_A or lora_B")
        b = ab["B"] * scale
        if arch == "llama" and module in ("q_proj", "k_proj"):
            b = _llama_permute(b, heads if module == "q_proj" else kv_heads)
        deltas[f"blk.{layer}.{MODULES[module]}.weight"] = LoraDelta(ab["A"].astype(np.float32), b.astype(np.float32))
    if not deltas:
        raise LoraError(f"{path}: the adapter holds no LoRA weights")
    return deltas
