"""attar runtime: the agent loop, the WebAssembly sandbox and on-device retrieval (no torch).

Names are imported on first use, so `from attar.runtime.sandbox import Sandbox` does not pay
for onnxruntime and the agent."""

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "Agent": "agent", "RunResult": "agent", "parse_code": "agent",
    "EngineBackend": "llm", "OnnxBackend": "llm", "OpenAIBackend": "llm", "Sampling": "llm", "ScriptedBackend": "llm",
    "Memory": "memory", "Step": "memory",
    "Index": "retrieval", "build_index": "retrieval",
    "Limits": "executor", "Sandbox": "sandbox",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from attar.runtime.agent import Agent, RunResult, parse_code
    from attar.runtime.llm import EngineBackend, OnnxBackend, OpenAIBackend, Sampling, ScriptedBackend
    from attar.runtime.memory import Memory, Step
    from attar.runtime.retrieval import Index, build_index
    from attar.runtime.executor import Limits
    from attar.runtime.sandbox import Sandbox


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'attar.runtime' has no attribute {name!r}")
    return getattr(import_module(f"attar.runtime.{_EXPORTS[name]}"), name)
