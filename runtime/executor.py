"""What the agent needs from a code executor, whichever runs the code: run a cell in a
persistent session, fork the session (SAG's candidates each run in their own), close it.
`runtime/sandbox.py` is the implementation: CPython in WebAssembly under wasmtime."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock per cell
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
    restarted: bool = False  # the interpreter was lost; the session was restored or reset
    reset: bool = False  # ... and could not be restored: earlier variables are gone
    seconds: float = 0.0
    tools_called: tuple[str, ...] = ()  # the host tools the cell called, in order

    @property
    def ok(self) -> bool:
        return self.error is None


class Executor(Protocol):
    """A persistent Python session in which guest code may call the host tools by name."""

    def run(self, code: str) -> CellResult:
        """Run one cell; errors in the code come back in the result, never as an exception."""
        ...

    def fork(self) -> "Executor":
        """An independent copy of the session: same variables, no shared side effects."""
        ...

    def close(self) -> None: ...


# How the agent gets a session: tools, limits, and how many forks a step will take (so an
# implementation can have them ready).
ExecutorFactory = Callable[[dict[str, Callable[..., Any]], Limits, int], Executor]
