"""The `attar` command. Runtime commands live here; training and export commands are attached
lazily, so `attar --help` and `attar chat` never import torch or transformers."""

from __future__ import annotations

import importlib
import os
import platform
import signal
import sqlite3
import sys
from pathlib import Path

import click

# name -> "module:attribute" of a click command, imported only when that command runs.
LAZY_COMMANDS = {
    "export": ("attar.export.cli:export", "Export a model to ONNX INT4 for onnxruntime-genai (needs attar[export])."),
    "distill": ("attar.distill.cli:distill", "Distill teacher agent trajectories into a student (needs attar[distill])."),
    "demo": ("attar.distill.cli:demo", "Agent vs CoT distillation end to end on a generated world (needs attar[all])."),
}


class LazyGroup(click.Group):
    _listing = False

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True  # the help page lists lazy commands without importing them
        try:
            super().format_commands(ctx, formatter)
        finally:
            self._listing = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in LAZY_COMMANDS:
            return super().get_command(ctx, name)
        target, help_text = LAZY_COMMANDS[name]
        if self._listing or ctx.resilient_parsing:
            return click.Command(name, help=help_text, short_help=help_text)
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            extra = module.split(".")[1]
            raise click.ClickException(
                f"`attar {name}` needs the {extra} extra ({exc.name} is missing): pip install 'attar[{extra}]'"
            ) from None


@click.group(cls=LazyGroup)
@click.version_option(package_name="attar")
def main() -> None:
    """attar: small language-model agents that run entirely on your laptop."""
    # SIGTERM and SIGHUP end attar the way Ctrl-C does, running every `finally`: an interrupted
    # export, pull or index build removes its work folder instead of leaving it behind.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)


def program() -> None:
    """The `attar` program (`main` is its click group, which tests invoke in process)."""
    if sys.argv[1:2] and sys.argv[1] in ("chat", "serve", "distill"):  # the commands that load a model
        _rerun_with_huge_pages()
    main()


HUGE_PAGES = "glibc.malloc.hugetlb=1"


