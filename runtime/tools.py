"""Tools are plain typed Python functions with docstrings. The agent shows the model their
signatures and docstrings, and the sandbox lets guest code call them by name."""

from __future__ import annotations

import inspect
from typing import Any, Callable

Tool = Callable[..., Any]


def final_answer(answer: Any) -> Any:
    """Give the final answer to the task and stop."""
    return answer


def describe(tool: Tool) -> str:
    """One tool as the model sees it: `name(arg: type) -> type` and its docstring."""
    signature = inspect.signature(tool)
    doc = inspect.getdoc(tool) or "No description."
    doc = "\n".join("    " + line for line in doc.splitlines())
    return f"- {tool.__name__}{_format_signature(signature)}\n{doc}"


def _format_signature(signature: inspect.Signature) -> str:
    def name(annotation: Any) -> str:
        if annotation is inspect.Parameter.empty:
            return "Any"
        return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))

    params = []
    for p in signature.parameters.values():
        text = f"{p.name}: {name(p.annotation)}"
        if p.default is not inspect.Parameter.empty:
            text += f" = {p.default!r}"
        params.append(text)
    return f"({', '.join(params)}) -> {name(signature.return_annotation)}"


def validate(tools: list[Tool]) -> dict[str, Tool]:
    """Name -> tool, with final_answer built in; a clear error for anything unusable."""
    by_name: dict[str, Tool] = {}
    for tool in [*tools, final_answer]:
        name = getattr(tool, "__name__", None)
        if not callable(tool) or not name or not name.isidentifier() or name == "<lambda>":
            raise ValueError(f"a tool must be a named function, got {tool!r}")
        by_name.setdefault(name, tool)
    return by_name
