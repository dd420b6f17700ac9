"""attar's attention kernel (`attention.cc`): build it once, find it, and put it into a graph.

onnxruntime's CPU GroupQueryAttention reads each KV head's cache once per query head; the
kernel reads it once per KV head (the 1.5B has 6 query heads a KV head), which is what made a
step of many rows cost so much more than a step of one (README, "The attention kernel"). It is an
onnxruntime custom op with GroupQueryAttention's inputs and outputs in the `attar` domain, so
putting it in a graph is renaming the domain of its attention nodes, in memory.

It is native code, so it is built on the machine that runs it (`attar kernel build`, once; with
`-march=native`, for the CPU at hand) against onnxruntime's C API headers. No PyPI package ships
those headers; Debian's `libonnxruntime-dev` does, and the build fetches that package from Debian,
checks it against a pinned SHA-256 and takes only its headers (or uses `--include DIR`). The
custom-op API is stable across releases: headers of 1.21 serve onnxruntime 1.21 and later. Without
the built library everything runs as before, on onnxruntime's own kernel.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import urllib.request
from pathlib import Path
from typing import Callable

from attar.runtime.fetch import cache_dir, work_folder
from attar.runtime.modeldir import edited_session

SOURCE = Path(__file__).with_name("attention.cc")
DOMAIN = "attar"
HEADERS_DEB = ("http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
               "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")
HEADERS = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_cxx_inline.h", "onnxruntime_float16.h")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-std=gnu++17", "-shared", "-fPIC"]
MAX_DEB = 16 << 20  # the package is 85 KB; a larger answer is not it


class KernelError(RuntimeError):
    """The attention kernel could not be built or used."""


def library() -> Path | None:
    """The built kernel for this source and compiler, or None when it has not been built."""
    path = _target()
    return path if path is not None and path.is_file() else None


def build(include: Path | None = None, log=print) -> Path:
    """Compile the kernel into the user cache (once; atomically) and return its path. `include`:
    a folder holding onnxruntime's C API headers; by default they are fetched from Debian."""
    target, compiler = _target(), _compiler()
    if target is None:
        raise KernelError("no C++ compiler: install g++ (or set CXX) to build the attention kernel")
    if target.is_file():
        return target
    work = work_folder(target)
    try:
        if include is None:
            include = work / "include"
            _fetch_headers(include, log)
        elif not (include / HEADERS[0]).is_file():
            raise KernelError(f"{include} has no {HEADERS[0]}")
        log(f"  compiling {SOURCE.name} ({compiler} {' '.join(FLAGS)})")
        out = work / target.name
        proc = subprocess.run([compiler, *FLAGS, "-I", str(include), str(SOURCE), "-o", str(out)],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise KernelError(f"compiling {SOURCE.name} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(out, target)
        for old in target.parent.glob("attention-*.so"):  # builds of an earlier source or compiler
            if old != target:
                old.unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def register(options, kernel: bool | None = None) -> bool:
    """Register the built kernel with onnxruntime session `options`; whether graphs loaded with them
    should run on it (`use_kernel`). `kernel`: None, when it is built (and ATTAR_KERNEL is not 0);
    True, it must be; False, never."""
    if kernel is None and os.environ.get("ATTAR_KERNEL") == "0":  # the user's way back to onnxruntime's attention
        kernel = False
    path = library() if kernel is not False else None
    if kernel and path is None:
        raise KernelError("the attention kernel is not built: run `attar kernel build`")
    if path is not None:
        options.register_custom_ops_library(str(path))
    return path is not None


def session(graph: Path, options, kernel: bool | None, edit: Callable[[object], bool]):
    """An onnxruntime session of `graph` as `edit` changes it (`modeldir.edited_session`), its
    attention on the kernel where `register` says so; and whether it runs there."""
    registered = register(options, kernel)
    on_kernel = False

    def both(model) -> bool:
        nonlocal on_kernel
        edited = edit(model)
        on_kernel = registered and use_kernel(model)
        return edited or on_kernel

    made = edited_session(graph, both, options)
    if kernel and not on_kernel:
        raise KernelError(f"{graph} has attention the kernel does not compute")
    return made, on_kernel


def use_kernel(model) -> bool:
    """Edit an onnx.ModelProto so that its GroupQueryAttention nodes run on attar's kernel; False
    when it has none, or one whose attributes the kernel does not compute."""
    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
    supported = {"num_heads", "kv_num_heads", "scale", "do_rotary", "rotary_interleaved", "local_window_size"}
    if not nodes:
        return False
    for node in nodes:
        if any(a.name not in supported or (a.name == "local_window_size" and a.i != -1) for a in node.attribute):
            return False
        if len(node.input) > 9:  # position ids, attention bias, quantized-cache scales
            return False
    for node in nodes:
        node.domain = DOMAIN
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.add(domain=DOMAIN, version=1)
    return True


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _target() -> Path | None:
    """Where the library for this source, these flags and this compiler lives (one per CPU's cache
    folder: -march=native builds for the machine that builds it)."""
    compiler = _compiler()
    key = _key(compiler) if compiler else None
    return cache_dir() / "kernels" / f"attention-{key}.so" if key else None


@functools.cache
def _key(compiler: str) -> str | None:
    """The build's name: a hash of the source, the flags and the compiler's version, asked once a
    process (every engine and scorer looks for the library)."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]


def _fetch_headers(into: Path, log) -> None:
    """onnxruntime's C API headers out of Debian's libonnxruntime-dev, checked against its SHA-256.
    Only the named headers are taken, as plain files, whatever else the archive holds."""
    url, digest = HEADERS_DEB
    log(f"  fetching onnxruntime's C API headers ({url.rsplit('/', 1)[-1]})")
    try:
        with urllib.request.urlopen(url, timeout=60) as answer:
            deb = answer.read(MAX_DEB + 1)
    except OSError as exc:
        raise KernelError(f"cannot fetch {url}: {exc}; pass --include DIR with onnxruntime's headers") from None
    if len(deb) > MAX_DEB or hashlib.sha256(deb).hexdigest() != digest:
        raise KernelError(f"{url} is not the package attar pins (SHA-256 mismatch)")
    data = _ar_member(deb, "data.tar")
    into.mkdir(parents=True, exist_ok=True)
    wanted = {f"./usr/include/onnxruntime/{name}": name for name in HEADERS}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            if member.name in wanted and member.isfile():
                (into / wanted.pop(member.name)).write_bytes(tar.extractfile(member).read())
    if wanted:
        raise KernelError(f"the package lacks {', '.join(sorted(wanted))}")


def _ar_member(archive: bytes, prefix: str) -> bytes:
    """The first member of a Debian package (an `ar` archive) whose name starts with `prefix`."""
    if not archive.startswith(b"!<arch>\n"):
        raise KernelError("not a Debian package")
    at = 8
    while at + 60 <= len(archive):
        name, size = archive[at:at + 16].decode().strip().rstrip("/"), int(archive[at + 48:at + 58].decode().strip())
        if name.startswith(prefix):
            return archive[at + 60:at + 60 + size]
        at += 60 + size + (size & 1)
    raise KernelError(f"the package has no {prefix}")
