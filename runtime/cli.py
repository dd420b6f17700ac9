"""The `attar` command. Runtime commands live here; training and export commands are attached
lazily, so `attar --help` and `attar chat` never import torch or transformers."""

from __future__ import annotations

import importlib
import sys

import click

# name -> "module:attribute" of a click command, imported only when that command runs.
LAZY_COMMANDS = {
    "export": ("attar.export.cli:export", "Export a model to ONNX INT4 for onnxruntime-genai (needs attar[export])."),
    "pull": ("attar.export.cli:pull", "Build the default model into the local cache (needs attar[export])."),
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
    from attar.runtime.sandbox import Limits, Sandbox

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


if __name__ == "__main__":
    main()
