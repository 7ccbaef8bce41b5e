"""Download stage: one input shard -> one webdataset tar shard, with a fate for every row.

We drive img2dataset's own shard downloader (resize, encode, hash, tar + parquet writer) one shard at a
time, so that the shard is our unit of work, retry and resume. With `download.guarded_fetch` (the
default) the fetching is ours (`curate.stages.fetch`: address guard, deadline, byte cap, robots.txt, opt-outs,
retries): the shard's rows are fetched into scratch files first and img2dataset reads those files, while
the tar and parquet still record each row's real URL. Without it img2dataset fetches as it always has.
Every row's outcome is mapped to a fate with a normalised reason code.

Scratch (the fetched bodies, the table img2dataset reads) lives in the worker's own temp directory
(`tempfile.gettempdir()` of the process running the task), never in the run directory: a worker needs no
shared filesystem for it, and the original images do not pass through the run's storage.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from curate.config import DownloadConfig
from curate.io.wds import iter_samples
from curate.ledger import Status, empty_fates, make_fates
from curate.stage import Stage, StageContext, StageOutputs
from curate.stages.fetch import Fetched, FetchFailure, FetchOutcome, GuardedFetcher
from curate.stages.input import InputOutputs

if TYPE_CHECKING:
    from curate.config import PipelineConfig

log = logging.getLogger(__name__)

# img2dataset imports albumentations, which otherwise asks PyPI for a newer version on import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# (pattern on img2dataset's error message, status, reason); first match wins.
ERROR_REASONS: list[tuple[re.Pattern[str], Status, str]] = [
    (re.compile(r"X-Robots-Tag", re.I), Status.DROPPED, "opt_out"),
    (re.compile(r"image too small", re.I), Status.DROPPED, "min_side"),
    (re.compile(r"aspect ratio too large", re.I), Status.DROPPED, "max_aspect_ratio"),
    (re.compile(r"image area too large", re.I), Status.DROPPED, "max_image_area"),
    (re.compile(r"timed? ?out", re.I), Status.FAILED, "timeout"),
    (re.compile(r"decompression ?bomb|exceeds limit", re.I), Status.FAILED, "decompression_bomb"),
    (
        re.compile(r"decod|cannot identify image|truncated|broken data|imdecode|corrupt", re.I),
        Status.FAILED,
        "decode_error",
    ),
    (re.compile(r"hash mismatch", re.I), Status.FAILED, "hash_mismatch"),
    (
        re.compile(
            r"refused|reset|Name or service|nodename|getaddrinfo|Remote end closed|unreachable"
            r"|No route|EOF occurred|connection",
            re.I,
        ),
        Status.FAILED,
        "connection_error",
    ),
    (re.compile(r"certificate|SSL", re.I), Status.FAILED, "ssl_error"),
    (re.compile(r"unknown url type|no host given|InvalidURL", re.I), Status.FAILED, "invalid_url"),
]
_HTTP_STATUS = re.compile(r"HTTP Error (\d{3})")


def classify_error(message: str | None) -> tuple[Status, str]:
    """img2dataset's free-text error message -> (status, snake_case reason)."""
    text = message or ""
    http = _HTTP_STATUS.search(text)
    if http:
        return Status.FAILED, f"http_{http.group(1)}"
    for pattern, status, reason in ERROR_REASONS:
        if pattern.search(text):
            return status, reason
    return Status.FAILED, "download_error"


class DownloadError(RuntimeError):
    """img2dataset gave up on a whole shard (not an image-level failure)."""


# The URL handed to img2dataset for a row the guarded fetch already failed: urllib refuses the unknown
# scheme without any I/O, so the row still gets its key and parquet record, and our writer records why.
FETCH_FAILED_URL = "curate-fetch-failed:"


class DownloadOutputs(StageOutputs):
    stage = "download"

    def tar_path(self, shard: str) -> Path:
        return self.folder / f"{shard}.tar"

    def results_path(self, shard: str) -> Path:
        """img2dataset's per-shard parquet of statuses and hashes."""
        return self.folder / f"{shard}.parquet"

    @property
    def retries_path(self) -> Path:
        return self.folder / "retries.json"

    def retry_attempts(self) -> list[dict[str, Any]]:
        """The `curate retry` attempts made on this run's download, oldest first (see curate.retry)."""
        try:
            return list(self.layout.read_json(self.retries_path)["attempts"])
        except FileNotFoundError:
            return []