def _rerun_with_huge_pages() -> None:
    """Run this command again, at once, with glibc's malloc asking for transparent huge pages,
    which it decides when the process starts. onnxruntime keeps a model's weights in malloc'd
    memory, and a decode step streams all of them: on 4 KiB pages a one-row step of the default
    measured ~12% slower (README, "attar's kernels"). Linux with glibc, where the kernel gives
    huge pages on request; ATTAR_HUGE_PAGES=0 turns it off."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or "malloc.hugetlb" in tunables \
            or os.environ.get("ATTAR_HUGE_PAGES") == "0" or not sys.executable:
        return
    try:
        if "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
            return
    except OSError:
        return
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES
    sys.stdout.flush()
    os.execv(sys.executable, sys.orig_argv)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@main.command()
@click.argument("question", required=False)
@click.option("--model", "model", help="A catalog name (`attar models`), an exported model folder, or URL#model of an "
              "OpenAI-compatible server. Default: the catalog's default.")
@click.option("--adapter", help="One of the model's LoRA adapters (`base`: none). Default: the export's default one.")
@click.option("--index", "index", type=click.Path(), help="Retrieval index folder behind web_search.")
@click.option("--max-steps", default=5, show_default=True, type=click.IntRange(1, 50))
@click.option("--sag", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Self-consistent action generation: sample N candidate actions per step and vote.")
@click.option("--temperature", type=float, help="0 means greedy. Default: 0, or 0.4 with --sag.")
@click.option("--top-p", type=float, help="Default: 1.0, or 0.8 with --sag.")
@click.option("--seed", type=int, help="Sampling seed.")
@click.option("--provider", default="cpu", show_default=True, help="onnxruntime execution provider (e.g. QNN, OpenVINO where installed).")
@click.option("--json", "as_json", is_flag=True, help="Print the result and full memory as JSON.")
@click.option("--trace", type=click.Path(dir_okay=False), help="Write a self-contained HTML trace of the run.")
@click.option("--server", help="Ask a running `attar serve` at this URL. Default: the local one on port "
              "8765 when it runs the same model and index, else this process loads the model.")
@click.option("--local", is_flag=True, help="Never use a running server.")
def chat(question, model, adapter, index, max_steps, sag, temperature, top_p, seed, provider, as_json, trace, server,
         local) -> None:
    """Ask QUESTION (or start an interactive session) and let the agent answer."""
    from attar.runtime.chat import run_chat

    run_chat(question, model=model, index=index, max_steps=max_steps, sag=sag, temperature=temperature, top_p=top_p,
             seed=seed, provider=provider, as_json=as_json, trace=trace, adapter=adapter, server=server, local=local)


@main.command()
@click.option("--model", help="A catalog name or an exported model folder. Default: the catalog's default.")
@click.option("--adapter", help="One of the model's LoRA adapters (`base`: none).")
@click.option("--index", type=click.Path(), help="Retrieval index folder behind the agent's web_search.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Anything but loopback needs --api-key.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="ATTAR_API_KEY", help="Required from clients as `Authorization: Bearer KEY` "
              "[env ATTAR_API_KEY].")
@click.option("--concurrency", default=8, show_default=True, type=click.IntRange(1, 64),
              help="Requests generating at once (decoded as one batch).")
@click.option("--queue", default=16, show_default=True, type=click.IntRange(0, 1024),
              help="Requests that may wait for a turn; more are refused with 429.")
def serve(model, adapter, index, host, port, api_key, concurrency, queue) -> None:
    """Serve the model (OpenAI-compatible) and the agent over HTTP, warm between calls (needs attar[serve])."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(f"`attar serve` needs the serve extra ({exc.name} is missing): "
                                   "pip install 'attar[serve]'") from None
    from attar.runtime.models import load_backend
    from attar.runtime.modeldir import ModelError
    from attar.runtime.retrieval import Index, IndexError_
    from attar.runtime.serve import ServeConfig, index_key, serve as run

    try:
        backend = load_backend(model, adapter=adapter)
        opened = Index.open(index) if index else None
        run(backend, ServeConfig(host=host, port=port, api_key=api_key, concurrency=concurrency, queue=queue), opened,
            index_key(index), log=lambda m: click.echo(m, err=True))
    except (ModelError, IndexError_, ValueError, OSError) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from None


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print the catalog as JSON.")
def models_list(as_json: bool) -> None:
    """List the built-in models: name, size, license, source, and whether it is built here."""
    import json

    from attar.runtime.models import CATALOG, DEFAULT_MODEL, is_built, model_dir

    rows = [{"name": m.name, "default": m.name == DEFAULT_MODEL, "title": m.title, "gguf_mb": round(m.gguf_bytes / 1e6),
             "license": m.license, "source": m.source, "built": is_built(model_dir(m.name)),
             "path": str(model_dir(m.name))} for m in CATALOG.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        flags = ", ".join(f for f in ("default" if r["default"] else "", "built" if r["built"] else "not built") if f)
        click.echo(f"{r['name']:<20} {r['gguf_mb']:>5} MB  {r['title']}  [{flags}]")
        click.echo(f"{'':<20} license: {r['license']}; source: {r['source']}")


@main.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the parity report as JSON.")
@click.option("--int8-graph", "int8", is_flag=True, help="Also build the int8 graph and run on it: projections on the "
              "CPU's integer matrix units (AMX, VNNI), faster for prompts and batches, not bit-exact (its parity "
              "is printed); about the model's size again on disk.")
def pull(name: str, as_json: bool, int8: bool) -> None:
    """Fetch NAME's GGUF (a catalog name, or `default`), verify it and build it, once. Its parity
    report is measured again where attar's kernels were rebuilt since (`attar kernel build`)."""
    import json

    from attar.runtime.modeldir import ModelError
    from attar.runtime.models import pull as pull_model
    from attar.runtime.models import recheck

    try:
        path = pull_model(name, int8=int8)
        recheck(name)  # the report describes what runs here: measured again after a kernel rebuild
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    parity = path / "parity.json"
    if as_json and parity.is_file():
        click.echo(parity.read_text())
        return
    click.echo(str(path))
    if parity.is_file():
        from attar.runtime.parity import format_report

        click.echo(format_report(json.loads(parity.read_text())))


@main.command("rm")
@click.argument("name")
def rm(name: str) -> None:
    """Delete a catalog model's built folder and cached GGUF."""
    from attar.runtime.models import remove
    from attar.runtime.modeldir import ModelError

    try:
        removed = remove(name)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("\n".join(f"removed {p}" for p in removed) or f"{name} is not on this machine")


@main.group()
def index() -> None:
    """On-device retrieval indexes behind web_search."""


def _index_errors(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from attar.runtime.retrieval import IndexError_

        try:
            return fn(*args, **kwargs)
        except IndexError_ as exc:
            raise click.ClickException(str(exc)) from None
        except sqlite3.DatabaseError as exc:  # a damaged or foreign passages.sqlite
            raise click.ClickException(f"the index's passage store cannot be read: {exc}") from None
        except OSError as exc:
            raise click.ClickException(f"{exc.filename or 'index'}: {exc.strerror or exc}") from None

    return wrapper


@index.command("build")
@click.argument("corpus", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="Index folder to create (or finish).")
@click.option("--dtype", type=click.Choice(["f16", "i8", "f32"]), default="f16", show_default=True,
              help="Vector storage; i8 is 2x smaller but caps recall.")
@_index_errors
def index_build(corpus: str, out: str, dtype: str) -> None:
    """Embed CORPUS (JSONL of {id, title, text} or a folder of .txt/.md) into an index."""
    from attar.runtime.retrieval import build_index

    manifest = build_index(corpus, out, dtype=dtype)
    click.echo(f"indexed {manifest['count']} passages into {out}")


@index.command("add")
@click.argument("index_dir", type=click.Path())
@click.argument("corpus", type=click.Path())
@_index_errors
def index_add(index_dir: str, corpus: str) -> None:
    """Add new passages from CORPUS to an existing index."""
    from attar.runtime.retrieval import add_documents

    manifest = add_documents(index_dir, corpus)
    click.echo(f"{index_dir} now holds {manifest['count']} passages")


@index.command("search")
@click.argument("index_dir", type=click.Path())
@click.argument("query")
@click.option("-k", default=3, show_default=True, type=click.IntRange(1, 100))
@_index_errors
def index_search(index_dir: str, query: str, k: int) -> None:
    """Print the top K passages for QUERY."""
    from attar.runtime.retrieval import Index, format_hits

    click.echo(format_hits(Index.open(index_dir).search(query, k)))


@main.group()
def sandbox() -> None:
    """The WebAssembly Python sandbox."""


@sandbox.command("exec")
@click.argument("file", type=click.File("r"), required=False)
@click.option("-c", "code", help="Code to run (instead of FILE).")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds before the cell is stopped.")
@click.option("--memory-mb", default=256, show_default=True, help="Memory limit of the interpreter.")
def sandbox_exec(file, code: str | None, timeout: float, memory_mb: int) -> None:
    """Run Python code in a fresh sandbox and print what it printed."""
    from attar.runtime.executor import Limits
    from attar.runtime.sandbox import Sandbox

    if (code is None) == (file is None):
        raise click.UsageError("give either -c CODE or FILE")
    source = code if code is not None else file.read()
    with Sandbox(limits=Limits(timeout_s=timeout, memory_mb=memory_mb)) as sb:
        result = sb.run(source)
    click.echo(result.stdout, nl=False)
    if result.output is not None:
        click.echo(result.output)
    if result.is_final:
        click.echo(f"final answer: {result.final_answer!r}")
    if result.error:
        click.echo(result.error.splitlines()[-1], err=True)
        sys.exit(1)


@main.group()
def kernel() -> None:
    """attar's native kernels (attention, int8 rows): faster steps on the CPU."""


@kernel.command("build")
@click.option("--include", type=click.Path(exists=True, file_okay=False), default=None,
              help="A folder with onnxruntime's C API headers (default: fetched from Debian's libonnxruntime-dev).")
def kernel_build(include: str | None) -> None:
    """Compile attar's kernels for this CPU (once); every engine then runs on them."""
    from pathlib import Path

    from attar.runtime.kernels import KernelError, build

    try:
        click.echo(str(build(Path(include) if include else None, log=lambda m: click.echo(m, err=True))))
    except KernelError as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    program()
