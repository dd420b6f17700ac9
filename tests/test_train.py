"""Student training: the loss mask, a real (tiny) LoRA run, resume, and the adapter feeding export."""

import json

import pytest

from conftest import TRAJECTORY, needs_torch

pytestmark = needs_torch

@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "agent_sft.jsonl"
    path.write_text("".join(json.dumps({"messages": TRAJECTORY, "id": i}) + "\n" for i in range(8)))
    return path


def test_loss_mask_covers_exactly_the_assistant_turns(data_file, tiny_hf, tmp_path):
    from attar.distill.train import TrainConfig, make_trainer

    trainer = make_trainer(data_file, str(tiny_hf), tmp_path / "run", TrainConfig(rank=4, alpha=8, max_steps=1))
    row = trainer.train_dataset[0]
    tok = trainer.processing_class
    ids, labels = row["input_ids"], row["labels"]
    trained = tok.decode([t for t, label in zip(ids, labels) if label != -100])
    untrained = tok.decode([t for t, label in zip(ids, labels) if label == -100])
    assert trained == TRAJECTORY[2]["content"] + "<|im_end|>" + TRAJECTORY[4]["content"] + "<|im_end|>"
    for turn in (TRAJECTORY[0], TRAJECTORY[1], TRAJECTORY[3]):
        assert turn["content"] in untrained and turn["content"] not in trained
    # What the model is trained on after collation is exactly that.
    batch = trainer.data_collator([row])
    assert batch["labels"][0].tolist() == labels


def test_train_resume_and_export_the_adapter(data_file, tiny_hf, tmp_path):
    from attar.distill.train import TrainConfig, native_bf16, train
    from attar.export.convert import export_model

    cfg = TrainConfig(rank=4, alpha=8, max_steps=4, save_steps=2, batch_size=2, grad_accum=1, bf16=False)
    out = tmp_path / "run"
    # A run that died after its first checkpoint: resume picks it up.
    from attar.distill.train import make_trainer

    first = make_trainer(data_file, str(tiny_hf), out, TrainConfig(**{**cfg.__dict__, "max_steps": 2}))
    first.train()
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    adapter = train(data_file, str(tiny_hf), out, cfg, merge=True)
    info = json.loads((adapter / "attar_train.json").read_text())
    assert info["metrics"]["train_runtime"] >= 0 and (adapter / "adapter_config.json").is_file()
    assert info["cpu_weights"] == ("bf16" if native_bf16() else "fp32")  # what ran, not "default"
    assert (out / "merged" / "config.json").is_file() and not (out / "checkpoints").exists()
    report = export_model(tiny_hf, tmp_path / "student-int4", lora=adapter, log=lambda m: None)
    assert (tmp_path / "student-int4" / "genai_config.json").is_file() and report["top1_agreement"] >= 0


@pytest.mark.parametrize("flags, dtype", [({"avx2", "fma"}, "fp32"), ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),
                                          ({"avx2", "amx_tile", "amx_bf16"}, "bf16"), (set(), "fp32")],
                         ids=["avx2", "avx512-bf16", "amx", "unknown"])
def test_the_base_is_bf16_only_where_the_cpu_multiplies_bf16(monkeypatch, data_file, tiny_hf, tmp_path, flags, dtype):
    """Elsewhere torch converts bf16 operands first: on an AVX2 EPYC a bf16 matmul ran 40-80x as
    long as fp32's, and a tiny student's demo training 3 steps in 72 s instead of a few."""
    import torch

    from attar.distill.train import TrainConfig, base_dtype, make_trainer
    from attar.runtime import kernels

    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    assert base_dtype(TrainConfig()) == dtype
    assert base_dtype(TrainConfig(cpu_weights="fp32")) == "fp32" and base_dtype(TrainConfig(cpu_weights="bf16")) == "bf16"
    if torch.cuda.is_available():  # GPUs train in the base's own dtype
        return
    trainer = make_trainer(data_file, str(tiny_hf), tmp_path / "run", TrainConfig(rank=4, alpha=8, max_steps=1))
    frozen = {p.dtype for name, p in trainer.model.named_parameters() if "lora_" not in name}
    assert frozen == {torch.bfloat16 if dtype == "bf16" else torch.float32}