class DownloadStage(Stage):
    name = "download"
    speed_only = frozenset({"threads", "processes", "per_host_connections"})
    outputs = DownloadOutputs
    shard_local = True

    def __init__(self, config: PipelineConfig) -> None:
        super().__init__(config)
        self._fetcher: GuardedFetcher | None = None

    @property
    def cfg(self) -> DownloadConfig:
        return self.config.download

    def workers(self) -> int:
        return self.cfg.processes

    def setup(self) -> None:
        """Once per worker: the guarded fetcher's connections and robots.txt cache serve every shard."""
        if self.cfg.guarded_fetch and self._fetcher is None:
            self._fetcher = GuardedFetcher(self.cfg)

    def expected_uids(self, ctx: StageContext, shard: str) -> pa.Array:
        return InputOutputs(ctx.layout).rows(shard)["uid"].combine_chunks()

    def process_shard(self, ctx: StageContext, shard: str, workdir: Path) -> pa.Table:
        inputs = InputOutputs(ctx.layout)
        rows = with_kept_columns(inputs.rows(shard), inputs.kept_columns(shard))
        if rows.num_rows == 0:
            return empty_fates()
        shard_size = int(inputs.manifest()["shard_size"])  # type: ignore[index]
        return self.download_rows(rows, shard, workdir, max(shard_size, rows.num_rows))

    def download_rows(self, rows: pa.Table, shard: str, workdir: Path, samples_per_shard: int) -> pa.Table:
        """Fetch, resize and write `rows` into workdir/<shard>.tar and .parquet; one fate per row."""
        if not self.cfg.guarded_fetch:
            results = self._run_img2dataset(rows, shard, workdir, samples_per_shard, WebDatasetWriter())
            fates = self.fates_from_results(rows, results)
        else:
            fates = self._download_guarded(rows, shard, workdir, samples_per_shard)
        check_tar_matches_fates(workdir / f"{shard}.tar", fates)
        return fates

    def _download_guarded(self, rows: pa.Table, shard: str, workdir: Path, samples_per_shard: int) -> pa.Table:
        """Guarded fetch into scratch files, then img2dataset over those files (resize, hash, write)."""
        uids, urls = rows["uid"].to_pylist(), rows["url"].to_pylist()
        with tempfile.TemporaryDirectory(prefix=f"curate-fetch-{shard}-", ignore_cleanup_errors=True) as scratch:
            outcomes = self.fetch_rows(rows, Path(scratch))
            handed = rows.set_column(rows.schema.get_field_index("url"), "url", pa.array(local_urls(uids, outcomes)))
            writer = SourceRecordingWriter(dict(zip(uids, urls, strict=True)), outcomes)
            results = self._run_img2dataset(handed, shard, workdir, samples_per_shard, writer)
        restate_error_counts(workdir / f"{shard}_stats.json", results)
        return self.fates_from_results(rows, results, outcomes)

    def fetch_rows(self, rows: pa.Table, fetch_dir: Path) -> dict[str, FetchOutcome]:
        """Guarded fetch of every row into `fetch_dir`, `threads` at a time: uid -> file or failure."""
        if self._fetcher is None:
            self.setup()
        fetcher = self._fetcher
        assert fetcher is not None
        fetch_dir.mkdir(parents=True, exist_ok=True)
        uids, urls = rows["uid"].to_pylist(), rows["url"].to_pylist()
        paths = [fetch_dir / f"{i:06d}" for i in range(len(urls))]
        pool = ThreadPoolExecutor(max_workers=self.cfg.threads, thread_name_prefix="fetch")
        try:
            outcomes = list(pool.map(fetcher.fetch_to_file, urls, paths))
        finally:  # on Ctrl-C or an error, wait for the fetches under way, not for the rest of the shard
            pool.shutdown(cancel_futures=True)
        failed = sum(isinstance(outcome, FetchFailure) for outcome in outcomes)
        log.debug("guarded fetch: %d of %d rows fetched", len(outcomes) - failed, len(outcomes))
        return dict(zip(uids, outcomes, strict=True))

    def _run_img2dataset(
        self, rows: pa.Table, shard: str, workdir: Path, samples_per_shard: int, writer: WriterFactory
    ) -> pa.Table:
        """img2dataset's shard downloader over `rows`: fetch (or read the local file), resize, hash, write."""
        guard = WriteGuard(writer)
        downloader = self._downloader(str(workdir), samples_per_shard, guard)
        downloader.resizer = guard.resizer(downloader.resizer)
        with tempfile.TemporaryDirectory(prefix=f"curate-download-{shard}-", ignore_cleanup_errors=True) as scratch:
            arrow_path = Path(scratch) / "input.arrow"  # the shard's rows as img2dataset reads them
            with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_file(sink, rows.schema) as arrow_writer:
                arrow_writer.write_table(rows)
            try:  # not `downloader(...)`, which prints the shard's exception and returns only a flag
                run_abandoning_on_interrupt(lambda: downloader.download_shard((int(shard), str(arrow_path))), guard)
            except WriteFailed as err:
                cause = err.__cause__
                raise DownloadError(f"writing its tar and parquet in {workdir} failed: {cause}") from cause
            except Exception as err:
                raise DownloadError(f"img2dataset could not process the shard: {err}") from err
        return pq.read_table(workdir / f"{shard}.parquet")

    def _downloader(self, output_folder: str, samples_per_shard: int, writer: WriterFactory):  # type: ignore[no-untyped-def]
        from img2dataset.downloader import Downloader
        from img2dataset.resizer import Resizer

        cfg = self.cfg
        resizer = Resizer(
            image_size=cfg.image_size,
            resize_mode=cfg.resize_mode,
            resize_only_if_bigger=cfg.resize_only_if_bigger,
            encode_quality=cfg.encode_quality,
            encode_format=cfg.encode_format,
            min_image_size=cfg.min_image_size,
            max_image_area=cfg.max_image_area,
            max_aspect_ratio=cfg.max_aspect_ratio,
        )
        guarded = cfg.guarded_fetch  # img2dataset then reads local files: retries and opt-outs are done
        return Downloader(
            sample_writer_class=writer,
            resizer=resizer,
            thread_count=cfg.threads,
            save_caption=True,
            extract_exif=cfg.extract_exif,
            output_folder=output_folder,
            column_list=["url", "caption", "uid", *self.config.input.keep_columns],  # its save_additional_columns
            timeout=cfg.timeout,
            number_sample_per_shard=samples_per_shard,
            oom_shard_count=5,
            compute_hash=cfg.compute_hash,
            verify_hash_type=None,
            encode_format=cfg.encode_format,
            retries=0 if guarded else cfg.retries,
            user_agent_token=cfg.user_agent_token,
            disallowed_header_directives=None if guarded else (cfg.disallowed_header_directives or None),
        )

    def fates_from_results(
        self, rows: pa.Table, results: pa.Table, fetched: dict[str, FetchOutcome] | None = None
    ) -> pa.Table:
        """One fate per row: the guarded fetch's failure if it had one, else img2dataset's record."""
        by_uid = {r["uid"]: r for r in results.to_pylist()}
        fetched = fetched or {}
        statuses, reasons, details, hashes, widths, heights = [], [], [], [], [], []
        for uid in rows["uid"].to_pylist():
            outcome = fetched.get(uid)
            result = None if isinstance(outcome, FetchFailure) else by_uid.get(uid)
            if isinstance(outcome, FetchFailure):
                status, reason, detail = outcome.status, outcome.reason, outcome.detail
            elif result is None:  # img2dataset swallowed an exception while handling this row
                raise DownloadError(f"img2dataset wrote no record for row {uid} (see the error it printed above)")
            elif result["status"] == "success":
                status, reason, detail = Status.KEPT, None, None
                if isinstance(outcome, Fetched) and outcome.attempts > 1:
                    detail = f"fetched after {outcome.attempts} attempts"
            else:
                detail = result.get("error_message") or result["status"]
                if is_local_io_error(detail):
                    raise DownloadError(f"row {uid}: a local read or write failed: {detail}")
                status, reason = classify_error(detail)
            statuses.append(status.value)
            reasons.append(reason)
            details.append(detail)
            hashes.append(result.get(self.cfg.compute_hash or "", None) if result else None)
            widths.append(_int_or_none(result, "original_width"))
            heights.append(_int_or_none(result, "original_height"))
        return make_fates(
            rows["uid"],
            statuses,
            reasons,
            details,
            sha256=hashes if self.cfg.compute_hash == "sha256" else None,
            width=widths,
            height=heights,
        )


