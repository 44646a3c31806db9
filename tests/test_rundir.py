"""Nothing lost, nothing leaked (issue 21): the run directory's lock, the --overwrite swap, a received run,
a full disk, another user's files, an image of any shape, one file mode.

Every case is a real `transferlab` process on real shared images; the disk is filled with RLIMIT_FSIZE
(a write past it fails as a full disk's does) and another user is `nobody`, or, when the tests do not run
as root, a folder without write permission.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import DATASETS, ROOT, make_subset, run_cli
from PIL import Image

from transferlab.errors import UserError
from transferlab.rundir.folder import Replacement, RunDir, recover

TINY = ["--image-size", "64", "--epochs", "1", "--fine-tune-epochs", "1", "--workers", "0", "--batch-size", "16"]
SLOW = ["--image-size", "96", "--epochs", "4", "--fine-tune-epochs", "0", "--workers", "0", "--batch-size", "8",
        "--cache", "none", "--patience", "0"]  # fmt: skip


def digest(folder: Path) -> dict[str, str]:
    """Every file of a run (the feature cache aside), by its content."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "cache" not in p.relative_to(folder).parts
    }


def start(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "transferlab", *map(str, args)], cwd=ROOT, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,
    )  # fmt: skip


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def one_line(proc, code: int = 2) -> str:
    """The single `error:` line of a failed command (warnings may come before it, never a traceback)."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_subset(tmp_path_factory.mktemp("data"), train=16, val=10)


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> Path:
    return make_subset(tmp_path_factory.mktemp("catsdogs"), DATASETS / "cats_and_dogs_filtered", train=40, val=10)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = run_cli("train", data, "--out", out, *TINY)
    assert proc.returncode == 0, proc.stderr
    return out


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("cache"))
    return dest


# --- 4: one writer per run directory ---------------------------------------------------------------


@pytest.mark.slow
def test_a_second_command_on_a_run_in_training_is_refused_naming_the_holder(data, other_data, tmp_path) -> None:
    out = tmp_path / "same"
    first = start("train", data, "--out", out, *SLOW)
    try:
        wait_for(lambda: (out / "config.yaml").is_file(), "the first run to start")
        os.killpg(first.pid, signal.SIGSTOP)  # held mid-run, lock and all, while the others try
        for args in (["train", other_data, "--out", out, *TINY, "--overwrite"], ["train", "--resume", out]):
            line = one_line(run_cli(*args))
            assert f"{out} is in use by process {first.pid} (train" in line, line
        assert "is in use by process" in one_line(run_cli("evaluate", out, data))
        assert first.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGCONT)
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    config, metrics = yaml.safe_load((out / "config.yaml").read_text()), RunDir(out).read_metrics()
    assert config["classes"] == metrics["classes"] == ["ants", "bees"]
    assert int(config["epochs"]) == 4 and metrics["epochs_run"] == 4


@pytest.mark.slow
def test_a_benchmark_folder_is_locked_too(data, tmp_path) -> None:
    from transferlab.benchmark import run_benchmark
    from transferlab.rundir.locks import hold

    held = f"in use by process {os.getpid()}"
    with hold(tmp_path / "bench", "benchmark", create=True), pytest.raises(UserError, match=held):
        run_benchmark(data, "efficientnet_lite0", tmp_path / "bench", TINY)


# --- 5: --overwrite is a swap ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_interrupting_an_overwrite_before_its_first_checkpoint_keeps_the_old_run(
    finished, other_data, tmp_path, how
) -> None:
    run = copy_run(finished, tmp_path / "run")
    before = digest(run)
    proc = start("train", other_data, "--out", run, *SLOW, "--overwrite")
    staging = lambda: list(tmp_path.glob(".run.new-*"))  # noqa: E731
    wait_for(lambda: any((s / "config.yaml").is_file() for s in staging()), "the new run to start beside the old")
    os.killpg(proc.pid, signal.SIGSTOP)
    assert not any((s / "checkpoints" / "last.ckpt").exists() for s in staging()), "stopped too late"
    assert digest(run) == before  # while the new run trains, the old one is whole where it was
    os.killpg(proc.pid, how) if how == signal.SIGKILL else proc.send_signal(how)
    os.killpg(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert digest(run) == before
    if how == signal.SIGINT:
        assert proc.returncode == 130 and err.strip().splitlines()[-1] == (
            f"error: interrupted: {run} still holds the previous run, untouched"
        ), err
        assert not staging()
    predict = run_cli("predict", DATASETS / "hymenoptera" / "val" / "ants", "--run", run, "--format", "csv")
    assert predict.returncode == 0 and "ants" in predict.stdout  # the old run still answers
    # the next command on the folder tidies what a kill left; a finished run is refused without --overwrite
    assert "already holds a finished run" in one_line(run_cli("train", other_data, "--out", run, *TINY))
    assert not staging() and digest(run) == before


@pytest.mark.slow
def test_an_overwrite_replaces_the_run_keeps_the_cache_and_the_users_files(finished, other_data, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "notes.txt").write_text("mine")
    for args in (["export", run, "--quantize"], ["export", run, "--format", "torchscript"], ["review", run]):
        assert run_cli(*args).returncode == 0
    old_model = {"model.onnx", "model.onnx.json", "model.int8.onnx", "model.int8.onnx.json", "model.pt",
                 "model.pt.json", "review.png"}  # fmt: skip
    assert old_model <= {p.name for p in run.iterdir()}
    cache_entries = sorted(p.name for p in (run / "cache").rglob("*.npy"))
    proc = run_cli("train", other_data, "--out", run, *TINY, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert RunDir(run).read_metrics()["classes"] == ["cats", "dogs"]
    assert RunDir(run).read_config()["classes"] == ["cats", "dogs"]
    assert (run / "notes.txt").read_text() == "mine" and not old_model & {p.name for p in run.iterdir()}
    assert "## Review" not in (run / "report.md").read_text()
    assert set(cache_entries) <= {p.name for p in (run / "cache").rglob("*.npy")}  # the old entries moved along
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock", "run"]  # nothing left beside it


def test_recover_puts_back_an_old_run_a_kill_left_between_the_two_renames(tmp_path) -> None:
    target = tmp_path / "run"
    old, new = tmp_path / ".run.old-123", tmp_path / ".run.new-123"
    for folder, what in ((old, "old"), (new, "new")):
        folder.mkdir()
        (folder / "config.yaml").write_text(what)
    recover(target)
    assert (target / "config.yaml").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    old.mkdir()  # killed after the swap, while the old run was being deleted
    recover(target)
    assert (target / "config.yaml").read_text() == "old" and not old.exists()


def test_a_replacement_swaps_only_when_asked_and_abandons_cleanly(tmp_path) -> None:
    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    (rd.path / "metrics.json").write_text("{}")
    replacement = Replacement(rd)
    replacement.begin()
    assert rd.path.name.startswith(".run.new-") and (tmp_path / "run" / "metrics.json").is_file()
    replacement.abandon()
    assert rd.path == tmp_path / "run" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# --- 3: a run refers to its data by absolute path and trusts only its own --------------------------


@pytest.mark.slow
def test_a_received_run_never_shows_images_from_a_folder_it_names(finished, data, other_data, tmp_path) -> None:
    received = copy_run(finished, tmp_path / "received")
    config = yaml.safe_load((received / "config.yaml").read_text())
    assert Path(config["data"]["root"]).is_absolute() and Path(config["data_dir"]).is_absolute()
    config["data"]["root"] = config["data_dir"] = str(other_data)  # "root: /home/me/private"
    (received / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = digest(received)
    line = one_line(run_cli("review", received))
    assert "was not trained by this user here" in line and "--data DIR" in line
    assert "was not trained by this user here" in one_line(run_cli("export", received))
    assert digest(received) == before  # no review.png, no report section, no export
    given = run_cli("review", received, "--count", "2", "--data", data)
    assert given.returncode == 0 and (received / "review.png").is_file(), given.stderr
    # the run's own data, from any working directory: the root is absolute
    own = subprocess.run(
        [sys.executable, "-m", "transferlab", "review", finished, "--count", "2"], cwd=tmp_path,
        capture_output=True, text=True,
    )  # fmt: skip
    assert own.returncode == 0, own.stderr
    assert "ants" in own.stdout and "cats" not in own.stdout and "dogs" not in own.stdout


# --- 6: an image's cost is bounded by the input size, whatever its shape -----------------------------


def strip(path: Path, size: tuple[int, int] = (65000, 1)) -> Path:
    Image.new("RGB", size, (120, 80, 40)).save(path)
    return path


def test_a_65000_by_1_png_costs_what_a_square_does(tmp_path) -> None:
    png = strip(tmp_path / "strip.png")
    assert png.stat().st_size < 1000
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30));"
        "from transferlab.data.images import Preprocess;"
        "p = Preprocess(224, 'bicubic', 'crop', 0.875, (0.5,) * 3, (0.5,) * 3);"
        f"x = p.pixels({str(png)!r}); y = p.pixels({str(strip(tmp_path / 'tall.png', (1, 65000)))!r});"
        "print(x.shape, y.shape)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr  # at 1 GiB of address space; the resize alone asked for 13 GB
    assert proc.stdout.strip() == "(3, 224, 224) (3, 224, 224)"


@pytest.mark.slow
def test_training_and_predict_take_an_extreme_strip(data, finished, tmp_path) -> None:
    strips = tmp_path / "strips"
    strips.mkdir()
    strip(strips / "wide.png")
    strip(strips / "tall.png", (1, 65000))
    proc = run_cli("predict", strips, "--run", finished, "--format", "csv", "--top-k", "1")
    assert proc.returncode == 0 and len(proc.stdout.strip().splitlines()) == 3, proc.stderr  # header + 2 rows
    with_strips = tmp_path / "data"
    shutil.copytree(data, with_strips, symlinks=True)
    for name in ("wide.png", "tall.png"):
        shutil.copy(strips / name, with_strips / "train" / "ants" / name)
    trained = run_cli("train", with_strips, "--out", tmp_path / "run", *TINY)
    assert trained.returncode == 0, trained.stderr
    assert RunDir(tmp_path / "run").read_metrics()["num_train_images"] == 34  # 16 + 16 + both strips


# --- 8: one line and exit 2 for a full disk, a read-only folder, another user's files, empty files --


def fsize_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def leftovers(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp") or ".export." in p.name
    )


@pytest.mark.slow
def test_a_full_disk_in_training_is_one_line_and_leaves_no_partial_checkpoint(data, tmp_path) -> None:
    out = tmp_path / "full"
    proc = subprocess.run(
        [sys.executable, "-m", "transferlab", "train", data, "--out", out, *TINY], cwd=ROOT, capture_output=True,
        text=True, preexec_fn=fsize_limit(4 << 20),
    )  # fmt: skip
    line = one_line(proc)
    assert "checkpoint" in line or "File too large" in line, line
    assert leftovers(out) == []
    assert not (out / "checkpoints" / "last.ckpt").exists() and not (out / "metrics.json").exists()


@pytest.mark.slow
def test_a_full_disk_in_export_is_one_line_and_leaves_no_partial_file(finished, tmp_path) -> None:
    run = copy_run(finished, tmp_path / "run")
    (run / ".export.killed").mkdir()  # what a SIGKILL during an earlier export left
    before = digest(run)
    proc = subprocess.run(
        [sys.executable, "-m", "transferlab", "export", run, "--quantize"], cwd=ROOT, capture_output=True,
        text=True, preexec_fn=fsize_limit(2 << 20),
    )  # fmt: skip
    assert "File too large" in one_line(proc)
    assert digest(run) == before and leftovers(run) == []
    done = run_cli("export", run, "--quantize")
    assert done.returncode == 0, done.stderr
    assert {"model.onnx", "model.onnx.json", "model.int8.onnx", "model.int8.onnx.json"} <= {
        p.name for p in run.iterdir()
    }
    assert leftovers(run) == [] and not list(run.glob("*inferred*"))


HYMENOPTERA = DATASETS / "hymenoptera"


def without_root_powers() -> None:
    """In the child: drop root's power to ignore file permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH).

    Dropped from the bounding set before exec, they are gone from the new program: it then meets a folder's
    mode bits as its owner would, as a user meets another user's files.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        assert libc.prctl(24, capability, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())  # PR_CAPBSET_DROP


