"""The `transferlab` command line: a thin typer layer over the library's functions."""

from __future__ import annotations

import inspect
import json
import sys
import traceback
import typing
from pathlib import Path
from typing import Annotated

import typer

from transferlab.config import TrainConfig, cli_fields, flag, to_cli_args
from transferlab.errors import UserError, os_error_line
from transferlab.files import expand_images, markdown_table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Transfer learning on images.")
STATE = {"debug": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option(help="Show tracebacks for errors.")] = False) -> None:
    STATE["debug"] = debug


@app.command()
def models(
    fmt: Annotated[str, typer.Option("--format", help="table or json")] = "table",
    names: Annotated[str, typer.Option(help="Comma-separated names or aliases (keras7, lite); default: the zoo")] = "",
) -> None:
    """List the backbone zoo and whether each one's weights are on this machine now."""
    from transferlab.model.weights import zoo_rows
    from transferlab.model.zoo import ZOO, expand_names

    rows = zoo_rows(expand_names(names) if names else list(ZOO))
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=2))
    else:
        typer.echo(markdown_table(rows, ["name", "arch", "params_m", "input_size", "imagenet_top1", "available"]))


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders")],
    run: Annotated[Path | None, typer.Option(help="A trained run directory; without it, the ImageNet head")] = None,
    model: Annotated[
        Path | None, typer.Option(help="An exported .onnx, .pt or .tflite file (from `transferlab export`)")
    ] = None,
    backbone: Annotated[str, typer.Option(help="Backbone for ImageNet predictions (no --run)")] = "efficientnet_lite0",
    weights: Annotated[Path | None, typer.Option(help="Explicit backbone weights file")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="How many classes per image")] = 5,
    fmt: Annotated[str, typer.Option("--format", help="text, json or csv")] = "text",
    tta: Annotated[bool, typer.Option("--tta", help="Average each image with its mirror image (2x the work)")] = False,
) -> None:
    """Top-k classes per image: of a trained run (--run) or exported model (--model), else ImageNet's."""
    from transferlab.inference.predictor import open_predictor, predict, render

    render([], fmt)  # an unknown format fails before any model loads
    files = expand_images(images)
    typer.echo(render(predict(open_predictor(run, model, backbone, weights, tta), files, k=top_k), fmt))


def with_options(exclude: tuple[str, ...]):
    """Give a command every TrainConfig option (but ``exclude``) as a typed CLI option with its help and default.

    The options arrive in the command's ``**options``; TrainConfig.check() validates them.
    """

    def attach(command):
        hints = typing.get_type_hints(command, include_extras=True)
        own = [
            p.replace(annotation=hints[p.name])
            for p in inspect.signature(command).parameters.values()
            if p.kind != p.VAR_KEYWORD
        ]
        added = []
        for f, hint in cli_fields(exclude):
            decls = [f"{flag(f.name)}/--no-{flag(f.name)[2:]}"] if hint is bool else [flag(f.name)]
            annotation = Annotated[hint, typer.Option(*decls, help=f.metadata["help"], rich_help_panel="Training")]
            added.append(
                inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=annotation)
            )
        command.__signature__ = inspect.Signature(own + added)
        command.__annotations__ = {p.name: p.annotation for p in own + added}
        return command

    return attach


DATA_ARG = "Folder of class sub-folders (or train/ + val/), or a CSV of image,label rows"


@app.command()
@with_options(exclude=())
def train(
    data_dir: Annotated[Path | None, typer.Argument(help=DATA_ARG)] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run directory")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run in --out (after all checks)")] = False,
    **options,
) -> None:
    """Train a classifier: feature extraction on a frozen backbone, then fine-tuning."""
    from transferlab.recipe.plan import run_path
    from transferlab.recipe.training import train as run_training

    if resume is not None:
        metrics, out = run_training(resume=resume), resume
    else:
        if data_dir is None:
            raise UserError("give DATA_DIR (a folder of class sub-folders, or a labels CSV) or --resume RUN_DIR")
        cfg = TrainConfig(data_dir=str(data_dir), **_plain(options))
        metrics, out = run_training(cfg, overwrite=overwrite), run_path(cfg)
    if metrics is not None:  # None in the other processes of a distributed run
        best = (
            f"best val mAP {metrics['best_val_map']:.4f}"
            if "best_val_map" in metrics
            else f"best val accuracy {metrics['best_val_accuracy']:.4f}"
        )
        typer.echo(f"{best} at epoch {metrics['best_epoch']} ({metrics['train_seconds']:.0f} s); run directory: {out}")