def with_kept_columns(rows: pa.Table, kept: pa.Table | None) -> pa.Table:
    """`rows` with the input's kept columns (joined by uid) in a form img2dataset can write into a json."""
    if kept is None:
        return rows
    import pyarrow.compute as pc

    where = pc.index_in(rows["uid"], value_set=kept["uid"].combine_chunks())
    for field in kept.schema:
        if field.name != "uid":
            rows = rows.append_column(field.name, json_ready(kept[field.name].combine_chunks().take(where)))
    return rows


def json_ready(array: pa.Array) -> pa.Array:
    """Values json.dumps can write (img2dataset's writer would drop the sample otherwise): timestamps,
    decimals, bytes and other non-JSON types become text."""
    if _is_json_native(array.type):
        return array
    if pa.types.is_float16(array.type):
        return array.cast(pa.float32())
    try:
        return array.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        texts = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in array.to_pylist()]
        return pa.array([None if v is None else str(v) for v in texts], pa.string())


def _is_json_native(kind: pa.DataType) -> bool:
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _is_json_native(kind.value_type)
    if pa.types.is_struct(kind):
        return all(_is_json_native(kind.field(i).type) for i in range(kind.num_fields))
    simple = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_boolean, pa.types.is_null)
    return any(check(kind) for check in simple) or (pa.types.is_floating(kind) and not pa.types.is_float16(kind))


