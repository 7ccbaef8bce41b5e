"""Nothing lost, nothing half-done: a full disk fails the shard and a re-run equals a clean run; damaged outputs
are redone or named in one line; one writer per run directory; leftovers of killed runs are swept; Ctrl-C
leaves a resumable run; late config errors exit 2 before any network traffic."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from curate import cli
from curate.config import load_config
from curate.executors.local import LocalExecutor
from curate.io.fs import is_scratch_name
from curate.io.lock import HOLDER_NAME
from curate.io.wds import iter_samples
from curate.ledger import read_ledger
from curate.pipeline import RunResult, run_pipeline
from curate.runner import ShardFailed
from curate.stage import RunLayout
from curate.stages.download import DownloadError, DownloadOutputs, DownloadStage
from curate.stages.materialize import CuratedOutputs
from tests.world_fixtures import ServedWorld, full_pipeline_overrides

REPO = Path(__file__).resolve().parent.parent
LEDGER_COLUMNS = ["uid", "status", "stage", "reason", "detail"]
DOWNLOAD = ["input.shard_size=8"]  # a download-only run of the served world in a dozen shards


def ledger_of(run_dir: Path) -> pd.DataFrame:
    return read_ledger(run_dir)[LEDGER_COLUMNS].sort_values("uid").reset_index(drop=True)


def tar_uids(run_dir: Path) -> dict[str, set[str]]:
    outputs = DownloadOutputs(run_dir)
    return {path.stem: {s.uid for s in iter_samples(path, read=())} for path in sorted(outputs.folder.glob("*.tar"))}


def set_options(*settings: str) -> list[str]:
    return [word for setting in settings for word in ("--set", setting)]


def copy_run(result: RunResult, dest: Path) -> Path:
    shutil.copytree(result.layout.root, dest)
    return dest


def curate_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "curate", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def error_line(stderr: str) -> str:
    """The one `curate: error` line of a failed command (and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("curate: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def clean_download(served_world: ServedWorld, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunResult]:
    """(pipeline, result) of one uninterrupted download-only run; tests compare against it."""
    folder = tmp_path_factory.mktemp("clean-download")
    pipeline = served_world.pipeline(folder, output=folder / "run")
    result = run_pipeline(load_config(pipeline, DOWNLOAD))
    assert result.complete
    return pipeline, result


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, bool]]:
    """A disk that fills up after a few tar members have been written: every later write of a tar member
    raises ENOSPC until the test sets `free` (or, with `once`, right after the first ENOSPC). The fault is at
    tarfile's write call, below img2dataset's and webdataset's writers, in this process (img2dataset runs
    in-process with `download.processes: 1`)."""
    state = {"full": False, "free": False, "once": False}
    addfile = tarfile.TarFile.addfile
    written = 0

    def addfile_on_a_filling_disk(self: tarfile.TarFile, tarinfo: tarfile.TarInfo, fileobj=None) -> None:  # type: ignore[no-untyped-def]
        nonlocal written
        written += 1
        if written > 10 and not state["free"]:
            state["full"], state["free"] = True, state["once"]
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        addfile(self, tarinfo, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile_on_a_filling_disk)
    yield state


