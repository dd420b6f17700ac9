"""`attar distill ...`: teacher trajectories, SFT data, training, evaluation, comparison.
Heavy imports stay inside the commands."""

from __future__ import annotations

import json
from pathlib import Path

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
@click.option("--max-new-tokens", default=512, show_default=True, help="Per teacher call.")
@click.option("--judge", is_flag=True, help="Let the teacher judge factual answers the rules call wrong (LLM judge).")
@click.option("--retries", default=0, show_default=True,
              help="Where the greedy run is not kept, up to N sampled runs (T=0.7); distinct kept ones are data too.")
@click.option("--stop-on-repeat/--no-stop-on-repeat", default=True, show_default=True,
              help="End a run at a step that repeats an earlier one exactly (same text, same observation).")
def generate(questions, teacher, teacher_model, out, ftp, completions, index, limit, max_steps, concurrency,
             max_new_tokens, judge, retries, stop_on_repeat) -> None:
    """Run the teacher as an agent over QUESTIONS; resumable, one JSONL line per trajectory."""
    from attar.distill.data import load_questions
    from attar.distill.teacher import GenerateConfig, generate as run, load_teacher
    from attar.runtime.modeldir import ModelError

    try:
        qs = load_questions(questions, limit)
        backend = load_teacher(teacher, teacher_model, completions, concurrency)
        tools = []
        if index:
            from attar.runtime.retrieval import Index, web_search_tool

            tools.append(web_search_tool(Index.open(index)))
    except (ValueError, ModelError, OSError) as exc:
        raise _fail(exc) from None
    cfg = GenerateConfig(ftp=ftp, judge=judge, max_steps=max_steps, concurrency=concurrency,
                         max_new_tokens=max_new_tokens, cot_max_new_tokens=max_new_tokens, retries=retries,
                         stop_on_repeat=stop_on_repeat)
    summary = run(qs, backend, out, cfg, tools)
    click.echo(json.dumps(summary, indent=2))
    if summary["failed"]:  # the finished ones are kept; a rerun retries the rest
        raise click.ClickException(f"{summary['failed']} questions failed (rerun to retry them), e.g. "
                                   f"{summary['failures'][0]}")


@distill.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--note", help="Said in the manifest (which questions, which teacher, anything a reader needs).")
def pack(run, out, note) -> None:
    """Pack RUN's trajectories into OUT (NAME.jsonl.gz) with NAME.manifest.json beside it: commit
    both, hourly during a long run; `distill filter OUT --out DIR` trains from them."""
    from attar.distill.teacher import pack as run_pack

    try:
        manifest = run_pack(run, out, note)
    except (ValueError, OSError) as exc:
        raise _fail(exc) from None
    click.echo(json.dumps({k: v for k, v in manifest.items() if k != "settings"}, indent=2))


@distill.command()
@click.argument("packed", type=click.Path(exists=True, dir_okay=False))
@click.argument("run", type=click.Path(file_okay=False))
def unpack(packed, run) -> None:
    """Unpack a packed run (PACKED, NAME.jsonl.gz) into the new folder RUN, with the settings from
    its manifest: `distill generate --out RUN` with those settings resumes it."""
    from attar.distill.teacher import unpack as run_unpack

    try:
        n = run_unpack(packed, run)
    except (ValueError, OSError) as exc:
        raise _fail(exc) from None
    click.echo(f"{n} trajectories in {Path(run) / 'trajectories.jsonl'}; resume with: attar distill generate --out {run} ...")


@distill.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--id", "id_", help="The trajectory with this id (default: the first).")
def show(file, id_):
    """Render a trajectory from a trajectories or SFT JSONL file readably."""
    from attar.distill.data import read_jsonl

    rows = read_jsonl(file)
    row = next((r for r in rows if id_ is None or str(r.get("id")) == id_), None)
    if row is None:
        raise click.ClickException(f"no trajectory with id {id_!r} in {file}")
    if "question" in row:
        verdict = "correct" if row.get("correct") else "wrong"
        click.secho(f"{row['id']}: {row['question']}\ngold {row['answer']!r}, predicted {row.get('prediction')!r} "
                    f"({verdict}, {row.get('finished_by')}, teacher {row.get('teacher')})", bold=True)
    for m in row["messages"]:
        color = {"system": "blue", "user": "yellow", "assistant": "green"}.get(m["role"])
        click.secho(f"── {m['role']} " + "─" * 40, fg=color)
        click.echo(m["content"])


@distill.command("filter")
@click.argument("source", type=click.Path(exists=True))
@click.option("--out", type=click.Path(file_okay=False), help="Where the SFT files go (default: the run folder).")
@click.option("--rag-index", type=click.Path(), help="Also put retrieved passages into the CoT prompts (CoT + RAG).")
def filter_(source, out, rag_index) -> None:
    """Keep correct, well-formed trajectories of SOURCE (a run folder, or a trajectories .jsonl[.gz]
    file); write agent_sft.jsonl and cot_sft.jsonl."""
    from attar.distill.sft_data import build_sft

    retrieve = None
    if rag_index:
        from attar.runtime.retrieval import Index, web_search_tool

        retrieve = web_search_tool(Index.open(rag_index))
    try:
        click.echo(json.dumps(build_sft(source, retrieve, out), indent=2))
    except (FileNotFoundError, KeyError, ValueError, OSError) as exc:
        raise _fail(exc) from None


@distill.command()
@click.option("--data", required=True, multiple=True, type=click.Path(),
              help="SFT JSONL ({\"messages\": [...]} per line); repeat it to mix several.")
