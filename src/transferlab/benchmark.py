"""Compare backbones on one dataset with the same recipe: a leaderboard, a chart and an ablation.

Each backbone trains in its own process (``transferlab train``) and run directory under the
benchmark directory, so one that fails (no weights, out of memory) gets a row with the reason
while the others go on, its peak memory is its own, and a re-run skips finished backbones and
resumes unfinished ones.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transferlab.config import TrainConfig
from transferlab.data.index import median_side
from transferlab.data.labels import index_data, is_table
from transferlab.errors import UserError
from transferlab.files import atomic_write, markdown_table
from transferlab.model.zoo import expand_names, get_spec
from transferlab.rundir.folder import RunDir
from transferlab.rundir.locks import hold

COLUMNS = [
    "model", "best_epoch", "train_accuracy_best", "val_accuracy_best", "val_loss_best", "params", "image_size",
    "train_seconds", "images_per_second", "peak_memory_mb", "status",
]  # fmt: skip

# The preprocessing ablation: what broke MobileNetV2 and InceptionV3 in the classic Keras table.
ABLATION = {
    "default": ([], "transferlab's defaults: the backbone's own normalization and input size, BatchNorm frozen"),
    "raw_pixels": (["--pixels", "raw255"], "0-255 pixels, not normalized the way the backbone was trained"),
    "original_size": (["--image-size", "{side}"], "images kept at their original {side}x{side} size, not upsampled"),
    "bn_training_mode": (
        ["--bn-mode", "train", "--cache", "none"],
        "BatchNorm left in training mode while the backbone is frozen and fine-tuned",
    ),
}


def _run_one(data_dir: str, run_dir: Path, backbone: str, train_args: list[str]) -> tuple[str, float]:
    """Train (or resume) one run in a child process; returns (status, peak memory in MB)."""
    rd = RunDir(run_dir)
    if rd.finished():
        return "done (reused)", float(rd.read_metrics().get("peak_memory_mb", 0.0))
    if rd.last.is_file():
        cmd = ["train", "--resume", str(run_dir)]
    else:
        cmd = ["train", data_dir, "--backbone", backbone, "--out", str(run_dir), "--overwrite", *train_args]
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen([sys.executable, "-m", "transferlab", *cmd], stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory
        code = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        err = errors.read()
    peak_mb = round(usage.ru_maxrss / 1024, 1)
    if code == 0:
        return "done", peak_mb
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    if code < 0:
        return f"failed: killed by signal {-code} (out of memory?)", peak_mb
    reason = lines[-1].removeprefix("error: ") if lines else (err.strip().splitlines() or ["unknown error"])[-1]
    if "no pretrained weights" in reason:
        reason = "weights not available: " + reason
    return f"failed: {reason}", peak_mb


def _row(name: str, run_dir: Path, status: str, peak_mb: float) -> dict:
    rd = RunDir(run_dir)
    if not rd.finished():
        return {"model": name, "status": status}
    m = rd.read_metrics()
    if peak_mb and "peak_memory_mb" not in m:
        m["peak_memory_mb"] = peak_mb
        rd.write_json("metrics.json", m)
    return {
        "model": name,
        "best_epoch": m["best_epoch"],
        "train_accuracy_best": m["best_train_accuracy"],
        "val_accuracy_best": m["best_val_accuracy"],
        "val_loss_best": m["best_val_loss"],
        "params": m.get("params"),
        "image_size": m["image_size"],
        "train_seconds": m["train_seconds"],
        "images_per_second": m.get("images_per_second"),
        "peak_memory_mb": m.get("peak_memory_mb") or None,
        "status": status,
        **({"val_map_best": m["best_val_map"]} if "best_val_map" in m else {}),  # several labels per image
    }


def holding_out(run):
    """One benchmark per folder at a time: ``out`` is locked while ``run`` writes it (``locks.hold``)."""

    @functools.wraps(run)
    def locked(data_dir: str | Path, backbones, out: str | Path, train_args: list[str] | None = None, **kw):
        with hold(out, "benchmark", create=True):
            return run(data_dir, backbones, out, train_args, **kw)

    return locked


@holding_out
def run_benchmark(
    data_dir: str | Path, backbones: str | list[str], out: str | Path, train_args: list[str] | None = None
) -> list[dict]:
    """Train every backbone with the same options; write and return the sorted leaderboard."""
    names = expand_names(backbones)
    if not names:
        raise UserError("no backbones given: pass --backbones a,b,c (or keras7, lite)")
    if not (Path(data_dir).is_dir() or is_table(data_dir) and Path(data_dir).is_file()):
        raise UserError(f"data folder not found: {data_dir}: pass a folder with one sub-folder per class")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    args = list(train_args or [])
    if "--cache-dir" not in args:
        args += ["--cache-dir", str(out / "cache")]  # backbones and re-runs share extracted features
    rows = []
    for name in names:
        run_dir = out / member_folder(name)
        start = time.perf_counter()
        status, peak = _run_one(str(data_dir), run_dir, name, args)
        print(f"{name}: {status} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        rows.append(_row(name, run_dir, status, peak))
        write_leaderboard(rows, out)
    return sort_rows(rows)


@holding_out
def run_ablation(
    data_dir: str | Path, backbone: str, out: str | Path, train_args: list[str] | None = None,
    variants: list[str] | None = None,
) -> list[dict]:  # fmt: skip
    """The same training of one backbone with each preprocessing mistake of the classic comparison (or those of
    ``variants``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    base = list(train_args or []) + ["--cache-dir", str(out / "cache")]
    side = str(max(median_side(index_data(data_dir).train), get_spec(backbone).min_size))
    for variant, (extra, meaning) in _chosen(ABLATION, variants).items():
        run_dir = out / variant
        extra, meaning = [a.replace("{side}", side) for a in extra], meaning.replace("{side}", side)
        args = _override(base, extra)
        status, peak = _run_one(str(data_dir), run_dir, backbone, args)
        print(f"{variant}: {status}", file=sys.stderr, flush=True)
        row = _row(variant, run_dir, status, peak)
        row["meaning"] = meaning
        rows.append(row)
        write_leaderboard(rows, out, extra_columns=["meaning"], sort=False)
    return rows


# The recipe ablation: each row one change from the default recipe. {e1}, {e2}, {total} and {lr}
# stand for the run's feature-extraction epochs, fine-tuning epochs, their sum and --lr.
SCRATCH = ["--no-pretrained", "--epochs", "0", "--fine-tune-at", "0", "--train-bn", "--fine-tune-lr", "{lr}"]
RECIPE = {
    "default": ([], "{e1} epochs of feature extraction, then {e2} of fine-tuning at lr/10"),
    "from_scratch": (
        [*SCRATCH, "--fine-tune-epochs", "{total}"],
        "random weights, every layer trained for the same {total} epochs",
    ),
    "feature_extraction_only": (
        ["--epochs", "{total}", "--fine-tune-epochs", "0"],
        "the frozen backbone for all {total} epochs, no fine-tuning",
    ),
    "all_trainable": (
        ["--epochs", "0", "--fine-tune-epochs", "{total}", "--fine-tune-at", "0", "--fine-tune-lr", "{lr}"],
        "every layer trainable from the first epoch, at lr {lr}, with a new random head",
    ),
    "bn_training_mode": (
        ["--bn-mode", "train", "--cache", "none"],
        "BatchNorm in training mode while frozen and while fine-tuned",
    ),
    "no_augmentation": (["--augment", "none"], "training images not augmented"),
    "strong_augmentation": (["--augment", "strong"], "stronger augmentation than the Keras tutorial's"),
    # the costliest row last: an ablation stopped early still has every other row
    "from_scratch_longer": (
        [*SCRATCH, "--fine-tune-epochs", "{longer}"],
        "random weights, every layer trained for {longer} epochs",
    ),
}
LONGER = 3  # how many times the default's epochs the longer from-scratch row trains


@holding_out
def run_recipe_ablation(
    data_dir: str | Path, backbone: str, out: str | Path, train_args: list[str] | None = None,
    variants: list[str] | None = None,
) -> list[dict]:  # fmt: skip
    """One backbone trained with each change to the recipe (or those of ``variants``); every row gets a reading
    written from its numbers.

    Each row keeps its own feature cache (unless ``--cache-dir`` is given), so every row's time
    includes what it costs to compute, and the times compare.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = _override(["--patience", "0"], list(train_args or []))  # every row runs its epochs, unless told
    e1 = int(_value(base, "--epochs", TrainConfig.epochs))
    e2 = int(_value(base, "--fine-tune-epochs", TrainConfig.fine_tune_epochs))
    values = {
        "e1": e1,
        "e2": e2,
        "total": e1 + e2,
        "longer": LONGER * (e1 + e2),
        "lr": _value(base, "--lr", TrainConfig.lr),
    }
    rows: list[dict] = []
    for variant, (extra, meaning) in _chosen(RECIPE, variants).items():
        status, peak = _run_one(
            str(data_dir), out / variant, backbone, _override(base, [a.format(**values) for a in extra])
        )
        print(f"{variant}: {status}", file=sys.stderr, flush=True)
        rows.append({**_row(variant, out / variant, status, peak), "meaning": meaning.format(**values)})
        default = next((r for r in rows if r["model"] == "default" and r.get("val_accuracy_best") is not None), None)
        for row in rows:
            row["reading"] = reading(row, default, out)
        write_leaderboard(rows, out, extra_columns=["meaning", "reading"], sort=False)
    return rows


def _chosen(table: dict, variants: list[str] | None) -> dict:
    """The rows of an ablation ``table`` named in ``variants`` (all when None), in the table's order."""
    unknown = sorted(set(variants or []) - set(table))
    if unknown:
        raise UserError(f"no ablation row {unknown[0]!r}: choose among {', '.join(table)}")
    return {k: v for k, v in table.items() if variants is None or k in variants}


def reading(row: dict, default: dict | None, out: Path) -> str:
    """What a row's numbers say: its best accuracy and when, against chance and the default row, time, overfitting."""
    if row.get("val_accuracy_best") is None:
        return row["status"]
    rd = RunDir(out / member_folder(row["model"]))
    m, support = rd.read_metrics(), [c["support"] for c in rd.read_json("evaluation.json")["per_class"].values()]
    acc, chance = row["val_accuracy_best"], max(support) / sum(support)
    epoch = "0 (the closed-form head)" if row["best_epoch"] == 0 else row["best_epoch"]
    text = f"{row['model'].replace('_', ' ')} reached {acc:.2f} at epoch {epoch} of {m['epochs_run']}"
    if acc <= chance + 0.02:
        text += f" (chance level: {chance:.2f})"
    fe, ft = m["feature_extraction_best_val_accuracy"], m["fine_tune_best_val_accuracy"]
    if fe is not None and ft is not None:
        text += f", {fe:.2f} frozen then {ft:.2f} fine-tuned ({ft - fe:+.2f})"
    gap = row["train_accuracy_best"] - acc
    if default is None or default is row:
        return f"{text}; train accuracy {gap:+.2f} above validation"
    delta = acc - default["val_accuracy_best"]
    versus = (
        "level with the default"
        if abs(delta) < 0.005
        else f"{abs(delta):.2f} {_word(delta, 'above', 'below')} the default"
    )
    gap0 = default["train_accuracy_best"] - default["val_accuracy_best"]
    pace = _pace(row["train_seconds"] / default["train_seconds"])
    return f"{text}, {versus}, {pace}; train accuracy {gap:+.2f} above validation (default {gap0:+.2f})"


def _word(x: float, positive: str, negative: str) -> str:
    return positive if x > 0 else negative


def _pace(ratio: float) -> str:
    """A time ratio against the default in words: "40 % slower", "3.2x slower", "70 % faster"."""
    if abs(ratio - 1) < 0.1:
        return "in about the default's time"
    if ratio >= 2:
        return f"{ratio:.1f}x slower"
    return f"{abs(ratio - 1) * 100:.0f} % {_word(ratio - 1, 'slower', 'faster')}"


def _value(args: list[str], flag: str, default):
    """The last value given to ``flag`` in ``args``, else ``default``."""
    given = [args[i + 1] for i in range(len(args) - 1) if args[i] == flag]
    return given[-1] if given else default


def _override(args: list[str], extra: list[str]) -> list[str]:
    """``args`` with the options in ``extra`` replacing any earlier value of the same option.

    An option is a ``--flag`` and the values after it; ``--no-x`` and ``--x`` are the same option.
    """
    given = {_stem(o[0]) for o in _options(extra)}
    return [t for o in _options(args) if _stem(o[0]) not in given for t in o] + extra


def _options(args: list[str]) -> list[list[str]]:
    groups: list[list[str]] = []
    for token in args:
        if token.startswith("--") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    return groups


def _stem(flag: str) -> str:
    return "--" + flag[2:].removeprefix("no-")


def member_folder(name: str) -> str:
    """A folder name that stays inside the benchmark directory whatever the backbone name holds."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".") or "backbone"


def sort_rows(rows: list[dict]) -> list[dict]:
    """Best first: by val accuracy, or by mean AP where the runs have several labels per image."""

    def best(r: dict) -> float | None:
        return r.get("val_map_best", r.get("val_accuracy_best"))

    return sorted(rows, key=lambda r: (best(r) is None, -(best(r) or 0)))


def write_leaderboard(rows: list[dict], out: Path, extra_columns: list[str] | None = None, sort: bool = True) -> None:
    rows = sort_rows(rows) if sort else rows
    columns = COLUMNS + ["val_map_best"] * any("val_map_best" in r for r in rows) + (extra_columns or [])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "leaderboard.csv", buf.getvalue())
    atomic_write(out / "leaderboard.md", markdown_table(rows, columns) + "\n")
    atomic_write(out / "leaderboard.json", json.dumps(rows, indent=2))
    plot_comparison(rows, out)


def plot_comparison(rows: list[dict], out: Path, path: Path | None = None) -> None:
    """Val accuracy per epoch for every row's run under ``out``, and best val accuracy against train time."""
    from transferlab.rundir.plots import plt, save_figure

    fig, (curves, cost) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        history = RunDir(out / member_folder(r["model"])).read_history()
        if history and r.get("val_accuracy_best") is not None:
            line = curves.plot(
                [h["epoch"] for h in history], [h["val_accuracy"] for h in history], "o-", label=r["model"]
            )
            tuned = [h for h in history if h["phase"] == "fine_tune"]
            if tuned and len(tuned) < len(history):  # where fine-tuning starts, on the curve
                curves.plot(
                    tuned[0]["epoch"], tuned[0]["val_accuracy"], "D", ms=9, mfc="none", color=line[0].get_color()
                )
            cost.scatter(r["train_seconds"], r["val_accuracy_best"])
            cost.annotate(r["model"], (r["train_seconds"], r["val_accuracy_best"]), fontsize=8)
    curves.set(
        xlabel="epoch",
        ylabel="validation accuracy",
        title="validation accuracy per epoch (open diamond: fine-tuning starts)",
    )
    cost.set(xlabel="train time (s)", ylabel="best validation accuracy", title="accuracy against train time")
    for ax in (curves, cost):
        ax.grid(alpha=0.3)
    if curves.lines:
        curves.legend(fontsize=8)
    save_figure(fig, path or out / "comparison.png")
