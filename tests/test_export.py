"""Export: real conversions of a tiny model, through the CLI and the Python API."""

import json
import subprocess
import sys
import time

import numpy as np

from conftest import needs_torch

pytestmark = needs_torch


def first_logits(model_dir, prompt_ids):
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + 4, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(prompt_ids, dtype=np.int32))
    return np.asarray(gen.get_logits()).reshape(-1)


def test_export_tiny_model_with_parity(tmp_path, tiny_hf):
    from attar.export.convert import export_model

    out = tmp_path / "int4"
    report = export_model(tiny_hf, out, log=lambda m: None)
    for name in ("genai_config.json", "model.onnx", "tokenizer.json", "parity.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "parity.json").read_text()) == report
    assert 0.0 <= report["top1_agreement"] <= 1.0
    assert report["perplexity_export"] > 1.0
    # onnxruntime-genai runs it and applies the chat template it was given.
    import onnxruntime_genai as og

    tok = og.Tokenizer(og.Model(str(out)))
    prompt = tok.apply_chat_template(messages=json.dumps([{"role": "user", "content": "hi"}]),
                                     add_generation_prompt=True)
    assert "<|im_start|>assistant" in prompt
    assert first_logits(out, tok.encode(prompt)).shape[0] > 1000


def test_lora_adapter_changes_the_export(tmp_path, tiny_hf, tiny_onnx):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from attar.export.convert import export_model

    base = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                 init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    out = tmp_path / "merged"
    export_model(tiny_hf, out, lora=adapter, check=False, log=lambda m: None)
    ids = [1, 520, 3300, 42]
    assert not np.allclose(first_logits(out, ids), first_logits(tiny_onnx, ids), atol=1e-3)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "attar.runtime.cli", *args], capture_output=True, text=True)


def test_missing_and_corrupt_sources_fail_in_one_line(tmp_path):
    missing = run_cli("export", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"Error: source not found: {tmp_path / 'nope'}"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    corrupt = run_cli("export", str(bad), "-o", str(tmp_path / "out"))
    assert corrupt.returncode == 1
    assert corrupt.stderr.strip().splitlines()[-1].startswith("Error: cannot read")
    assert "Traceback" not in corrupt.stderr
    assert not (tmp_path / "out").exists()


def test_interrupted_export_leaves_nothing_at_out(tmp_path, tiny_hf):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "attar.runtime.cli", "export", str(tiny_hf), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".out.partial-*/onnx")):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not out.exists()
