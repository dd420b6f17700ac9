"""`attar distill ...`: teacher trajectories, SFT data, training, evaluation, comparison.
Heavy imports stay inside the commands."""

from __future__ import annotations

import json

import click


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


@click.group()
def distill() -> None:
    """Distill a teacher's agent trajectories into a small student."""


@distill.command()
@click.option("--questions", required=True, type=click.Path(), help="Question file (the paper's JSON or JSONL).")
@click.option("--teacher", required=True, help="OpenAI-compatible base URL(s), comma-separated, or a model folder.")
@click.option("--teacher-model", default="default", show_default=True, help="Model name sent to the server.")
@click.option("--out", required=True, type=click.Path(), help="Run folder (trajectories.jsonl goes here).")
@click.option("--ftp/--no-ftp", default=True, show_default=True, help="First-thought prefix.")
@click.option("--completions", is_flag=True, help="Continue the prefix via /completions with a local ChatML template.")
@click.option("--index", type=click.Path(), help="Retrieval index behind web_search.")
@click.option("--limit", type=int, help="Only the first N questions.")
@click.option("--max-steps", default=5, show_default=True)
@click.option("--concurrency", default=4, show_default=True, help="Questions in flight.")
def generate(questions, teacher, teacher_model, out, ftp, completions, index, limit, max_steps, concurrency) -> None:
    """Run the teacher as an agent over QUESTIONS; resumable, one JSONL line per trajectory."""
    from attar.distill.data import load_questions
    from attar.distill.teacher import GenerateConfig, generate as run, load_teacher
    from attar.runtime.models import ModelError

    try:
        qs = load_questions(questions, limit)
        backend = load_teacher(teacher, teacher_model, completions)
        tools = []
        if index:
            from attar.runtime.retrieval import Index, web_search_tool

            tools.append(web_search_tool(Index.open(index)))
    except (ValueError, ModelError, OSError) as exc:
        raise _fail(exc) from None
    summary = run(qs, backend, out, GenerateConfig(ftp=ftp, max_steps=max_steps, concurrency=concurrency), tools)
    click.echo(json.dumps(summary, indent=2))


@distill.command("filter")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--rag-index", type=click.Path(), help="Also put retrieved passages into the CoT prompts (CoT + RAG).")
def filter_(run_dir, rag_index) -> None:
    """Keep correct, well-formed trajectories; write agent_sft.jsonl and cot_sft.jsonl."""
    from attar.distill.sft_data import build_sft

    retrieve = None
    if rag_index:
        from attar.runtime.retrieval import Index, web_search_tool

        retrieve = web_search_tool(Index.open(rag_index))
    try:
        click.echo(json.dumps(build_sft(run_dir, retrieve), indent=2))
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise _fail(exc) from None