def test_a_full_disk_fails_the_shard_and_the_rerun_after_freeing_space_equals_a_clean_run(
    clean_download: tuple[Path, RunResult],
    disk: dict[str, bool],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pipeline, clean = clean_download
    run_dir = tmp_path / "run"
    command = ["run", str(pipeline), "--no-progress", *set_options(*DOWNLOAD, f"output={run_dir}")]
    assert cli.main(command) == 1
    assert disk["full"]
    line = error_line(capsys.readouterr().err)
    failed = re.fullmatch(
        r"curate: error: stage 'download' failed on shard (\d{5}): writing its tar and parquet in \S+ failed: "
        r"\[Errno 28\] No space left on device",
        line,
    )
    assert failed, line
    shard = failed.group(1)
    assert not RunLayout(run_dir).marker_path("download", shard).exists()
    assert not DownloadOutputs(run_dir).tar_path(shard).exists()
    assert not (run_dir / "ledger.parquet").exists()

    disk["free"] = True
    assert cli.main(command) == 0
    assert ledger_of(run_dir).equals(ledger_of(clean.layout.root))
    assert tar_uids(run_dir) == tar_uids(clean.layout.root)


def test_space_back_after_the_first_enospc_the_shard_is_written_again_whole(
    clean_download: tuple[Path, RunResult], disk: dict[str, bool], tmp_path: Path
) -> None:
    """The issue's case: space returns mid-shard, so later samples would be written after a hole."""
    disk["once"] = True
    pipeline, clean = clean_download
    result = run_pipeline(load_config(pipeline, [*DOWNLOAD, f"output={tmp_path / 'run'}"]))  # one retry
    assert disk["full"] and result.complete
    assert ledger_of(tmp_path / "run").equals(ledger_of(clean.layout.root))
    assert tar_uids(tmp_path / "run") == tar_uids(clean.layout.root)


def test_a_tar_that_lost_a_member_fails_the_shard_before_commit(
    clean_download: tuple[Path, RunResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import webdataset

    write = webdataset.TarWriter.write
    dropped: list[str] = []

    def write_losing_a_caption(self: webdataset.TarWriter, sample: dict) -> int:  # type: ignore[type-arg]
        if not dropped:
            dropped.append(sample["__key__"])
            sample = {extension: data for extension, data in sample.items() if extension != "txt"}
        return write(self, sample)

    monkeypatch.setattr(webdataset.TarWriter, "write", write_losing_a_caption)
    pipeline, _ = clean_download
    config = load_config(pipeline, [*DOWNLOAD, f"output={tmp_path / 'run'}"])
    lost = r"on shard 00000: 00000.tar: sample '(\d+)' \(uid \w+\) has no txt"
    with pytest.raises(ShardFailed, match=lost) as failed:
        run_pipeline(config, executor=LocalExecutor(shard_retries=0))
    assert f"sample '{dropped[0]}'" in str(failed.value)
    assert not RunLayout(tmp_path / "run").marker_path("download", "00000").exists()


@pytest.mark.parametrize(
    "message",
    ["[Errno 28] No space left on device", "<urlopen error [Errno 5] Input/output error: '/scratch/000001'>"],
)
def test_a_local_read_or_write_error_in_a_record_fails_the_shard(
    clean_download: tuple[Path, RunResult], message: str
) -> None:
    pipeline, _ = clean_download
    stage = DownloadStage(load_config(pipeline))
    rows = pa.table({"uid": ["a", "b"], "url": ["http://x/a.jpg", "http://x/b.jpg"], "caption": ["a", "b"]})
    errors = ["HTTP Error 404: Not Found", message]
    results = pa.table({"uid": ["a", "b"], "status": ["failed_to_download"] * 2, "error_message": errors})
    with pytest.raises(DownloadError, match=r"row b: a local read or write failed: .*\[Errno"):
        stage.fates_from_results(rows, results)
    fates = stage.fates_from_results(rows.slice(0, 1), results.slice(0, 1))
    assert fates["reason"].to_pylist() == ["http_404"]


# ---------------------------------------------------------------- damaged outputs


def test_a_truncated_committed_tar_is_reported_damaged_and_redone(
    clean_download: tuple[Path, RunResult], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline, clean = clean_download
    run_dir = copy_run(clean, tmp_path / "run")
    tar = DownloadOutputs(run_dir).tar_path("00001")
    os.truncate(tar, tar.stat().st_size // 2)

    assert cli.main(["status", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"]["download"]["shards"]["damaged"] == 1
    assert cli.main(["status", str(run_dir)]) == 0
    assert re.search(r"download +done +\d+ +stale +0 +pending +0 +damaged +1\n", capsys.readouterr().out)

    redone = run_pipeline(load_config(pipeline, [*DOWNLOAD, f"output={run_dir}"]))
    assert redone.complete and redone.tasks_run >= 1
    assert tar.stat().st_size == DownloadOutputs(clean.layout.root).tar_path("00001").stat().st_size
    assert tar_uids(run_dir) == tar_uids(clean.layout.root)
    assert ledger_of(run_dir).equals(ledger_of(clean.layout.root))


def test_a_damaged_input_the_size_check_cannot_see_is_a_one_line_error_naming_the_file(
    clean_download: tuple[Path, RunResult], tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline, clean = clean_download
    run_dir = copy_run(clean, tmp_path / "run")
    tar = DownloadOutputs(run_dir).tar_path("00001")
    with open(tar, "r+b") as handle:  # same size, so download's marker still holds: the header is garbage
        handle.write(b"\xff" * tarfile.BLOCKSIZE)
    embed = [
        "stages=[input,download,embed]",
        "embed.model=curate-tiny",
        f"embed.pretrained={tiny_checkpoint}",
        "embed.batch_size=16",
    ]
    settings = [*DOWNLOAD, f"output={run_dir}", *embed]
    assert cli.main(["run", str(pipeline), "--no-progress", *set_options(*settings)]) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith("curate: error: stage 'embed' failed on shard 00001: ")
    assert f"{tar}: not a readable tar" in line


# ---------------------------------------------------------------- one writer per run directory


def process_state(pid: int) -> str:
    """The kernel's one-letter state of a process ("T" once it is stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


def tree(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")}


def test_a_second_run_on_the_same_output_refuses_naming_the_holder_and_status_still_reads(
    clean_download: tuple[Path, RunResult], tmp_path: Path
) -> None:
    pipeline, clean = clean_download
    run_dir = tmp_path / "run"
    settings = [*DOWNLOAD, f"output={run_dir}"]
    with open(tmp_path / "first.log", "wb") as log:  # a file, not a pipe nobody reads while the run is stopped
        command = [sys.executable, "-m", "tests.kill_during", "download:shards:00002:stop", str(pipeline), *settings]
        first = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log)
    try:
        holding = lambda: (run_dir / HOLDER_NAME).exists() and process_state(first.pid) == "T"  # noqa: E731
        wait_for(holding, "first run holding the lock, stopped before it commits download shard 00002", first)
        before = tree(run_dir)

        second = curate_cli("run", str(pipeline), "--no-progress", *set_options(*settings))
        assert second.returncode == 1
        holder = f"host {socket.gethostname()}, pid {first.pid}"
        assert error_line(second.stderr) == (
            f"curate: error: {run_dir}: another curate run is writing this directory ({holder})"
        )
        status = curate_cli("status", str(run_dir))
        assert status.returncode == 0, status.stderr[-2000:]
        assert re.search(r"download +done +2 +stale +0 +pending +\d+", status.stdout), status.stdout
        assert tree(run_dir) == before  # the refused run and the status wrote nothing, deleted nothing
    finally:
        os.kill(first.pid, signal.SIGCONT)
        try:
            first.wait(timeout=300)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert not (run_dir / HOLDER_NAME).exists()
    assert ledger_of(run_dir).equals(ledger_of(clean.layout.root))


# ---------------------------------------------------------------- leftovers of killed runs


@pytest.fixture(scope="module")
def finished(
    served_world: ServedWorld, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[str], RunResult]:
    """(pipeline, overrides, run) of one finished run up to materialize, which the tests copy."""
    folder = tmp_path_factory.mktemp("finished")
    pipeline = served_world.pipeline(folder, output=folder / "run")
    settings = [*full_pipeline_overrides(tiny_checkpoint), "materialize.samples_per_shard=10"]
    result = run_pipeline(load_config(pipeline, settings))
    assert result.complete and len(CuratedOutputs(result.layout).shards()) >= 2
    return pipeline, settings, result


def leftovers(run_dir: Path) -> list[str]:
    """Every scratch name in the run: stage scratch folders and `.NAME.HEX.tmp` files and folders."""
    layout = RunLayout(run_dir)
    found = (p for p in run_dir.rglob("*") if is_scratch_name(p.name) or p == layout.scratch_dir(p.parent.name))
    return sorted(str(p.relative_to(run_dir)) for p in found)


def test_leftovers_of_killed_runs_are_swept_at_the_start_of_the_next_run(
    finished: tuple[Path, list[str], RunResult], tmp_path: Path
) -> None:
    pipeline, settings, result = finished
    run_dir = copy_run(result, tmp_path / "run")
    for name in ["dedup", "ledger", "materialize", "curated"]:
        shutil.rmtree(run_dir / name)
    (run_dir / "ledger.parquet").unlink()
    settings = [*settings, f"output={run_dir}"]

    def killed_at(where: str) -> list[str]:
        command = [sys.executable, "-m", "tests.kill_during", where, str(pipeline), *settings]
        killed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        return leftovers(run_dir)

    plan_marker = RunLayout(run_dir).marker_path("dedup", "all", "plan")
    left = killed_at(f"write:{plan_marker.relative_to(run_dir)}")  # dedup's plan is in place, unmarked
    marker_scratch = [p for p in left if re.fullmatch(r"dedup/_done/plan/\.all\.json\.[0-9a-f]{8}\.tmp", p)]
    assert marker_scratch, left

    left = killed_at("materialize:shards:00001")  # a partial output shard in materialize's scratch
    assert not set(marker_scratch) & set(left)  # swept when this run started
    assert "materialize/_tmp" in left and list((run_dir / "materialize" / "_tmp").glob("00001.*/00001.tar"))
    (run_dir / ".ledger.parquet.1234abcd.tmp").write_bytes(b"half a ledger")  # a killed atomic write
    (run_dir / ".curated.1234abcd.old.tmp").mkdir()  # a folder replace_dir had retired
    (run_dir / ".curated.1234abcd.old.tmp" / "00000.tar").write_bytes(b"old")

    resumed = run_pipeline(load_config(pipeline, settings))
    assert resumed.complete
    assert leftovers(run_dir) == []
    assert ledger_of(run_dir).equals(ledger_of(result.layout.root))
    curated = [np.load(CuratedOutputs(run).uids_path).tolist() for run in (run_dir, result.layout.root)]
    assert curated[0] == curated[1]


# ---------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize(
    ("extra", "interrupt_when"),
    [
        ([], "marker"),  # between shards or while fetching
        # inside img2dataset's own loop, over a shard larger than its window of 2 x threads rows
        (["input.shard_size=1000", "download.guarded_fetch=false", "download.threads=4"], "img2dataset"),
    ],
    ids=["after-a-marker", "inside-img2dataset"],
)
def test_ctrl_c_exits_130_with_one_line_and_the_same_command_resumes(
    clean_download: tuple[Path, RunResult], tmp_path: Path, extra: list[str], interrupt_when: str
) -> None:
    pipeline, clean = clean_download
    run_dir = tmp_path / "run"
    settings = [*DOWNLOAD, *extra, f"output={run_dir}"]
    command = [sys.executable, "-m", "curate", "run", str(pipeline), "--no-progress", *set_options(*settings)]
    with open(tmp_path / "stdout.log", "wb") as out, open(tmp_path / "stderr.log", "wb") as err:
        # the default Ctrl-C disposition, whatever this test process inherited or was left with
        run = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err, preexec_fn=default_sigint)
    try:
        download = DownloadOutputs(run_dir).folder
        if interrupt_when == "marker":
            wait_for(lambda: any(download.glob("_done/*.json")), "download marker", run)
        else:
            wait_for(lambda: any(download.glob("_tmp/*/00000.tar")), "tar img2dataset writes", run)
            time.sleep(0.5)  # its window of rows is full: the row generator waits for the loop
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=60) == 130
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert error_line((tmp_path / "stderr.log").read_text()) == (
        "curate: interrupted; run the same command again to resume"
    )
    assert not (run_dir / "ledger.parquet").exists() and not (run_dir / HOLDER_NAME).exists()

    resumed = run_pipeline(load_config(pipeline, settings))
    assert resumed.complete and resumed.tasks_run > 0
    if not extra:
        assert ledger_of(run_dir).equals(ledger_of(clean.layout.root))


# ---------------------------------------------------------------- errors found late, now found first


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (["download.encode_format=png", "download.encode_quality=90"], "download.encode_quality"),
        (["validate.warmup_steps=1000"], "validate.warmup_steps: must be less than the run's"),
        (["embed.model=ViT-B-32", "embed.pretrained=laion2b_s34b_b79k"], "embed.pretrained"),
        (["embed.device=cuda"], "embed.device is 'cuda' but"),
    ],
    ids=["png-quality", "warmup-steps", "uncached-tag", "cuda"],
)
def test_late_errors_are_config_errors_before_any_network_traffic(
    served_world: ServedWorld, tiny_checkpoint: Path, tmp_path: Path, settings: list[str], expected: str
) -> None:
    pipeline = served_world.pipeline(tmp_path, output=tmp_path / "run")
    every_stage = "stages=[input,download,embed,filter,dedup,materialize,validate]"
    requests = served_world.server.hits.total()
    command = ["run", str(pipeline), *set_options(*full_pipeline_overrides(tiny_checkpoint), every_stage, *settings)]
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty-hf-home")}  # no weights cached for any tag
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "curate", *command], cwd=REPO, capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 2, done.stderr[-3000:]
    line = error_line(done.stderr)
    assert line.startswith("curate: error: ") and expected in line
    assert not (tmp_path / "run").exists()
    assert served_world.server.hits.total() == requests
    assert time.perf_counter() - started < 60
