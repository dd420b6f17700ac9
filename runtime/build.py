"""Writing a model folder: into a sibling work folder (`fetch.work_folder`), checked against its
source, then renamed into place, so OUT exists only when complete."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from attar.runtime.fetch import sha256_file, to_stderr, work_folder
from attar.runtime.gguf_import import import_gguf
from attar.runtime.modeldir import ModelError
from attar.runtime.parity import Scorer, format_report, parity_report
from attar.runtime.reference import GGUFScorer

Log = Callable[[str], None]
# write(onnx_dir) writes the model into onnx_dir and returns how to make its source's scorer.
Writer = Callable[[Path], Callable[[], Scorer]]


def build(out: Path, write: Writer, *, check: bool = True, log: Log = to_stderr, questions: int | None = None,
          precision: str = "gguf (exact)") -> dict | None:
    """Write a model folder at `out` with `write`, run the parity check against its source
    (report kept in OUT/parity.json), and rename it into place. Returns the report."""
    if out.exists():
        raise ModelError(f"output folder already exists: {out}")
    began = time.perf_counter()
    work = work_folder(out)
    try:
        onnx_dir = work / "onnx"
        onnx_dir.mkdir()
        reference = write(onnx_dir)
        report = None
        if check:
            log("[3/3] parity check: the export against its source")
            report = parity_report(reference(), onnx_dir, log, questions=questions)
            report["precision"] = precision
            report["export_seconds"] = round(time.perf_counter() - began, 1)
            (onnx_dir / "parity.json").write_text(json.dumps(report, indent=2))
            log(format_report(report))
        else:
            log("[3/3] parity check skipped (--no-check)")
        write_manifest(onnx_dir)
        os.replace(onnx_dir, out)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def gguf_writer(source: Path, adapters: dict[str, Path] | None = None, log: Log = to_stderr,
                int8: bool = False) -> Writer:
    """A GGUF imported exactly (its own quantized weights, no torch); its reference is the GGUF
    itself in numpy, with the default adapter merged."""

    def write(onnx_dir: Path) -> Callable[[], Scorer]:
        log(f"[1/3] reading {source}" + (f" + {len(adapters)} LoRA adapter(s), kept unmerged" if adapters else ""))
        log("[2/3] writing its quantized weights into an ONNX graph")
        import_gguf(source, onnx_dir, log=log, adapters=adapters, int8=int8)
        return lambda: GGUFScorer(source, next(iter((adapters or {}).values()), None))

    return write


MANIFEST = "files.json"


def write_manifest(folder: Path) -> None:
    """Every file of a finished folder with its size, SHA-256 and modification time."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        files[path.relative_to(folder).as_posix()] = {"bytes": stat.st_size, "sha256": sha256_file(path),
                                                      "mtime_ns": stat.st_mtime_ns}
    (folder / MANIFEST).write_text(json.dumps(files, indent=1))


def rewrite(folder: Path, name: str, text: str) -> None:
    """Replace one file of a finished folder (atomically) and its entry in the manifest."""
    path = folder / name
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(text)
    os.replace(temporary, path)
    files = json.loads((folder / MANIFEST).read_text())
    stat = path.stat()
    files[name] = {"bytes": stat.st_size, "sha256": sha256_file(path), "mtime_ns": stat.st_mtime_ns}
    temporary = folder / (MANIFEST + ".partial")
    temporary.write_text(json.dumps(files, indent=1))
    os.replace(temporary, folder / MANIFEST)


def check_manifest(folder: Path) -> str | None:
    """What differs from the folder's manifest (None: nothing). A file whose size and mtime are
    as recorded is taken as is; any other is hashed."""
    try:
        files = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"{MANIFEST} is missing or unreadable"
    for name, want in files.items():
        path = folder / name
        if not path.is_file() or path.is_symlink():
            return f"{name} is missing"
        stat = path.stat()
        if stat.st_size != want["bytes"]:
            return f"{name} has {stat.st_size} bytes, not {want['bytes']}"
        if stat.st_mtime_ns != want["mtime_ns"] and sha256_file(path) != want["sha256"]:
            return f"{name} was changed"
    return None

