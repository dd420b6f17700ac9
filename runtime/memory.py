"""The agent's memory: a plain list of steps that becomes chat messages, JSON, a terminal trace
or a self-contained HTML page."""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from attar.runtime import prompts


class Finish(str, Enum):
    """How an agent's task ended (a str, so JSON and old records read the same)."""

    FINAL_ANSWER = "final_answer"  # the agent called final_answer
    MAX_STEPS = "max_steps"  # out of steps: the answer is a fallback from memory, not the agent's
    REPEATED = "repeated"  # a step wrote and saw what an earlier one did (Agent(stop_on_repeat=True)): a fallback too
    INTERRUPTED = "interrupted"

    @property
    def is_fallback(self) -> bool:
        """The answer is the model's guess from memory, not a final_answer call."""
        return self in (Finish.MAX_STEPS, Finish.REPEATED)

    def __str__(self) -> str:
        return self.value


@dataclass
class Candidate:
    """One sampled action of a self-consistent step (SAG)."""

    model_output: str
    code: str | None = None
    observation: str | None = None
    error: str | None = None
    vote_key: str | None = None
    votes: int = 0


@dataclass
class Step:
    number: int
    model_output: str = ""
    code: str | None = None
    stdout: str = ""
    output: str | None = None
    error: str | None = None  # parse or execution error, shown to the model as the observation
    final_answer: Any = None
    is_final: bool = False
    is_fallback: bool = False  # the answer-from-memory call after max_steps, not an agent step
    generation_seconds: float = 0.0
    sandbox_seconds: float = 0.0  # includes tool_seconds
    tool_seconds: float = 0.0
    first_token_seconds: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    candidates: list[Candidate] = field(default_factory=list)
    stopped_by: str | None = None  # the stop string, "repetition" or None (EOS or token cap)

    @property
    def observation(self) -> str:
        if self.error is not None:
            return prompts.ERROR.format(error=self.error)
        return prompts.OBSERVATION.format(logs=self.stdout, output=self.output)


@dataclass
class Task:
    question: str
    steps: list[Step] = field(default_factory=list)
    answer: Any = None
    finished_by: Finish | None = None  # None while it runs
    elided: int = 0  # earlier tasks and observations left out of the prompt to fit the context


@dataclass
class Memory:
    system_prompt: str
    tasks: list[Task] = field(default_factory=list)

    def messages(self, elide: int = 0) -> list[dict] | None:
        """The conversation so far, in the format students are trained on. `elide` leaves out the
        oldest parts to fit a model's context: first whole earlier tasks, then the current task's
        oldest observations (each replaced by a line saying so). None when there is nothing
        more to leave out."""
        earlier, current = self.tasks[:-1], (self.tasks[-1] if self.tasks else None)
        drop_tasks = min(elide, len(earlier))
        elide -= drop_tasks
        if current is not None and elide > sum(1 for step in current.steps if not step.is_final):
            return None
        out = [{"role": "system", "content": self.system_prompt}]
        for task in earlier[drop_tasks:] + ([current] if current else []):
            out.append({"role": "user", "content": prompts.TASK.format(question=task.question)})
            for step in task.steps:
                out.append({"role": "assistant", "content": step.model_output})
                if not step.is_final:
                    left_out = task is current and elide > 0
                    elide -= left_out
                    out.append({"role": "user", "content": prompts.ELIDED if left_out else step.observation})
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=repr)


def step_header(number: int, fallback: bool) -> str:
    """Printed when a step starts, before its text streams."""
    return "━━ Out of steps: asking for an answer from memory ━━" if fallback else f"━━ Step {number} ━━"


def render_step(step: Step) -> str:
    """A readable terminal block for one finished step (its header was printed when it began)."""
    lines = [f"   ({step.generation_seconds:.1f}s model, {step.sandbox_seconds * 1000:.0f}ms sandbox"
             + (", stopped: the model was repeating itself" if step.stopped_by == "repetition" else "") + ")"]
    if step.candidates:
        lines.append(f"   {len(step.candidates)} candidates, winner with {max(c.votes for c in step.candidates)} votes")
    if step.code:
        lines += ["Code:", *("  " + line for line in step.code.splitlines())]
    if step.error:
        lines.append(f"Error: {step.error.strip().splitlines()[-1]}")
    else:
        if step.stdout:
            lines += ["Logs:", *("  " + line for line in step.stdout.rstrip().splitlines())]
        if step.output is not None:
            lines.append(f"Out: {step.output}")
    return "\n".join(lines)


_CSS = """body{font:14px/1.45 system-ui,sans-serif;max-width:60em;margin:2em auto;color:#222}
h1{font-size:1.3em} .step{border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:.6em 1em}
.meta{color:#777;font-size:.85em} pre{background:#f6f6f6;padding:.5em;overflow-x:auto;white-space:pre-wrap}
.err pre{background:#fdecec} .final{background:#eaf7ea} details{margin:.3em 0}"""


def to_html(memory: Memory) -> str:
    """One self-contained page (no scripts, no external files) of every task and step."""

    def pre(text: Any) -> str:
        return f"<pre>{html.escape(str(text))}</pre>"

    parts = [f"<!doctype html><meta charset=utf-8><title>attar run</title><style>{_CSS}</style>"]
    parts.append(f"<details><summary>System prompt</summary>{pre(memory.system_prompt)}</details>")
    for task in memory.tasks:
        parts.append(f"<h1>{html.escape(task.question)}</h1>")
        for step in task.steps:
            cls = "step err" if step.error else ("step final" if step.is_final else "step")
            title = "Fallback answer from memory" if step.is_fallback else f"Step {step.number}"
            parts.append(f"<div class='{cls}'><b>{title}</b> <span class=meta>"
                         f"{step.generation_seconds:.2f}s model · {step.sandbox_seconds * 1000:.1f}ms sandbox · "
                         f"{step.prompt_tokens}+{step.completion_tokens} tokens</span>")
            parts.append(pre(step.model_output))
            if step.error:
                parts.append("<b>Error</b>" + pre(step.error))
            elif not step.is_final:
                parts.append("<b>Observation</b>" + pre(step.observation))
            for i, c in enumerate(step.candidates):
                outcome = c.error or c.observation or ""
                parts.append(f"<details><summary>candidate {i + 1}: {c.votes} votes</summary>"
                             f"{pre(c.model_output)}<b>Outcome</b>{pre(outcome)}</details>")
            if step.is_final:
                parts.append(f"<b>Final answer:</b> {html.escape(str(step.final_answer))}")
            parts.append("</div>")
        parts.append(f"<p><b>Answer:</b> {html.escape(str(task.answer))} <span class=meta>({task.finished_by})</span></p>")
    return "\n".join(parts)
