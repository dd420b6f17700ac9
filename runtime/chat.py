"""`attar chat`: one question, or an interactive session, on the terminal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from attar.runtime.llm import Sampling
from attar.runtime.memory import Finish, render_step, step_header, to_html
from attar.runtime.sag import SAMPLING as SAG_SAMPLING
from attar.runtime.modeldir import ModelError


def _build_agent(model, index, max_steps, sag, sampling, provider, stream_tokens: bool, quiet: bool,
                 adapter: str | None = None):
    from attar.runtime.agent import Agent
    from attar.runtime.retrieval import IndexError_

    def on_text(piece: str) -> None:
        click.secho(piece, nl=False, dim=True, err=True)

    def on_step_start(number: int, fallback: bool) -> None:
        click.echo("", err=True)
        click.secho(step_header(number, fallback), bold=True, err=True)

    try:
        return Agent(model, index=index, max_steps=max_steps, sag=sag, sampling=sampling, provider=provider, adapter=adapter,
                     on_text=on_text if stream_tokens else None, on_step_start=None if quiet else on_step_start)
    except (ModelError, IndexError_) as exc:
        raise click.ClickException(str(exc)) from None


def _ask(agent, question: str, reset: bool, as_json: bool) -> None:
    from attar.runtime.llm import BackendError

    try:
        for step in agent.stream(question, reset=reset):
            if not as_json:
                click.echo("", err=True)
                click.echo(render_step(step), err=True)
    except BackendError as exc:
        raise click.ClickException(str(exc)) from None
    task = agent.memory.tasks[-1]
    if task.elided:
        click.secho(f"({task.elided} earlier task(s) or observation(s) were left out: the conversation no longer "
                    "fits the model's context)", fg="yellow", err=True)
    if as_json:
        return
    if task.finished_by == Finish.MAX_STEPS:
        click.secho(f"\nNo final_answer within {agent.max_steps} steps; the model's fallback answer, from its memory:",
                    fg="yellow", err=True)
    click.secho(f"\n{_printable(task.answer)}", bold=True)


def _printable(value) -> str:
    """Guest output can hold lone surrogates, which a UTF-8 terminal cannot print."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def run_chat(question, *, model, index, max_steps, sag, temperature, top_p, seed, provider, as_json, trace,
             adapter=None, server=None, local=False) -> None:
    default = SAG_SAMPLING if sag > 1 else Sampling()
    sampling = Sampling(temperature=default.temperature if temperature is None else temperature,
                        top_p=default.top_p if top_p is None else top_p, seed=seed)
    if question is not None and not question.strip():
        raise click.UsageError("the question is empty")
    url = _server_for(question, model, adapter, index, provider, trace, server, local)
    if url:
        return _ask_server(url, question, max_steps, sag, sampling, as_json)
    agent = _build_agent(model, index, max_steps, sag, sampling, provider, stream_tokens=not as_json and sag == 1,
                         quiet=as_json, adapter=adapter)
    try:
        if question is not None:
            _ask(agent, question, reset=True, as_json=as_json)
        else:
            _interactive(agent)
        if as_json:
            task = agent.memory.tasks[-1]
            click.echo(json.dumps({"answer": task.answer, "finished_by": task.finished_by,
                                   "fallback": task.finished_by.is_fallback, "memory": agent.memory.to_dict()},
                                  default=repr))
        if trace:
            Path(trace).write_text(to_html(agent.memory))
            click.echo(f"trace written to {trace}", err=True)
    finally:
        agent.close()


def _server_for(question, model, adapter, index, provider, trace, server, local) -> str | None:
    """The `attar serve` to ask: the one named, or the local one when it runs this very model and
    index (then the answer comes without loading anything here); None to run in this process."""
    import os

    from attar.runtime.models import DEFAULT_MODEL
    from attar.runtime.serve import DEFAULT_PORT, find_server, index_key

    if local:
        return None
    if server is not None:
        if question is None or trace:
            raise click.UsageError("--server answers one question at a time, without --trace")
        if find_server(server, os.environ.get("ATTAR_API_KEY"), timeout=5.0) is None:
            raise click.ClickException(f"no attar server answers at {server}")
        return server
    if question is None or trace or provider != "cpu":
        return None
    url = f"http://127.0.0.1:{DEFAULT_PORT}"
    info = find_server(url, os.environ.get("ATTAR_API_KEY"), timeout=0.3)
    if info is None:
        return None
    served, _, served_adapter = info["model"].partition("+")
    wanted = DEFAULT_MODEL if model in (None, "default") else Path(str(model)).name
    same_adapter = adapter is None or (adapter == "base" and not served_adapter) or adapter == served_adapter
    return url if served == wanted and same_adapter and info.get("index") == index_key(index) else None


def _ask_server(url: str, question: str, max_steps: int, sag: int, sampling: Sampling, as_json: bool) -> None:
    """One question through a running server's /v1/agent, shown as a local run shows it."""
    import os

    from attar.runtime.memory import Candidate, Step
    from attar.runtime.serve import stream_agent

    body = {"question": question, "max_steps": max_steps, "sag": sag, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "seed": sampling.seed}
    steps, done = [], None
    try:
        for kind, data in stream_agent(url, body, os.environ.get("ATTAR_API_KEY")):
            if kind == "step_start" and not as_json:
                click.echo("", err=True)
                click.secho(step_header(data["number"], data["fallback"]), bold=True, err=True)
            elif kind == "text" and not as_json and sag == 1:
                click.secho(data["text"], nl=False, dim=True, err=True)
            elif kind == "step":
                fields = {k: v for k, v in data.items() if k in Step.__dataclass_fields__}
                step = Step(**fields | {"candidates": [Candidate(**c) for c in data.get("candidates", [])]})
                steps.append(data)
                if not as_json:
                    click.echo("", err=True)
                    click.echo(render_step(step), err=True)
            elif kind == "error":
                raise click.ClickException(f"the server failed: {data.get('message')}")
            elif kind == "done":
                done = data
    except ConnectionError as exc:
        raise click.ClickException(str(exc)) from None
    if done is None:
        raise click.ClickException(f"{url} ended the answer early")
    if as_json:
        click.echo(json.dumps({"answer": done["answer"], "finished_by": done["finished_by"],
                               "fallback": done["fallback"], "server": url, "steps": steps}, default=repr))
        return
    if done["fallback"]:
        click.secho(f"\nNo final_answer within {max_steps} steps; the model's fallback answer, from its memory:",
                    fg="yellow", err=True)
    click.secho(f"\n{_printable(done['answer'])}", bold=True)


def _interactive(agent) -> None:
    click.echo("attar chat: ask a question; Ctrl-C stops the current step, Ctrl-D quits.", err=True)
    first = True
    while True:
        try:
            question = input("\n> ")
        except EOFError:
            click.echo("", err=True)
            return
        except KeyboardInterrupt:
            click.echo("\n(Ctrl-D quits)", err=True)
            continue
        if not question.strip():
            continue
        try:
            _ask(agent, question, reset=first, as_json=False)
            first = False
        except KeyboardInterrupt:
            click.echo("\n[stopped]", err=True)
            first = False
        sys.stdout.flush()