def cli_as_other_user(folder: Path, mode: int, *args) -> subprocess.CompletedProcess:
    """``transferlab ARGS`` as a user for whom ``folder`` has ``mode`` (root is made to obey it too)."""
    folder.chmod(mode)
    try:
        return subprocess.run(
            [sys.executable, "-m", "transferlab", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
            timeout=600, preexec_fn=without_root_powers if os.geteuid() == 0 else None,
        )  # fmt: skip
    finally:
        folder.chmod(0o755)


@pytest.mark.slow
def test_a_read_only_run_folder_is_one_line_for_every_writer(finished, tmp_path) -> None:
    run = copy_run(finished, tmp_path / "run")
    before = digest(run)
    for args in (["evaluate", run, HYMENOPTERA], ["export", run], ["review", run, "--count", "1"]):
        extra = [] if args[0] == "evaluate" else ["--data", HYMENOPTERA]
        line = one_line(cli_as_other_user(run, 0o555, *args, *extra))
        assert "Permission denied" in line and "run as the user it belongs to" in line, line
    assert digest(run) == before and leftovers(run) == []


@pytest.mark.slow
def test_a_run_others_cannot_read_is_one_line(finished, tmp_path) -> None:
    run = copy_run(finished, tmp_path / "run")
    for f in run.rglob("*"):
        f.chmod(0o000 if f.is_file() else 0o755)  # as another user's 0600 files look
    ant = next((HYMENOPTERA / "val" / "ants").glob("*.jpg"))
    line = one_line(cli_as_other_user(run, 0o755, "predict", ant, "--run", run))
    assert "Permission denied" in line and "run as the user it belongs to" in line, line


@pytest.mark.parametrize("content", ["", "- a\n- b\n", "spec: 3\n"])
def test_an_empty_or_foreign_config_is_one_line(finished, tmp_path, content: str) -> None:
    run = copy_run(finished, tmp_path / "run")
    (run / "config.yaml").write_text(content)
    ant = next((DATASETS / "hymenoptera" / "val" / "ants").glob("*.jpg"))
    assert "the run directory is damaged" in one_line(run_cli("predict", ant, "--run", run))


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("metrics.json", "{", "cannot read"),
        ("metrics.json", "[1, 2]", "not a JSON object"),
        ("history.csv", "epoch,phase,train_loss\n1,feature_extraction", "cut short"),
    ],
)
def test_damaged_run_files_are_one_user_error(finished, tmp_path, name: str, content: str, words: str) -> None:
    run = copy_run(finished, tmp_path / "run")
    (run / name).write_text(content)
    rd = RunDir(run)
    with pytest.raises(UserError, match=words):
        rd.read_metrics() if name.endswith(".json") else rd.read_history()


# --- 9: one file mode; the report's review section ---------------------------------------------------


@pytest.mark.slow
def test_every_file_a_run_writes_has_the_mode_the_umask_gives(data, tmp_path) -> None:
    out = tmp_path / "modes"
    umask = lambda: os.umask(0o027) and None  # noqa: E731
    for args in (["train", data, "--out", out, *TINY], ["export", out, "--quantize"]):
        proc = subprocess.run(
            [sys.executable, "-m", "transferlab", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
            preexec_fn=umask,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert {"checkpoints/best.ckpt", "checkpoints/last.ckpt", "model.onnx", "model.int8.onnx"} <= set(modes)
    assert any(name.startswith("cache/") for name in modes)
    assert set(modes.values()) == {0o640}, {m: n for n, m in modes.items()}


def test_rerunning_a_review_leaves_the_report_as_it_was() -> None:
    from transferlab.inference.review import with_section

    report = "# run\n\n## Learning curves\n\nx\n"
    once = with_section(report, "## Review\n\nfirst\n")
    assert with_section(once, "## Review\n\nfirst\n") == once and once.endswith("first\n")
