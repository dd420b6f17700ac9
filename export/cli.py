"""`attar export` and `attar pull`. Heavy imports happen inside the commands, so listing or
`--help` stays light."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("source", type=click.Path(path_type=str))
@click.option("-o", "--out", required=True, type=click.Path(path_type=str), help="Output model folder.")
@click.option("--lora", type=click.Path(path_type=str), help="LoRA adapter folder to merge into SOURCE first.")
@click.option("--precision", type=click.Choice(["int4", "int8", "fp16", "fp32"]), default="int4", show_default=True)
@click.option("--ep", default="cpu", show_default=True, help="Execution provider the model is built for.")
@click.option("--check/--no-check", default=True, show_default=True, help="Run the parity check.")
def export(source: str, out: str, lora: str | None, precision: str, ep: str, check: bool) -> None:
    """Export SOURCE (HF folder or .gguf file) to an onnxruntime-genai folder OUT."""
    from attar.export.convert import ExportError, export_model
    from attar.export.parity import format_report

    try:
        report = export_model(source, out, lora=lora, precision=precision, ep=ep, check=check)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"exported to {out}")
    if report:
        click.echo(format_report(report))


@click.command()
@click.argument("name", type=click.Choice(["default"]))
@click.option("--json", "as_json", is_flag=True, help="Print the parity report as JSON.")
def pull(name: str, as_json: bool) -> None:
    """Build a named model into the local cache (once)."""
    from attar.export.convert import ExportError
    from attar.export.default import pull_default

    try:
        path = pull_default()
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    parity = path / "parity.json"
    if as_json and parity.is_file():
        click.echo(parity.read_text())
    else:
        click.echo(str(path))
        if parity.is_file():
            from attar.export.parity import format_report

            click.echo(format_report(json.loads(parity.read_text())))
