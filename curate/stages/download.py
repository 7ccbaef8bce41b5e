"""Download stage: one input shard -> one webdataset tar shard, with a fate for every row.

We drive img2dataset's own shard downloader (resize, encode, hash, tar + parquet writer) one shard at a
time, so that the shard is our unit of work, retry and resume. With `download.guarded_fetch` (the
default) the fetching is ours (`curate.stages.fetch`: address guard, deadline, byte cap, robots.txt, opt-outs,
retries): the shard's rows are fetched into scratch files first and img2dataset reads those files, while
the tar and parquet still record each row's real URL. Without it img2dataset fetches as it always has.
Every row's outcome is mapped to a fate with a normalised reason code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from curate.config import DownloadConfig
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


class DownloadStage(Stage):
    name = "download"
    speed_only = frozenset({"threads", "processes", "per_host_connections"})
    outputs = DownloadOutputs

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
        rows = inputs.rows(shard)
        if rows.num_rows == 0:
            return empty_fates()
        shard_size = int(inputs.manifest()["shard_size"])  # type: ignore[index]
        samples_per_shard = max(shard_size, rows.num_rows)
        if not self.cfg.guarded_fetch:
            results = self._run_img2dataset(rows, shard, workdir, samples_per_shard, WebDatasetWriter())
            return self.fates_from_results(rows, results)
        return self._download_guarded(rows, shard, workdir, samples_per_shard)

    def _download_guarded(self, rows: pa.Table, shard: str, workdir: Path, samples_per_shard: int) -> pa.Table:
        """Guarded fetch into scratch files, then img2dataset over those files (resize, hash, write)."""
        uids, urls = rows["uid"].to_pylist(), rows["url"].to_pylist()
        fetch_dir = workdir / "_fetched"
        try:
            outcomes = self.fetch_rows(rows, fetch_dir)
            handed = rows.set_column(rows.schema.get_field_index("url"), "url", pa.array(local_urls(uids, outcomes)))
            writer = SourceRecordingWriter(dict(zip(uids, urls, strict=True)), outcomes)
            results = self._run_img2dataset(handed, shard, workdir, samples_per_shard, writer)
        finally:
            shutil.rmtree(fetch_dir, ignore_errors=True)
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
        with ThreadPoolExecutor(max_workers=self.cfg.threads, thread_name_prefix="fetch") as pool:
            outcomes = list(pool.map(fetcher.fetch_to_file, urls, paths))
        failed = sum(isinstance(outcome, FetchFailure) for outcome in outcomes)
        log.debug("guarded fetch: %d of %d rows fetched", len(outcomes) - failed, len(outcomes))
        return dict(zip(uids, outcomes, strict=True))

    def _run_img2dataset(
        self, rows: pa.Table, shard: str, workdir: Path, samples_per_shard: int, writer: WriterFactory
    ) -> pa.Table:
        """img2dataset's shard downloader over `rows`: fetch (or read the local file), resize, hash, write."""
        arrow_path = workdir / "_input.arrow"
        with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_file(sink, rows.schema) as arrow_writer:
            arrow_writer.write_table(rows)
        downloader = self._downloader(str(workdir), samples_per_shard, writer)
        succeeded, _ = downloader((int(shard), str(arrow_path)))
        arrow_path.unlink(missing_ok=True)
        if not succeeded:
            raise DownloadError(f"img2dataset could not process shard {shard} (see its log above)")
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
            column_list=["url", "caption", "uid"],
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
            elif result is None:
                status, reason, detail = (
                    Status.FAILED,
                    "download_error",
                    "img2dataset wrote no record for this row",
                )
            elif result["status"] == "success":
                status, reason, detail = Status.KEPT, None, None
                if isinstance(outcome, Fetched) and outcome.attempts > 1:
                    detail = f"fetched after {outcome.attempts} attempts"
            else:
                detail = result.get("error_message") or result["status"]
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
