"""attar runtime: the agent loop, the WebAssembly sandbox and on-device retrieval (no torch)."""

from attar.runtime.agent import Agent, RunResult, parse_code
from attar.runtime.llm import OnnxBackend, OpenAIBackend, Sampling, ScriptedBackend
from attar.runtime.memory import Memory, Step
from attar.runtime.retrieval import Index, build_index
from attar.runtime.sandbox import Limits, Sandbox

__all__ = ["Agent", "Index", "Limits", "Memory", "OnnxBackend", "OpenAIBackend", "RunResult", "Sampling", "Sandbox",
           "ScriptedBackend", "Step", "build_index", "parse_code"]