def local_urls(uids: list[str], outcomes: dict[str, FetchOutcome]) -> list[str]:
    """What img2dataset reads for each row: the fetched file, or a placeholder it refuses at once."""
    return [
        outcome.path.resolve().as_uri() if isinstance(outcome, Fetched) else FETCH_FAILED_URL + uid
        for uid, outcome in ((uid, outcomes[uid]) for uid in uids)
    ]


class WriterFactory(Protocol):
    def __call__(
        self, shard_id: int, output_folder: str, save_caption: bool, oom_shard_count: int, schema: pa.Schema, fmt: str
    ) -> Any: ...


class WebDatasetWriter:
    """img2dataset's own webdataset writer, imported when a shard is written (img2dataset is heavy)."""

    def __call__(self, *args: Any) -> Any:
        from img2dataset.writer import WebDatasetSampleWriter

        return WebDatasetSampleWriter(*args)


class SourceRecordingWriter:
    """img2dataset's webdataset writer, recording each row's source URL (not the local file img2dataset
    read) and, for rows the guarded fetch failed, its reason instead of img2dataset's placeholder error."""

    def __init__(self, source_urls: dict[str, str], outcomes: dict[str, FetchOutcome]) -> None:
        self.source_urls, self.outcomes = source_urls, outcomes

    def __call__(self, *args: Any) -> _SourceRecordingSampleWriter:
        return _SourceRecordingSampleWriter(WebDatasetWriter()(*args), self.source_urls, self.outcomes)


class _SourceRecordingSampleWriter:
    def __init__(self, inner: Any, source_urls: dict[str, str], outcomes: dict[str, FetchOutcome]) -> None:
        self.inner, self.source_urls, self.outcomes = inner, source_urls, outcomes

    def write(self, img_str: bytes | None, key: str, caption: str | None, meta: dict[str, Any]) -> None:
        uid = meta["uid"]
        meta["url"] = self.source_urls[uid]
        outcome = self.outcomes[uid]
        if isinstance(outcome, FetchFailure):
            meta["status"], meta["error_message"] = "failed_to_download", f"{outcome.reason}: {outcome.detail}"
        self.inner.write(img_str, key, caption, meta)

    def close(self) -> None:
        self.inner.close()


def restate_error_counts(stats_path: Path, results: pa.Table) -> None:
    """img2dataset counted its placeholder errors; count the recorded messages instead."""
    stats = json.loads(stats_path.read_text())
    messages = results["error_message"].to_pylist()
    stats["status_dict"] = dict(Counter(message or "success" for message in messages).most_common())
    stats_path.write_text(json.dumps(stats, indent=4))


def _int_or_none(result: dict | None, key: str) -> int | None:
    if not result or result.get(key) is None:
        return None
    value = result[key]
    return None if isinstance(value, float) and math.isnan(value) else int(value)


# Errors of this machine's disks and file table, not of the row's URL: they fail the shard, never a row.
_LOCAL_IO_ERRNOS = (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EMFILE, errno.ENFILE)
_LOCAL_IO_ERROR = re.compile("|".join(re.escape(os.strerror(code)) for code in _LOCAL_IO_ERRNOS), re.I)


def is_local_io_error(message: str | None) -> bool:
    """Whether img2dataset's per-row message is a local read or write error (a full disk, an I/O error)."""
    text = message or ""
    return not _HTTP_STATUS.search(text) and _LOCAL_IO_ERROR.search(text) is not None


