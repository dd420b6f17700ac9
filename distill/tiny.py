"""A tiny random-weight llama with SmolLM2's real tokenizer and chat template: the student of
`attar demo --quick` and of the tests, where the pipeline matters and the quality does not."""

from __future__ import annotations

from pathlib import Path

from attar.runtime.models import gguf_path


def save_default_tokenizer(out: Path) -> Path:
    from transformers import AutoTokenizer

    gguf = gguf_path("smollm2-135m")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def make_tiny_llama(out: Path, tokenizer_dir: Path | None = None, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    if tokenizer_dir is None:
        tokenizer_dir = save_default_tokenizer(out.with_name(out.name + "-tokenizer"))
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out
