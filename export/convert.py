"""Any student a user has (HF folder, GGUF file, base + LoRA adapter) -> an ONNX model folder
that onnxruntime-genai runs, written atomically and checked against its source.

A GGUF goes through attar's own importer (`gguf_import`: exact weights, no torch); an HF folder,
or a GGUF with an explicit `--precision`, through onnxruntime-genai's model builder after
transformers has written a plain float32 copy."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from attar.runtime.build import Writer, build, gguf_writer
from attar.runtime.modeldir import ModelError, check_adapter_name

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


def build_onnx(hf_dir: Path, out: Path, precision: str, ep: str, keep_log: Path) -> None:
    """Run onnxruntime-genai's model builder in a child process (it peaks at several GB). On
    failure its log is kept at `keep_log` (the partial output folder is deleted)."""
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
        # Name the cause: the last exception line, not the builder's last progress line.
        shutil.copyfile(log_file, keep_log)
        lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
        causes = [ln for ln in lines if re.match(r"^\w+(Error|Exception|Killed)\b|^Killed", ln)] or lines[-1:]
        cause = causes[-1] if causes else f"exit code {proc.returncode}"
        if proc.returncode < 0:
            cause = f"killed by signal {-proc.returncode} (out of memory?); last line: {cause}"
        raise ExportError(f"the onnxruntime-genai builder failed: {cause} (full log: {keep_log})")
    shutil.rmtree(cache, ignore_errors=True)
    log_file.unlink()


def export_model(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    lora: str | os.PathLike | list | dict | None = None,
    precision: str | None = None,
    ep: str = "cpu",
    check: bool = True,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
    check_questions: int | None = None,
    int8: bool = False,
) -> dict | None:
    """Export SOURCE to an onnxruntime-genai folder at OUT; returns the parity report.

    A GGUF file is imported exactly (its own quantized weights, no torch) unless a `precision` is
    asked for, and its LoRA adapters (a folder, a list of them, `NAME=folder` strings or a
    {name: folder} dict) stay unmerged, the first active by default; an HF folder goes through
    onnxruntime-genai's builder at `precision` (int4 by default), its one adapter merged.
    `int8` (GGUF only) adds the int8 graph attar's engine then runs on (the CPU's matrix units).

    The folder appears at OUT only when complete: everything is written to a sibling temp
    folder first and renamed into place, so an interrupted export leaves nothing behind.
    """
    source, out = Path(source), Path(out)
    if precision is not None and precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if not source.exists():
        raise ExportError(f"source not found: {source}")
    if source.is_file() and source.suffix != ".gguf":
        raise ExportError(f"a source file must be a .gguf model: {source}")
    try:
        adapters = adapter_names(lora)
        if source.is_file() and precision is None:
            write = gguf_writer(source, adapters, log, int8=int8)
        elif int8:
            raise ExportError("--int8-graph builds from a GGUF's own weights; the builder path has no such graph")
        elif len(adapters) > 1:
            raise ExportError("several adapters stay unmerged only over a GGUF base; the builder merges one")
        else:
            write = _builder_writer(source, next(iter(adapters.values()), None), precision or "int4", ep, log,
                                    keep_log=out.with_name(out.name + ".builder.log"))
        return build(out, write, check=check, log=log, questions=check_questions,
                     precision=precision or "gguf (exact)")
    except ModelError as exc:
        raise ExportError(str(exc)) from None


def adapter_names(lora) -> dict[str, Path]:
    """{name: folder} from what a user passes: a folder (named after it, or after its parent
    when it is called `adapter`, as `attar distill train` writes it), a list, or NAME=folder."""
    if lora is None:
        return {}
    if isinstance(lora, dict):
        return {str(k): Path(v) for k, v in lora.items()}
    out: dict[str, Path] = {}
    for item in [lora] if isinstance(lora, (str, os.PathLike)) else lora:
        name, sep, folder = str(item).partition("=")
        path = Path(folder if sep else item)
        if not sep:
            name = path.resolve().parent.name if path.name == "adapter" else path.name
        if not path.is_dir():
            raise ExportError(f"LoRA adapter folder not found: {path}")
        check_adapter_name(name)
        if name in out:
            raise ExportError(f"two adapters are named {name!r}; name them: --lora NAME=FOLDER")
        out[name] = path
    return out


def _builder_writer(source: Path, lora: Path | None, precision: str, ep: str, log: Callable[[str], None],
                    keep_log: Path) -> Writer:
    """Any source through transformers and onnxruntime-genai's builder (re-quantizes a GGUF)."""

    def write(onnx_dir: Path):
        log(f"[1/3] loading {source}" + (f" + LoRA {lora}" if lora else ""))
        model, tokenizer = load_source(source, lora)
        hf_dir = onnx_dir.parent / "hf"
        model.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        log(f"[2/3] building the {precision} ONNX model for {ep} with onnxruntime-genai's builder")
        build_onnx(hf_dir, onnx_dir, precision, ep, keep_log)
        return lambda: TorchScorer(model)

    return write


class TorchScorer:
    """A transformers model (an HF-folder source of the builder path)."""

    name = "source (transformers, float32)"

    def __init__(self, model):
        self.model = model

    def logits(self, sequences, progress=lambda i, n: None, positions=None):
        import torch

        out = []
        for n, ids in enumerate(sequences):
            progress(n, len(sequences))
            with torch.no_grad():
                logits = self.model(torch.tensor([ids])).logits[0].float().numpy()
            out.append(logits if positions is None else logits[positions[n]])
        return out


