"""The `transferlab` command line: a thin typer layer over the library's functions."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from transferlab.errors import UserError
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
    from transferlab.weights import zoo_rows
    from transferlab.zoo import ZOO, expand_names

    rows = zoo_rows(expand_names(names) if names else list(ZOO))
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=2))
    else:
        typer.echo(markdown_table(rows, ["name", "arch", "params_m", "input_size", "imagenet_top1", "available"]))


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders")],
    run: Annotated[Path | None, typer.Option(help="A trained run directory; without it, the ImageNet head")] = None,
    model: Annotated[Path | None, typer.Option(help="An exported .onnx file (runs on onnxruntime)")] = None,
    backbone: Annotated[str, typer.Option(help="Backbone for ImageNet predictions (no --run)")] = "efficientnet_lite0",
    weights: Annotated[Path | None, typer.Option(help="Explicit backbone weights file")] = None,
    top_k: Annotated[int, typer.Option(help="How many classes per image")] = 5,
    fmt: Annotated[str, typer.Option("--format", help="text, json or csv")] = "text",
) -> None:
    """Top-k classes per image: of a trained run (--run) or exported model (--model), else ImageNet's."""
    files = expand_images(images)
    key = "top"
    if model is not None:
        from transferlab.predict import predict_onnx

        results = predict_onnx(model, files, k=top_k)
    elif run is not None:
        from transferlab.predict import predict_run

        results = predict_run(run, files, k=top_k)
    else:
        from transferlab.imagenet import imagenet_top5

        results, key = imagenet_top5(files, backbone, weights, k=top_k), "top5"
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


