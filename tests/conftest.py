"""Shared fixtures: a tiny random-weight llama with SmolLM2's real tokenizer, and its ONNX export."""

import importlib.util
from pathlib import Path

import pytest


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_torch = pytest.mark.skipif(not has("torch") or not has("transformers"), reason="needs attar[export]")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from attar.export.default import GGUF_NAME, default_gguf

    gguf = default_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name if gguf.name == GGUF_NAME else None)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


def make_tiny_llama(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tokenizer_dir):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_hf"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_hf):
    from attar.export.convert import export_model

    out = tmp_path_factory.mktemp("tiny_onnx_parent") / "tiny-int4"
    export_model(tiny_hf, out, check=False, log=lambda m: None)
    return out