class WriteFailed(Exception):
    """Raised from the sample writer's close() with the first write error as its cause."""


class WriteGuard:
    """Wraps a writer factory so that a failed write fails the shard: img2dataset catches every exception of
    a sample (ENOSPC included), prints it and goes on, leaving a tar with holes and a shard marked a success.
    The first error is kept, later writes are skipped, and close() raises it, outside img2dataset's catch.
    Once `abandoned`, nothing more is written."""

    def __init__(self, writer: WriterFactory) -> None:
        self.writer = writer
        self.abandoned = False

    def __call__(self, *args: Any) -> _GuardedSampleWriter:
        return _GuardedSampleWriter(self.writer(*args), self)

    def resizer(self, inner: Callable[..., tuple[Any, ...]]) -> Callable[..., tuple[Any, ...]]:
        """img2dataset's resizer, which once abandoned refuses every image at once, so the loop drains fast."""

        def resize(*args: Any) -> tuple[Any, ...]:
            if self.abandoned:
                return None, None, None, None, None, "interrupted"
            return inner(*args)

        return resize


class _GuardedSampleWriter:
    def __init__(self, inner: Any, guard: WriteGuard) -> None:
        self.inner, self.guard = inner, guard
        self.error: Exception | None = None

    def write(self, img_str: bytes | None, key: str, caption: str | None, meta: dict[str, Any]) -> None:
        if self.error is not None or self.guard.abandoned:
            return
        try:
            self.inner.write(img_str, key, caption, meta)
        except Exception as err:
            log.debug("writing sample %s failed: %s", key, err)
            self.error = err

    def close(self) -> None:
        try:
            self.inner.close()
        except Exception as err:
            self.error = self.error or err
        if self.error is not None:
            raise WriteFailed(str(self.error)) from self.error


def run_abandoning_on_interrupt(work: Callable[[], None], guard: WriteGuard) -> None:
    """Run img2dataset's shard loop in a thread and wait for it here. A Ctrl-C must not land inside that loop:
    its thread pool would then wait forever (now, or at exit) for a row generator blocked on a semaphore that
    only the loop releases. On Ctrl-C the loop is told to resize and write nothing more, and is waited for
    while it drains (its rows' reads or fetches under way); a second Ctrl-C leaves it behind."""
    failure: list[BaseException] = []
    finished = threading.Event()  # not Thread.join: a join interrupted by Ctrl-C marks the thread stopped

    def target() -> None:
        try:
            work()
        except BaseException as err:  # handed to the waiting thread
            failure.append(err)
        finally:
            finished.set()

    threading.Thread(target=target, name="img2dataset-shard", daemon=True).start()
    try:
        while not finished.wait(0.1):
            pass
    except KeyboardInterrupt:
        guard.abandoned = True
        log.warning("interrupted: letting img2dataset's loop over this shard drain (Ctrl-C again to leave it)")
        finished.wait()
        raise
    if failure:
        raise failure[0]


def check_tar_matches_fates(tar: Path, fates: pa.Table) -> None:
    """Before commit: the tar holds exactly the samples the fates keep, each with an image, a .txt and a .json."""
    statuses = fates["status"].to_pylist()
    kept = {uid for uid, status in zip(fates["uid"].to_pylist(), statuses, strict=True) if status == Status.KEPT}
    if not tar.exists():
        if kept:
            raise DownloadError(f"img2dataset wrote no tar ({tar.name}) for {len(kept)} downloaded rows")
        return
    try:
        samples = list(iter_samples(tar, read=()))
    except ValueError as err:  # TarReadError among them: a member cut short, a sample without its .json
        raise DownloadError(f"the written tar is unreadable: {err}") from err
    for sample in samples:
        missing = [extension for extension in ("txt", "json") if extension not in sample.spans]
        if sample.image_extension is None:
            missing.insert(0, "image")
        if missing:
            raise DownloadError(f"{tar.name}: sample {sample.key!r} (uid {sample.uid}) has no {', '.join(missing)}")
    found = {sample.uid for sample in samples}
    if found != kept:
        extra, lost = sorted(found - kept), sorted(kept - found)
        raise DownloadError(
            f"{tar.name} holds {len(found)} samples but the fates keep {len(kept)}"
            + (f"; not kept but in the tar: {extra[:3]}" if extra else "")
            + (f"; kept but not in the tar: {lost[:3]}" if lost else "")
        )
