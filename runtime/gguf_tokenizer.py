"""A GGUF's byte-level BPE vocabulary -> the tokenizer.json that onnxruntime-genai reads.

The pre-tokenizer follows llama.cpp's for the GGUF's `tokenizer.ggml.pre`, so the exported model
sees the token ids the GGUF's own runtime would give it (transformers' GGUF loader drops the
digit split of SmolLM2's, for one)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by `tokenizer.ggml.pre`.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(pattern: str):
    return pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)


def _pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return pre_tokenizers.Sequence([_split(_QWEN2), byte_level])
    if pre in ("llama3", "llama-bpe", "smaug-bpe"):
        return pre_tokenizers.Sequence([_split(_LLAMA3), byte_level])
    if pre == "smollm":  # llama.cpp: every digit on its own, then GPT-2's split
        return pre_tokenizers.Sequence([_split(r"\p{N}"), _split(_GPT2), byte_level])
    if pre in ("gpt-2", "default", ""):
        return pre_tokenizers.Sequence([_split(_GPT2), byte_level])
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}")


CONTROL, USER_DEFINED = 3, 4


def build_tokenizer(fields: dict) -> Tokenizer:
    """The tokenizer of a GGUF's tokenizer.* metadata values (tokens, token_type, merges, ids...)."""
    if fields.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"only byte-level BPE GGUF tokenizers are supported, not {fields.get('tokenizer.ggml.model')!r}")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    types: list[int] = fields["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(fields.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=(ty == CONTROL), normalized=False)
                    for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    return tok


def write_tokenizer(fields: dict, out: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `out`."""
    build_tokenizer(fields).save(str(out / "tokenizer.json"))
    tokens: list[str] = fields["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None else None

    template = fields.get("tokenizer.chat_template")
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": token("bos"), "eos_token": token("eos"),
              "pad_token": token("padding"), "unk_token": token("unknown"),
              "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False)),
              "clean_up_tokenization_spaces": False, "model_max_length": fields.get("context_length")}
    if template:
        config["chat_template"] = template
        (out / "chat_template.jinja").write_text(template)
    (out / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}, indent=2))