@app.command()
def train(
    data_dir: Annotated[Path | None, typer.Argument(help="Folder of class sub-folders (or train/ + val/)")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run directory")] = None,
    backbone: Annotated[str, typer.Option(help="Zoo name or any timm model")] = "efficientnet_lite0",
    weights: Annotated[Path | None, typer.Option(help="Backbone weights file (.pth/.safetensors)")] = None,
    no_pretrained: Annotated[bool, typer.Option("--no-pretrained", help="Random backbone weights")] = False,
    image_size: Annotated[int | None, typer.Option(help="Input size; default the backbone's native")] = None,
    batch_size: Annotated[int, typer.Option()] = 32,
    epochs: Annotated[int, typer.Option(help="Feature-extraction epochs (frozen backbone)")] = 10,
    fine_tune_epochs: Annotated[int, typer.Option(help="Fine-tuning epochs; 0 skips fine-tuning")] = 10,
    fine_tune_at: Annotated[str | None, typer.Option(help="Unfreeze from this layer group (index or fraction)")] = None,
    lr: Annotated[float, typer.Option(help="Learning rate of phase 1")] = 1e-3,
    fine_tune_lr: Annotated[float | None, typer.Option(help="Learning rate of phase 2; default lr/10")] = None,
    optimizer: Annotated[str, typer.Option(help="adam, adamw, sgd or rmsprop")] = "adam",
    dropout: Annotated[float, typer.Option()] = 0.2,
    augment: Annotated[str, typer.Option(help="keras, none or strong")] = "keras",
    resize: Annotated[
        str, typer.Option(help="crop: keep the aspect ratio and centre-crop, as ImageNet evaluation; squash")
    ] = "crop",
    train_bn: Annotated[bool, typer.Option("--train-bn", help="Let BatchNorm update while fine-tuning")] = False,
    val_split: Annotated[float, typer.Option(help="Validation fraction without split folders")] = 0.2,
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Path | None, typer.Option(help="Run directory; default runs/<data folder name>")] = None,
    patience: Annotated[int | None, typer.Option(help="Early stopping patience (epochs)")] = None,
    precision: Annotated[str, typer.Option(help="Lightning precision: 32-true, bf16-mixed, 16-mixed")] = "32-true",
    workers: Annotated[int | None, typer.Option(help="Data-loading worker processes")] = None,
    cache: Annotated[str, typer.Option(help="disk: compute the frozen backbone once; none: every epoch")] = "disk",
    cache_views: Annotated[int, typer.Option(help="Cached augmented views per training image")] = 2,
    cache_dir: Annotated[Path | None, typer.Option(help="Shared feature cache folder; default <out>/cache")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a finished run in --out")] = False,
    pixels: Annotated[str, typer.Option(help="Ablation only: backbone, unit or raw255 pixel scaling")] = "backbone",
    bn_mode: Annotated[
        str, typer.Option(help="Ablation only: frozen, or train (BatchNorm always training)")
    ] = "frozen",
) -> None:
    """Train a classifier: feature extraction on a frozen backbone, then fine-tuning."""
    options = dict(locals())
    from transferlab.train import TrainConfig
    from transferlab.train import train as run_training

    if resume is not None:
        metrics = run_training(resume=resume)
        out = resume
    else:
        if data_dir is None:
            raise UserError("give DATA_DIR (a folder of class sub-folders) or --resume RUN_DIR")
        cfg = TrainConfig(
            data_dir=str(data_dir),
            **{
                k: str(v) if isinstance(v, Path) else v
                for k, v in options.items()
                if k in _TRAIN_OPTIONS and v is not None
            },
            pretrained=not no_pretrained,
        )
        metrics = run_training(cfg, overwrite=overwrite)
        out = cfg.out or Path("runs") / data_dir.resolve().name
    typer.echo(
        f"best val accuracy {metrics['best_val_accuracy']:.4f} at epoch {metrics['best_epoch']} "
        f"({metrics['train_seconds']:.0f} s); run directory: {out}"
    )


_TRAIN_OPTIONS = {
    "backbone", "weights", "image_size", "batch_size", "epochs", "fine_tune_epochs", "fine_tune_at", "lr",
    "fine_tune_lr", "optimizer", "dropout", "augment", "resize", "train_bn", "val_split", "seed", "out", "patience",
    "precision", "workers", "cache", "cache_views", "cache_dir", "pixels", "bn_mode",
}  # fmt: skip


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="A trained run directory")],
    data_dir: Annotated[Path, typer.Argument(help="Folder of class folders (its val/test split if it has one)")],
    fmt: Annotated[str, typer.Option("--format", help="text or json")] = "text",
) -> None:
    """Accuracy, per-class precision/recall/F1 and confusion matrix of a trained run on held-out images."""
    from transferlab.evaluate import evaluate_run

    result = evaluate_run(run, data_dir)
    if fmt == "json":
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"accuracy {result['accuracy']:.4f} on {result['num_images']} images of {data_dir}")
    rows = [{"class": c, **m} for c, m in result["per_class"].items()]
    typer.echo(markdown_table(rows, ["class", "precision", "recall", "f1", "support"]))
    typer.echo("confusion matrix (rows: true, columns: predicted):")
    for c, row in zip(result["classes"], result["confusion_matrix"]):
        typer.echo(f"  {c:>20} " + " ".join(f"{v:5d}" for v in row))
    typer.echo(f"written to {Path(run) / 'evaluation'}.json and .png")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def benchmark(
    ctx: typer.Context,
    data_dir: Annotated[Path, typer.Argument(help="Folder of class sub-folders (or train/ + val/)")],
    backbones: Annotated[str, typer.Option(help="Comma-separated names; keras7 and lite name groups")] = "lite",
    out: Annotated[Path | None, typer.Option(help="Benchmark directory; default runs/benchmark-<data>")] = None,
    ablation: Annotated[str | None, typer.Option(help="preprocessing: one backbone with each classic mistake")] = None,
) -> None:
    """Train several backbones with the same recipe (any `train` option after these) and rank them."""
    from transferlab.benchmark import COLUMNS, run_ablation, run_benchmark

    train_args = [str(a) for a in ctx.args]
    if ablation is not None:
        if ablation != "preprocessing":
            raise UserError(f"--ablation {ablation!r}: the one ablation is 'preprocessing'")
        names = [n for n in backbones.split(",") if n]
        if len(names) != 1 or names[0] in ("lite", "keras7"):
            raise UserError("--ablation preprocessing takes one backbone: --backbones NAME")
        out = out or Path("runs") / f"ablation-{data_dir.resolve().name}-{names[0]}"
        rows = run_ablation(data_dir, names[0], out, train_args)
        columns = ["model", "val_accuracy_best", "val_loss_best", "best_epoch", "train_seconds", "status", "meaning"]
    else:
        out = out or Path("runs") / f"benchmark-{data_dir.resolve().name}"
        rows = run_benchmark(data_dir, backbones, out, train_args)
        columns = COLUMNS
    typer.echo(markdown_table(rows, columns))
    typer.echo(f"written to {out}/leaderboard.csv, leaderboard.md and comparison.png")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A trained run directory")],
    fmt: Annotated[str, typer.Option("--format", help="onnx or torchscript")] = "onnx",
    out: Annotated[Path | None, typer.Option(help="Output file; default RUN/model.onnx or model.pt")] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Any batch size at run time")] = False,
    quantize: Annotated[bool, typer.Option("--quantize", help="Also write an int8 ONNX model")] = False,
) -> None:
    """Export the whole inference path, then check it against the run on real validation images."""
    from transferlab.export import TOLERANCE, export_run

    r = export_run(run, fmt, out, dynamic_batch, quantize)
    typer.echo(f"wrote {r['path']} (+ .json metadata)")
    typer.echo(
        f"parity on {r['parity_images']} validation images: max probability difference "
        f"{r['max_prob_difference']:.2e} (tolerance {TOLERANCE:.0e})"
    )
    if quantize:
        typer.echo(
            f"int8: {r['quantized_path']}: validation accuracy {r['int8_accuracy']:.4f} "
            f"(float model: {r['float_accuracy']:.4f})"
        )


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
    except Exception as e:  # click's usage errors carry their own exit code
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        raise
