"""Any student a user has (HF folder, GGUF file, base + LoRA adapter) -> an ONNX model folder
that onnxruntime-genai runs. The conversion itself is onnxruntime-genai's model builder; this
module only gets the weights into a plain HF folder first and makes the output atomic."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

PRECISIONS = ("int4", "int8", "fp16", "fp32")


class ExportError(Exception):
    """The source cannot be exported; the message is one line for the user."""


def load_source(source: Path, lora: Path | None = None):
    """Load (model, tokenizer) in float32 from an HF folder or a GGUF file, LoRA merged in."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not source.exists():
        raise ExportError(f"source not found: {source}")
    kwargs: dict = {"dtype": torch.float32}
    folder = source
    if source.is_file():
        if source.suffix != ".gguf":
            raise ExportError(f"a source file must be a .gguf model: {source}")
        folder, kwargs["gguf_file"] = source.parent, source.name
    elif not (source / "config.json").is_file():
        raise ExportError(f"not a Hugging Face model folder (no config.json): {source}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=kwargs.get("gguf_file"))
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except Exception as exc:  # transformers raises many types for a bad checkpoint
        raise ExportError(f"cannot load {source}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if "gguf_file" in kwargs:
        # Dequantized GGUF weights are plain tensors now; transformers still refuses to save
        # the model while it remembers the GGUF quantizer.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if lora is not None:
        model = merge_lora(model, lora)
    model.eval()
    return model, tokenizer


def merge_lora(model, adapter: Path):
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise ExportError(f"not a LoRA adapter folder (no adapter_config.json): {adapter}")
    try:
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except Exception as exc:
        raise ExportError(f"cannot apply adapter {adapter}: {str(exc).splitlines()[0]}") from None


def build_onnx(
    hf_dir: Path, out: Path, precision: str, ep: str, log: Callable[[str], None]
) -> None:
    """Run onnxruntime-genai's model builder in a child process (it peaks at several GB)."""
    cache = out / ".builder-cache"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder",
           "-i", str(hf_dir), "-o", str(out), "-p", precision, "-e", ep, "-c", str(cache)]
    if precision == "int4":
        # k-quant with the last MatMul and the most sensitive layers in int8: on SmolLM2-135M
        # it keeps 85% top-1 agreement against 80% for plain round-to-nearest int4.
        cmd += ["--extra_options", "algo_config=k_quant_mixed"]
        if ep == "cpu":
            cmd.append("accuracy_level=4")  # int8 activations in MatMulNBits: the fast CPU path
    log_file = out / "builder.log"
    with open(log_file, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()][-1:]
        raise ExportError(f"the onnxruntime-genai builder failed: {tail[0] if tail else proc.returncode}")
    shutil.rmtree(cache, ignore_errors=True)
    log_file.unlink()


def export_model(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    lora: str | os.PathLike | None = None,
    precision: str = "int4",
    ep: str = "cpu",
    check: bool = True,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> dict | None:
    """Export SOURCE to an onnxruntime-genai folder at OUT; returns the parity report.

    The folder appears at OUT only when complete: everything is written to a sibling temp
    folder first and renamed into place, so an interrupted export leaves nothing behind.
    """
    source, out = Path(source), Path(out)
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if not source.exists():
        raise ExportError(f"source not found: {source}")
    if out.exists():
        raise ExportError(f"output folder already exists: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    log(f"[1/4] loading {source}" + (f" + LoRA {lora}" if lora else ""))
    model, tokenizer = load_source(source, Path(lora) if lora else None)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        hf_dir = work / "hf"
        log("[2/4] writing a float32 Hugging Face copy")
        model.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        onnx_dir = work / "onnx"
        onnx_dir.mkdir()
        log(f"[3/4] building the {precision} ONNX model for {ep}")
        build_onnx(hf_dir, onnx_dir, precision, ep, log)
        report = None
        if check:
            from attar.export.parity import parity_report

            log("[4/4] parity check against the source model")
            report = parity_report(model, tokenizer, onnx_dir)
            report["precision"] = precision
            report["export_seconds"] = round(time.perf_counter() - began, 1)
            import json

            (onnx_dir / "parity.json").write_text(json.dumps(report, indent=2))
        else:
            log("[4/4] parity check skipped (--no-check)")
        os.replace(onnx_dir, out)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)
