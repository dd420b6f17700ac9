"""`attar export`. Heavy imports happen inside the commands, so listing or
`--help` stays light."""

from __future__ import annotations

import click


@click.command()
@click.argument("source", type=click.Path(path_type=str))
@click.option("-o", "--out", required=True, type=click.Path(path_type=str), help="Output model folder.")
@click.option("--lora", multiple=True, metavar="[NAME=]FOLDER",
              help="PEFT LoRA adapter (repeatable). Over a GGUF each stays unmerged on the exact base, the first "
                   "active by default (`attar chat --adapter NAME` picks another); an HF folder gets one merged.")
@click.option("--precision", type=click.Choice(["int4", "int8", "fp16", "fp32"]),
              help="Re-quantize with onnxruntime-genai's builder (needs torch). Default: a GGUF keeps its own "
                   "quantized weights exactly; an HF folder becomes int4.")
@click.option("--ep", default="cpu", show_default=True, help="Execution provider the model is built for.")
@click.option("--check/--no-check", default=True, show_default=True, help="Run the parity check.")
@click.option("--int8-graph", "int8", is_flag=True, help="Also write the int8 graph attar's engine then runs on "
              "(projections on the CPU's integer matrix units); GGUF sources only.")
def export(source: str, out: str, lora: tuple[str, ...], precision: str | None, ep: str, check: bool,
           int8: bool) -> None:
    """Export SOURCE (HF folder or .gguf file) to an onnxruntime-genai folder OUT.

    The parity report (the export against its source) is printed at the end and kept in
    OUT/parity.json."""
    from attar.export.convert import ExportError, export_model

    try:
        export_model(source, out, lora=list(lora) or None, precision=precision, ep=ep, check=check,
                     int8=int8)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"exported to {out}")