@click.option("--student", default="default", show_default=True, help="HF folder, .gguf file, or 'default'.")
@click.option("--out", required=True, type=click.Path(), help="Run folder: checkpoints/, then adapter/ (and merged/).")
@click.option("--rank", default=64, show_default=True)
@click.option("--alpha", default=128, show_default=True)
@click.option("--lr", default=2e-4, show_default=True)
@click.option("--epochs", default=2.0, show_default=True)
@click.option("--batch-size", type=int, help="Per device. Default: 1 on CPU (padding is slow there), 2 on GPUs.")
@click.option("--grad-accum", type=int, help="Default: an effective batch (batch-size x grad-accum x devices) of 8.")
@click.option("--max-length", default=2048, show_default=True)
@click.option("--bf16/--fp32", default=None, help="bf16 autocast. Default: on GPUs only.")
@click.option("--cpu-weights", type=click.Choice(["bf16", "fp32"]),
              help="The frozen base's dtype on CPU. Default: bf16 where the CPU has bf16 instructions (AMX, "
                   "AVX-512 BF16), else fp32 (bench/train.py compares them).")
@click.option("--max-steps", default=-1, show_default=True, help="Stop after N optimizer steps (smoke runs).")
@click.option("--merge", is_flag=True, help="Also write a merged HF folder (out/merged).")
def train(data, student, out, rank, alpha, lr, epochs, batch_size, grad_accum, max_length, bf16, cpu_weights, max_steps,
          merge):
    """LoRA SFT of STUDENT on DATA (loss on assistant turns only); resumes a killed run."""
    from attar.distill.train import TrainConfig, train as run
    from attar.export.convert import ExportError
    from attar.runtime.modeldir import ModelError

    cfg = TrainConfig(rank=rank, alpha=alpha, lr=lr, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
                      max_length=max_length, bf16=bf16, cpu_weights=cpu_weights, max_steps=max_steps)
    try:
        adapter = run(data, student, out, cfg, merge=merge)
    except (ValueError, ExportError, ModelError) as exc:
        raise _fail(exc) from None
    click.echo(f"adapter: {adapter}\nexport it: attar export {student if student != 'default' else '<base>'} "
               f"--lora {adapter} -o {out}/int4")


@distill.command("eval")
@click.option("--model", required=True, help="Exported ONNX folder, HF folder, or URL#model.")
@click.option("--questions", required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Run folder: predictions.jsonl and summary.json.")
@click.option("--mode", type=click.Choice(["agent", "cot"]), default="agent", show_default=True)
@click.option("--sag", default=1, show_default=True)
@click.option("--index", type=click.Path(), help="web_search index (agent) or passages in the prompt (cot).")
@click.option("--max-steps", default=5, show_default=True)
@click.option("--limit", type=int)
@click.option("--label", help="Name of this run in `compare`.")
@click.option("--concurrency", default=1, show_default=True,
              help="Questions in flight; attar's engine decodes them in one batch.")
def eval_(model, questions, out, mode, sag, index, max_steps, limit, label, concurrency):
    """Evaluate a student over QUESTIONS; resumable; prints the summary."""
    from attar.distill.evaluate import evaluate
    from attar.runtime.modeldir import ModelError

    try:
        summary = evaluate(model, questions, out, mode=mode, sag=sag, index=index, max_steps=max_steps, limit=limit,
                           label=label, concurrency=concurrency)
    except (ValueError, ModelError, RuntimeError) as exc:
        raise _fail(exc) from None
    click.echo(json.dumps(summary, indent=2))


@distill.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--chart", type=click.Path(dir_okay=False), help="Save a bar chart PNG.")
def compare(runs, chart):
    """One table across eval runs (and a bar chart)."""
    from attar.distill.evaluate import compare as run

    try:
        click.echo(run(list(runs), chart))
    except ValueError as exc:
        raise _fail(exc) from None


@click.command()
@click.option("--out", default="attar-demo", show_default=True, type=click.Path(), help="Run folder (cached stages).")
@click.option("--quick", is_flag=True, help="A tiny model on a tiny world: the whole pipeline in a few minutes.")
@click.option("--seed", default=0, show_default=True)
@click.option("--limit", type=int, help="Evaluate the first N test questions (default: 30; 4 with --quick).")
@click.option("--teacher", default="oracle", show_default=True,
              help="'oracle', or an LLM teacher: OpenAI-compatible base URL(s) or an exported model folder.")
@click.option("--teacher-model", default="default", show_default=True, help="Model name sent to the server.")
@click.option("--completions", is_flag=True, help="Continue the first-thought prefix via /completions.")
@click.option("--data-only", is_flag=True, help="Stop after the SFT data (retrieval trajectories to mix into training).")
@click.option("--people", type=click.IntRange(4, 10_000), help="World size (default 72; ~2.8 training questions each).")
def demo(out, quick, seed, limit, teacher, teacher_model, completions, data_only, people):
    """Agent distillation vs CoT distillation, end to end, offline."""
    from dataclasses import replace

    from attar.distill.demo import QUICK, DemoConfig, run_demo
    from attar.runtime.modeldir import ModelError

    cfg = replace(QUICK if quick else DemoConfig(), seed=seed, teacher=teacher, teacher_model=teacher_model,
                  completions=completions, data_only=data_only)
    if limit is not None:
        cfg = replace(cfg, eval_limit=limit)
    if people is not None:
        cfg = replace(cfg, people=people)
    try:
        run_demo(out, cfg)
    except (ValueError, ModelError) as exc:
        raise _fail(exc) from None