def _plain(options: dict) -> dict:
    """Typer's values as TrainConfig holds them (paths as text)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="A trained run directory")],
    data_dir: Annotated[Path, typer.Argument(help="Folder of class folders (its val/test split if it has one) or CSV")],
    fmt: Annotated[str, typer.Option("--format", help="text or json")] = "text",
    tta: Annotated[bool, typer.Option("--tta", help="Average each image with its mirror image (2x the work)")] = False,
    unknown: Annotated[
        Path | None, typer.Option(help="A folder of images of none of the classes: how well 'none of these' finds them")
    ] = None,
) -> None:
    """Accuracy, per-class precision/recall/F1 and confusion matrix of a trained run on held-out images."""
    from transferlab.inference.evaluate import evaluate_run

    result = evaluate_run(run, data_dir, tta, unknown)
    if fmt == "json":
        typer.echo(json.dumps(result, indent=2))
        return
    several = result.get("multi_label", False)
    figures = (
        f"mAP {result['map']:.4f}, micro F1 {result['micro_f1']:.4f}, macro F1 {result['macro_f1']:.4f}, all labels "
        f"right {result['accuracy']:.4f}"
        if several
        else f"accuracy {result['accuracy']:.4f}"
    )
    typer.echo(f"{figures} on {result['num_images']} images of {data_dir}" + " (TTA)" * tta)
    rows = [{"class": c, **m} for c, m in result["per_class"].items()]
    columns = ["class", "precision", "recall", "f1"] + ["ap", "threshold"] * several + ["support"]
    typer.echo(markdown_table(rows, columns))
    if not several:
        typer.echo("confusion matrix (rows: true, columns: predicted):")
    for c, row in zip(result["classes"], result.get("confusion_matrix", [])):
        typer.echo(f"  {c:>20} " + " ".join(f"{v:5d}" for v in row))
    if u := result.get("unknown"):
        typer.echo(
            f"none of these, on {u['images']} images of {u['folder']}: AUROC {u['auroc']:.3f} ({u['score']}); "
            f"at the threshold {u['threshold']}, {u['known_accepted_share']:.1%} of the known images accepted and "
            f"{u['outside_accepted_share']:.1%} of the outside ones"
            if u["threshold"] is not None
            else f"none of these: AUROC {u['auroc']:.3f}; this run has no threshold (trained before it existed)"
        )
    typer.echo(f"written to {Path(run) / 'evaluation'}.json" + " and .png" * (not several))


@app.command()
@with_options(exclude=("data_dir", "backbone", "out"))
def benchmark(
    data_dir: Annotated[Path, typer.Argument(help=DATA_ARG)],
    backbones: Annotated[str, typer.Option(help="Comma-separated names; keras7 and lite name groups")] = "lite",
    out: Annotated[Path | None, typer.Option(help="Benchmark directory; default runs/benchmark-<data>")] = None,
    ablation: Annotated[
        str | None,
        typer.Option(help="preprocessing: one backbone with each classic mistake; recipe: each change to the recipe"),
    ] = None,
    **options,
) -> None:
    """Train several backbones with the same recipe (every `train` option applies to each) and rank them."""
    from transferlab.benchmark import COLUMNS, run_ablation, run_benchmark, run_recipe_ablation
    from transferlab.data.labels import source_name

    TrainConfig(data_dir=str(data_dir), **_plain(options)).check()  # one line for a bad value, before any run
    train_args = to_cli_args(_plain(options))
    if ablation is not None:
        if ablation not in ("preprocessing", "recipe"):
            raise UserError(f"--ablation {ablation!r}: use preprocessing or recipe")
        names = [n for n in backbones.split(",") if n]
        if len(names) != 1 or names[0] in ("lite", "keras7"):
            raise UserError(f"--ablation {ablation} takes one backbone: --backbones NAME")
        kind = "ablation" if ablation == "preprocessing" else "recipe"
        out = out or Path("runs") / f"{kind}-{source_name(data_dir)}-{names[0]}"
        runner = run_ablation if ablation == "preprocessing" else run_recipe_ablation
        rows = runner(data_dir, names[0], out, train_args)
        columns = ["model", "val_accuracy_best", "val_loss_best", "best_epoch", "train_seconds", "status", "meaning"]
        columns += ["reading"] if ablation == "recipe" else []
    else:
        out = out or Path("runs") / f"benchmark-{source_name(data_dir)}"
        rows = run_benchmark(data_dir, backbones, out, train_args)
        columns = COLUMNS
    typer.echo(markdown_table(rows, columns))
    typer.echo(f"written to {out}/leaderboard.csv, leaderboard.md and comparison.png")


DATA_HELP = "The run's data folder (its validation split); default: the one it was trained on, for a run of yours"


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A trained run directory")],
    fmt: Annotated[str, typer.Option("--format", help="onnx, torchscript, tflite or hf (a timm folder)")] = "onnx",
    out: Annotated[
        Path | None, typer.Option(help="Output file; default RUN/model.onnx, .pt, .tflite or RUN/hf")
    ] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Any batch size at run time")] = False,
    int8: Annotated[
        bool, typer.Option("--int8", "--quantize", help="Also write a static int8 model (onnx, tflite)")
    ] = False,
    data: Annotated[Path | None, typer.Option(help=DATA_HELP)] = None,
) -> None:
    """Export the whole inference path (8-bit RGB in), then check it against the run on its validation images."""
    from transferlab.inference.export import export_run

    r = export_run(run, fmt, out, dynamic_batch, int8, data=data)
    typer.echo(f"wrote {r['path']}" + ("" if fmt == "hf" else " (+ .json metadata)"))
    for name, report in [(r["path"], r), *([(r["int8"]["path"], r["int8"])] if "int8" in r else [])]:
        typer.echo(
            f"{Path(name).name}: the trained model's answer on {report['agreement']:.1%} of {report['images']} "
            f"validation images, probabilities within {report['max_prob_difference']:.1e}; accuracy "
            f"{report['accuracy']:.4f} (trained: {report['trained_accuracy']:.4f})"
        )


@app.command()
def serve(
    runs_dir: Annotated[Path, typer.Argument(help="Folder of run and benchmark directories")] = Path("runs"),
    host: Annotated[str, typer.Option(help="Address to listen on; only this machine by default")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on")] = 8000,
) -> None:
    """A local web app: runs (live while training), benchmarks, predictions by drag and drop, error review."""
    import uvicorn

    from transferlab.serve.app import bind, create_app

    if not runs_dir.is_dir():
        raise UserError(f"runs folder not found: {runs_dir}: pass the folder that holds your run directories")
    web = create_app(runs_dir, host=host)
    sock = bind(host, port)  # a busy port fails here, before anything says "serving"
    port = sock.getsockname()[1]
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(
            f"warning: serving on {host}: anyone who can reach this machine on port {port} can see your runs "
            "and send images to your models; there is no login",
            err=True,
        )
    where = f"[{host}]" if ":" in host else host
    typer.echo(f"serving {runs_dir} on http://{where}:{port}/ (API documentation at /docs); Ctrl+C stops", err=True)
    uvicorn.Server(uvicorn.Config(web, log_level="warning")).run(sockets=[sock])


@app.command()
def review(
    run: Annotated[Path, typer.Argument(help="A trained run directory")],
    count: Annotated[int, typer.Option("--count", min=1, help="Images in each list")] = 6,
    data: Annotated[Path | None, typer.Option(help=DATA_HELP)] = None,
) -> None:
    """The validation images a run gets most wrong and those whose label it doubts, with Grad-CAM heat maps."""
    from transferlab.inference.review import TITLES, write_review

    result = write_review(run, count, data)
    for key, title in TITLES.items():
        typer.echo(f"{title}:")
        for c in result[key] or [{}]:
            typer.echo(
                f"  {c['loss']:6.3f}  {c['label']} -> {c['predicted']} ({c['prob_predicted']:.2f})  {c['image']}"
                if c
                else "  none"
            )
    typer.echo(f"written to {Path(run) / 'review.png'} and the Review section of {Path(run) / 'report.md'}")


def main() -> None:
    """Console entry point: one clear line and exit status 2 for a user's error."""
    import warnings

    warnings.formatwarning = lambda message, category, *_: f"warning: {message}\n"
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
    except OSError as e:  # a full disk, a read-only folder, another user's files: no traceback
        if STATE["debug"]:
            traceback.print_exc()
        typer.echo(f"error: {os_error_line(e)}", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        # a usage error (click's, or the copy of click that typer 0.2x carries) shows itself, with its exit code
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        raise
