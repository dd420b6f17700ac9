"""LoRA SFT of a student on agent trajectories (or CoT answers), with PEFT and TRL's SFTTrainer.

The paper's recipe is the default: rank 64, alpha 128, all linear layers, lr 2e-4, 2 epochs,
effective batch 8, loss on assistant turns only. On CPU it runs in one process; on GPUs the
same module runs under `accelerate launch -m attar.distill.train ...` (see the README).
A killed run resumes from its last checkpoint when started again with the same OUT."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Tokenizer

from attar.distill.data import check_messages, read_jsonl
from attar.export.convert import load_source
from attar.runtime.gguf_import import gguf_tokenizer
from attar.runtime.models import gguf_path
from attar.runtime.turns import START, encode_for_training


@dataclass
class TrainConfig:
    rank: int = 64
    alpha: int = 128
    dropout: float = 0.05
    lr: float = 2e-4
    epochs: float = 2.0
    # Per device. On CPU, 1: a padded batch makes sdpa take its masked (math) path, and 4 agent
    # trajectories trained in 21 s one at a time vs 36 s as two padded pairs.
    batch_size: int | None = None  # None: 1 on CPU, 2 on GPUs
    grad_accum: int | None = None  # None: effective batch (batch_size * grad_accum * devices) of 8
    max_length: int = 2048
    bf16: bool | None = None  # bf16 autocast. None: on GPUs only (on CPU autocast was slower than fp32)
    # The frozen base's dtype on CPU: "bf16" (no autocast; the LoRA weights and optimizer stay fp32)
    # puts the base's matmuls on AMX, "fp32", or None: bf16 where the CPU multiplies it natively
    # (`native_bf16`), else fp32. bench/train.py measures both.
    cpu_weights: str | None = None
    save_steps: int = 10  # a killed run loses at most this many steps
    logging_steps: int = 5
    seed: int = 42
    max_steps: int = -1  # for smoke runs


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX, AVX-512 BF16), where torch's oneDNN runs a
    bf16 base's matmuls faster than fp32. Elsewhere torch converts each bf16 operand first: on an
    AVX2 EPYC (no bf16 instructions) a bf16 matmul ran 40-80× as long as fp32's."""
    from attar.runtime.kernels import cpu_flags

    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def base_dtype(cfg: TrainConfig) -> str:
    """The frozen base's dtype on CPU, as `cfg.cpu_weights` asks (None: by `native_bf16`)."""
    return cfg.cpu_weights or ("bf16" if native_bf16() else "fp32")


def load_student(student: str):
    """(model, tokenizer) in float32 from "default", an HF folder or a GGUF file."""
    return load_source(student_path(student))


def student_path(student: str) -> Path:
    return gguf_path() if student == "default" else Path(student)


def runtime_tokenizer(student: str) -> Tokenizer:
    """The tokenizer the exported student will read with: training encodes with it, so the ids a
    student learns are the ids the runtime gives it (transformers' GGUF loader splits digits
    differently for SmolLM2, for one)."""
    path = student_path(student)
    if path.is_file():
        return gguf_tokenizer(path)
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"{path}: the student has no tokenizer.json (a fast tokenizer is needed)")
    return Tokenizer.from_file(str(path / "tokenizer.json"))


def tokenized(messages: list[dict], tokenizer: Tokenizer, max_length: int) -> dict:
    """One training row: the conversation's ids as the runtime renders them, loss on the assistant's
    own tokens only (`turns.encode_for_training`), cut to `max_length`."""
    ids, trained = encode_for_training(tokenizer, messages)
    ids, trained = ids[:max_length], trained[:max_length]
    return {"input_ids": ids, "labels": [i if t else -100 for i, t in zip(ids, trained)]}


def data_files(data: str | os.PathLike | list) -> list[Path]:
    """One training file or several (mixed into one set)."""
    return [Path(f) for f in ([data] if isinstance(data, (str, os.PathLike)) else data)]


def make_trainer(data: str | os.PathLike | list, student: str, out: str | os.PathLike, cfg: TrainConfig = TrainConfig()):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    files, out = data_files(data), Path(out)
    for file in files:
        if not file.is_file():
            raise ValueError(f"training data not found: {file}")
    encoder = runtime_tokenizer(student)
    rows = []
    for file in files:
        for row in read_jsonl(file, lambda row: check_messages(row.get("messages"))):
            rows.append(tokenized(row["messages"], encoder, cfg.max_length))
    if not rows:
        raise ValueError(f"{', '.join(map(str, files))}: no training rows")
    dataset = Dataset.from_list(rows)
    model, tokenizer = load_student(student)
    on_gpu = torch.cuda.is_available()
    if cfg.cpu_weights not in ("bf16", "fp32", None):
        raise ValueError(f"cpu_weights is bf16 or fp32, not {cfg.cpu_weights!r}")
    if not on_gpu and base_dtype(cfg) == "bf16":
        model = model.to(torch.bfloat16)
    if encoder.token_to_id(START) is None:
        raise ValueError(f"attar's turn format is ChatML; the student's tokenizer has no {START} token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch_size = cfg.batch_size or (2 if on_gpu else 1)
    grad_accum = cfg.grad_accum or max(1, 8 // batch_size)
    args = SFTConfig(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,  # a fraction of the run (transformers 5)
        max_length=cfg.max_length,
        bf16=on_gpu if cfg.bf16 is None else cfg.bf16,
        use_cpu=not on_gpu,
        gradient_checkpointing=on_gpu,  # ~20% slower on CPU, where memory is not the limit
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=2,
        report_to=[],
        seed=cfg.seed,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config)


def train(data: str | os.PathLike | list, student: str, out: str | os.PathLike, cfg: TrainConfig = TrainConfig(),
          merge: bool = False) -> Path:
    """Train, resuming from OUT/checkpoints if a run was killed; returns OUT/adapter."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(out)
    adapter = out / "adapter"
    if adapter.exists():
        if merge and not (out / "merged").exists():  # killed between saving the adapter and merging
            _merge(student, adapter, out)
        return adapter
    out.mkdir(parents=True, exist_ok=True)
    trainer = make_trainer(data, student, out, cfg)
    checkpoints = out / "checkpoints"
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    result = trainer.train(resume_from_checkpoint=last)
    tmp = out / "adapter.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp)
    trainer.processing_class.save_pretrained(tmp)
    (tmp / "attar_train.json").write_text(json.dumps({"student": student, "data": list(map(str, data_files(data))),
                                                      **asdict(cfg), "cpu_weights": base_dtype(cfg),
                                                      "train_loss": result.training_loss,
                                                      "metrics": result.metrics}, indent=2, default=str))
    os.replace(tmp, adapter)
    if merge:
        _save_merged(trainer.model.merge_and_unload(), trainer.processing_class, out)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return adapter


def _merge(student: str, adapter: Path, out: Path) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    model, _ = load_student(student)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    _save_merged(merged, AutoTokenizer.from_pretrained(adapter), out)


def _save_merged(model, tokenizer, out: Path) -> None:
    """OUT/merged: base + adapter as one HF folder, for evaluation before export."""
    tmp = out / "merged.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out / "merged")


def main() -> None:
    """Entry point for `accelerate launch -m attar.distill.train DATA STUDENT OUT [--merge]`."""
    import sys

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    train(args[0], args[1], args[2], merge="--merge" in sys.argv)


if __name__ == "__main__":
    main()
