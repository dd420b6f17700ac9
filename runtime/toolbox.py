"""The packages the sandbox's Python can import beyond the standard library, in one place: the
sandbox mounts them, the guest driver warms them, and the prompts name them from here.

The paper's agents import sympy and numpy. sympy (with mpmath, its one dependency) is pure
Python, so it runs in the WebAssembly interpreter as it is: attar copies the installed packages,
checks them against a pinned hash of the release, compiles them for the guest's CPython 3.12
once per machine, and mounts the folder read-only at /lib. The guest can read it and nothing
else; it cannot add or change a package. numpy has no WASI build the sandbox's wasmtime runs
(see the README), so importing it says what to use instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

from attar.runtime.fetch import cache_dir

# name -> (version, SHA-256 of its files as `_tree_digest` computes it, test folders left out).
PACKAGES = {
    "sympy": ("1.14.0", "efd4d674047202fed13b50d558964114a5e5dd810e5416d485f4fbe7627d22da"),
    "mpmath": ("1.3.0", "8d04a836f962fec5513b9bdaa9e0ad783b1a8eb671899418e3f9496e7b0181b1"),
}
# What the guest cannot import, and what it is told instead.
UNAVAILABLE = {name: f"{name} is not available in this sandbox; use sympy or plain Python"
               for name in ("numpy", "scipy", "pandas", "torch", "sklearn")}
# Imported by every pooled interpreter while it waits, so a session's first use costs nothing.
WARM_UP = """\
import sympy
_x = sympy.Symbol("x")
sympy.solve(_x**2 - 2, _x); sympy.simplify(sympy.sin(_x)**2 + sympy.cos(_x)**2)
sympy.factorint(360); sympy.Rational(1, 3) + sympy.sqrt(8); sympy.nsimplify(0.5)
sympy.integrate(_x**2, (_x, 0, 1)); sympy.expand((_x + 1)**3); sympy.latex(sympy.sqrt(2) / 2)
del _x
"""
# The sentence the student and teacher prompts carry.
PROMPT = ("Besides the Python standard library (math, fractions, itertools, ...), you can import sympy "
          "(and mpmath); numpy is not available.")

GUEST_PATH = "/lib"
# sympy asks ctypes only for the size of a C long; the interpreter has no ctypes at all.
_CTYPES_STAND_IN = '''"""A stand-in: the sandbox has no ctypes. sympy only asks for the size of a C long."""
class c_long:
    pass
def sizeof(ctype):
    if ctype is c_long:
        return 4  # wasm32
    raise TypeError("ctypes is not available in this sandbox")
def __getattr__(name):
    raise AttributeError(f"ctypes is not available in this sandbox (no {name})")
'''


class ToolboxError(Exception):
    """The packages could not be prepared (the sandbox then refuses to start: the prompts promise them)."""


def _files(root: Path):
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if "tests" in rel.parts or "__pycache__" in rel.parts or path.is_symlink() or not path.is_file():
            continue
        yield rel, path


def _tree_digest(root: Path) -> str:
    """SHA-256 over every file's relative path and content hash: what the pins above are."""
    digest = hashlib.sha256()
    for rel, path in _files(root):
        digest.update(rel.as_posix().encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _fingerprint(folder: Path) -> str:
    """Names, sizes, modes and modification times of the prepared folder: cheap enough (~20 ms for
    sympy's 2,000 files, by scandir) to check at every process's first sandbox."""
    digest, stack, root = hashlib.sha256(), [str(folder)], len(str(folder))
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                st = entry.stat(follow_symlinks=False)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                digest.update(f"{entry.path[root:]}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_mode}\n".encode())
    return digest.hexdigest()


def _source(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ToolboxError(f"{name} is not installed (pip install attar installs {name}=={PACKAGES[name][0]})")
    return Path(next(iter(spec.submodule_search_locations)))


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


_lock = threading.Lock()
_ready: Path | None = None


def library(compile_pyc) -> Path:
    """The prepared folder to mount at /lib, made once per machine and checked once per process.

    `compile_pyc(folder)` compiles the folder's sources for the guest (the sandbox does it with
    the guest's own interpreter: the host's Python may be another version)."""
    global _ready
    with _lock:
        if _ready is not None:
            return _ready
        key = hashlib.sha256(json.dumps(PACKAGES, sort_keys=True).encode()).hexdigest()[:16]
        target = cache_dir() / "sandbox" / f"lib-{key}"
        stamp = target.with_name(target.name + ".fingerprint")  # beside it: the guest sees only packages
        if not (stamp.is_file() and stamp.read_text() == _fingerprint(target)):
            shutil.rmtree(target, ignore_errors=True)  # changed or half-made: made again
            target.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(dir=target.parent, prefix=".lib-"))
            try:
                for name, (version, pinned) in PACKAGES.items():
                    source = _source(name)
                    for rel, path in _files(source):
                        (work / name / rel).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(path, work / name / rel)
                    if _tree_digest(work / name) != pinned:
                        raise ToolboxError(f"{source} is not {name} {version} as released (its files differ "
                                           f"from the pinned hash); reinstall it: pip install {name}=={version}")
                (work / "ctypes").mkdir()
                (work / "ctypes" / "__init__.py").write_text(_CTYPES_STAND_IN)
                compile_pyc(work)
                try:
                    os.replace(work, target)
                except OSError:  # another process made it meanwhile
                    if not (stamp.is_file() and stamp.read_text() == _fingerprint(target)):
                        raise
                else:
                    _write_atomic(stamp, _fingerprint(target))
            finally:
                shutil.rmtree(work, ignore_errors=True)
        _ready = target
        return target
