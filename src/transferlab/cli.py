"""The `transferlab` command line: a thin typer layer over the library's functions."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from transferlab.errors import UserError
from transferlab.files import expand_images

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Transfer learning on images.")
STATE = {"debug": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option(help="Show tracebacks for errors.")] = False) -> None:
    STATE["debug"] = debug


def _table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table (also valid Markdown)."""
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


@app.command()
def models(
    fmt: Annotated[str, typer.Option("--format", help="table or json")] = "table",
    names: Annotated[str, typer.Option(help="Comma-separated names or aliases (keras7, lite); default: the zoo")] = "",
) -> None:
    """List the backbone zoo and whether each one's weights are on this machine now."""
    from transferlab.weights import zoo_rows
    from transferlab.zoo import ZOO, expand_names

    rows = zoo_rows(expand_names(names) if names else list(ZOO))
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=2))
    else:
        typer.echo(_table(rows, ["name", "arch", "params_m", "input_size", "imagenet_top1", "available"]))


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders")],
    run: Annotated[Path | None, typer.Option(help="A trained run directory; without it, the ImageNet head")] = None,
    backbone: Annotated[str, typer.Option(help="Backbone for ImageNet predictions (no --run)")] = "efficientnet_lite0",
    weights: Annotated[Path | None, typer.Option(help="Explicit backbone weights file")] = None,
    top_k: Annotated[int, typer.Option(help="How many classes per image")] = 5,
    fmt: Annotated[str, typer.Option("--format", help="text, json or csv")] = "text",
) -> None:
    """Top-k classes per image: of a trained run (--run), else of the backbone's ImageNet head."""
    from transferlab.imagenet import imagenet_top5

    files = expand_images(images)
    if run is None:
        results = imagenet_top5(files, backbone, weights, k=top_k)
        key = "top5"
    else:
        from transferlab.predict import predict_run

        results = predict_run(run, files, k=top_k)
        key = "top"
    _print_predictions(results, key, fmt)


def _print_predictions(results: list[dict], key: str, fmt: str) -> None:
    if fmt == "json":
        typer.echo(json.dumps(results, indent=2))
    elif fmt == "csv":
        typer.echo("image,rank,index,label,prob")
        for r in results:
            for rank, t in enumerate(r[key], 1):
                typer.echo(f'"{r["image"]}",{rank},{t["index"]},"{t["label"]}",{t["prob"]:.6f}')
    else:
        for r in results:
            typer.echo(r["image"])
            for t in r[key]:
                typer.echo(f"  {t['prob']:7.2%}  {t['index']:>4}  {t['label']}")


def main() -> None:
    """Console entry point: one clear line and exit status 2 for a user's error."""
    try:
        app(standalone_mode=False)
    except UserError as e:
        if STATE["debug"]:
            traceback.print_exc()
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as e:  # click's usage errors carry their own exit code
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        raise
