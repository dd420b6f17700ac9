"""The CodeAct agent loop: think, write Python, run it in the sandbox, read the observation,
repeat until `final_answer` or `max_steps` (or, with `stop_on_repeat`, until a step repeats an earlier one).

    from attar.runtime import Agent
    agent = Agent(tools=[my_tool])
    result = agent.run("What is 17 * 23?")
    result.answer, result.steps
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from attar.runtime import prompts
from attar.runtime.answers import extract_boxed
from attar.runtime.executor import CellResult, Executor, ExecutorFactory, Limits
from attar.runtime.llm import Backend, Generation, PromptTooLong, Sampling
from attar.runtime.memory import Finish, Memory, Step, Task
from attar.runtime.models import load_backend
from attar.runtime.retrieval import Index, web_search_tool
from attar.runtime.sag import SAMPLING as SAG_SAMPLING
from attar.runtime.sag import run_candidates
from attar.runtime.sandbox import Sandbox
from attar.runtime.tools import Tool, describe, validate

_CODE = re.compile(r"```(?:py|python)?[ \t]*\n(.*?)(?:\n```|$)", re.DOTALL)


def parse_code(text: str) -> str | None:
    """The first ```py block of a model output. An unclosed block at the end counts: generation
    stops at `<end_code>`, and small models often drop the closing fence before it."""
    match = _CODE.search(text)
    if match is None:
        return None
    code = match.group(1).replace("<end_code>", "").strip("\n")
    return code if code.strip() else None


def parse_action(text: str) -> str | None:
    """The code a step runs: its first code block or, where it has none but states its answer
    as \\boxed{...} (what instruct models write when they think they are done), the
    final_answer call that answer means."""
    code = parse_code(text)
    if code is None and (boxed := extract_boxed(text)) is not None and boxed.strip():
        code = f"final_answer({boxed.strip()!r})"
    return code


def canonical_output(text: str, code: str) -> str:
    """A step as the student format writes it: the thought, then `Code:` and a ```py block that
    ends with <end_code>. Teachers also write ```python, run on past the block into a made-up
    ```output, or state a boxed answer in prose; the stored trajectory keeps the one format."""
    fence = text.find("```")
    thought = re.sub(r"\s*Code:\s*$", "", (text if fence == -1 else text[:fence]).rstrip()).strip()
    if not thought.startswith("Thought:"):
        thought = f"Thought: {thought}"
    return f"{thought}\nCode:\n```py\n{code}\n```<end_code>"


@dataclass
class RunResult:
    answer: Any
    steps: list[Step]
    finished_by: Finish
    memory: Memory

    @property
    def is_fallback(self) -> bool:
        """True when the agent never called final_answer and the answer is a last-call guess."""
        return self.finished_by.is_fallback

    def to_dict(self) -> dict:
        return {"answer": self.answer, "finished_by": self.finished_by, "fallback": self.is_fallback,
                "memory": self.memory.to_dict()}


class Agent:
    """A small-model agent with a private sandbox. Agents share nothing with each other."""

    def __init__(
        self,
        model: Backend | str | Path | None = None,
        tools: list[Tool] = (),
        *,
        index: Any = None,
        max_steps: int = 5,
        sampling: Sampling | None = None,
        sag: int = 1,
        limits: Limits = Limits(),
        executor: ExecutorFactory = Sandbox.open,
        provider: str = "cpu",
        adapter: str | None = None,
        on_text: Callable[[str], None] | None = None,
        on_step_start: Callable[[int, bool], None] | None = None,
        system_prompt: str = prompts.SYSTEM,
        stop_on_repeat: bool = False,
    ):
        if max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        if sag < 1:
            raise ValueError("sag must be at least 1")
        if sampling is None:
            sampling = SAG_SAMPLING if sag > 1 else Sampling()
        # A backend the agent loads is its own, one stream: its greedy steps may speculate.
        self.backend = load_backend(model, provider=provider, adapter=adapter, speculate=True) \
            if model is None or isinstance(model, (str, Path)) else model
        tools = list(tools)
        if index is not None:
            tools.append(web_search_tool(Index.open(index) if isinstance(index, (str, Path)) else index))
        self.tools = {name: self._timed(tool) for name, tool in validate(tools).items()}
        self._tool_seconds = 0.0
        self.max_steps = max_steps
        # A step that wrote what an earlier one wrote and saw what it saw leaves the conversation
        # where it was: a greedy model goes round until max_steps. None of the 80 such runs in
        # the 1.5B teacher's math-medium data got out of it to a correct final_answer, and the
        # steps after their first repeat were 9% of its text, at its longest contexts, so the
        # teacher ends them; the paper's loop (the default) does not.
        self.stop_on_repeat = stop_on_repeat
        self.sampling = sampling
        self.sag = sag
        self.limits = limits
        self.executor = executor
        self.on_text = on_text
        self.on_step_start = on_step_start or (lambda number, fallback: None)  # before the step's text streams
        self.tool_descriptions = "\n".join(describe(t) for t in self.tools.values())
        system = prompts.system(self.tool_descriptions, system_prompt)
        self.memory = Memory(system)
        self.sandbox: Executor | None = None

    def run(self, question: str, reset: bool = True, prefix: str = "") -> RunResult:
        steps = list(self.stream(question, reset=reset, prefix=prefix))
        task = self.memory.tasks[-1]
        return RunResult(task.answer, steps, task.finished_by, self.memory)

    def stream(self, question: str, reset: bool = True, prefix: str = "") -> Iterator[Step]:
        """Yield each step as soon as it has run. `reset=False` continues the conversation,
        with the variables of earlier tasks still defined. `prefix` starts the first step's
        output (the first-thought prefix of distillation); the model continues it."""
        if not question or not question.strip():
            raise ValueError("the question is empty")
        if reset or self.sandbox is None:
            self.reset()
        task = Task(question.strip())
        self.memory.tasks.append(task)
        try:
            finish = Finish.MAX_STEPS
            for number in range(1, self.max_steps + 1):
                self.on_step_start(number, False)
                step = self._step(number, prefix if number == 1 else "")
                task.steps.append(step)
                yield step
                if step.is_final:
                    task.answer, task.finished_by = step.final_answer, Finish.FINAL_ANSWER
                    return
                if self.stop_on_repeat and _repeats(task.steps):
                    finish = Finish.REPEATED
                    break
            self.on_step_start(len(task.steps) + 1, True)
            step = self._final_step(len(task.steps) + 1)
            task.steps.append(step)
            task.answer, task.finished_by = step.final_answer, finish
            yield step
        except KeyboardInterrupt:
            task.finished_by = Finish.INTERRUPTED
            raise

    def _timed(self, tool: Tool) -> Tool:
        """Wrap a tool so each step can report how much of its sandbox time the tools took."""

        @functools.wraps(tool)
        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return tool(*args, **kwargs)
            finally:
                self._tool_seconds += time.perf_counter() - began

        return timed

    def reset(self) -> None:
        self.close()
        self.memory.tasks.clear()
        self.sandbox = self.executor(self.tools, self.limits, self.sag if self.sag > 1 else 0)

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()
            self.sandbox = None

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one step ------------------------------------------------------------------------

    def _step(self, number: int, prefix: str = "") -> Step:
        if self.sag > 1 and not prefix:
            return self._sag_step(number)
        kwargs = {"prefix": prefix} if prefix else {}
        gen = self._fitting(lambda messages: self.backend.generate(messages, stop=prompts.STOP, sampling=self.sampling,
                                                                   on_text=self.on_text, **kwargs))
        gen.text = prefix + gen.text
        step = _new_step(number, gen)
        if step.code is None:
            step.error = prompts.PARSE_ERROR
            return step
        began, self._tool_seconds = time.perf_counter(), 0.0
        _record(step, self.sandbox.run(step.code))
        step.sandbox_seconds, step.tool_seconds = time.perf_counter() - began, self._tool_seconds
        return step

    def _fitting(self, generate: Callable[[list[dict]], Any]) -> Any:
        """`generate(messages)`, leaving out the oldest earlier tasks, then the oldest observations,
        while the conversation is longer than the model's context (a chat tool's behaviour); the
        task's `elided` counts them. A question that does not fit even alone is refused."""
        task = self.memory.tasks[-1]
        while True:
            messages = self.memory.messages(task.elided)
            if messages is None:
                raise PromptTooLong(f"the question is too long for {self.backend.name}: with the system prompt it "
                                    "does not fit in the model's context; shorten it or use a model with a longer one")
            try:
                return generate(messages)
            except PromptTooLong:
                task.elided += 1

    def _sag_step(self, number: int) -> Step:
        """N candidates from one batched generation, each run in its own fork; the vote picks
        one (runtime/sag.py). The first candidate is greedy: SAG then keeps the answer N=1 would
        give unless the samples agree on another."""
        seed = self.sampling.seed
        samplings = [replace(self.sampling, temperature=0.0)] + [
            replace(self.sampling, seed=None if seed is None else (seed + number) * 1000 + i) for i in range(1, self.sag)]
        gens = self._fitting(lambda messages: self.backend.generate_batch(messages, samplings, stop=prompts.STOP))
        outcome = run_candidates(self.sandbox, gens, [parse_action(g.text) for g in gens])
        step = _new_step(number, gens[outcome.winner if outcome.winner is not None else 0])
        step.completion_tokens = sum(g.completion_tokens for g in gens)
        step.sandbox_seconds, step.candidates = outcome.seconds, outcome.candidates
        if outcome.winner is None:  # every candidate failed: the first one's error is the observation
            step.error = prompts.PARSE_ERROR if step.code is None else outcome.candidates[0].error
            return step
        self.sandbox.close()
        self.sandbox = outcome.sandbox
        _record(step, outcome.result)
        return step

    def _final_step(self, number: int) -> Step:
        """Out of steps: one last call asks for the answer from the memory."""
        ask = {"role": "user", "content": prompts.FINAL_USER.format(question=self.memory.tasks[-1].question)}
        gen = self._fitting(lambda messages: self.backend.generate([*messages, ask], sampling=Sampling(max_new_tokens=256),
                                                                   on_text=self.on_text))
        return Step(number, model_output=gen.text, final_answer=gen.text.strip(), is_final=True, is_fallback=True,
                    generation_seconds=gen.seconds, first_token_seconds=gen.first_token_seconds,
                    prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens)


def _repeats(steps: list[Step]) -> bool:
    """Whether the last step wrote what an earlier step wrote and saw what it saw."""
    last = steps[-1]
    return any(s.model_output == last.model_output and s.observation == last.observation for s in steps[:-1])


def _new_step(number: int, gen: Generation) -> Step:
    """A step from one generation; the stop string that ended it stays in the transcript."""
    return Step(number, model_output=prompts.as_written(gen.text, gen.stopped_by), code=parse_action(gen.text),
                generation_seconds=gen.seconds, first_token_seconds=gen.first_token_seconds, prompt_tokens=gen.prompt_tokens,
                completion_tokens=gen.completion_tokens, stopped_by=gen.stopped_by)


def _record(step: Step, result: CellResult) -> None:
    step.stdout, step.output, step.error = result.stdout, result.output, result.error
    step.is_final, step.final_answer = result.is_final, result.final_answer
