"""Download stage: img2dataset fetches and resizes one input shard into a webdataset tar shard.

We drive img2dataset's own shard downloader (fetch, resize, encode, hash, tar + parquet writer) one
shard at a time, so that the shard is our unit of work, retry and resume, and map every row's
img2dataset status and error message to a fate with a normalised reason code.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from curate.config import DownloadConfig
from curate.input import read_manifest, read_shard_rows
from curate.ledger import Status, empty_fates, make_fates
from curate.stage import StageContext

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


class DownloadStage:
    name: ClassVar[str] = "download"
    upstream: ClassVar[str] = "input"

    def __init__(self, cfg: DownloadConfig) -> None:
        self.cfg = cfg

    def setup(self) -> None:
        pass

    def expected_uids(self, ctx: StageContext, shard: str) -> pa.Array:
        return read_shard_rows(ctx.layout.stage_dir(self.upstream), shard)["uid"].combine_chunks()

    def process_shard(self, ctx: StageContext, shard: str, workdir: Path) -> pa.Table:
        rows = read_shard_rows(ctx.layout.stage_dir(self.upstream), shard)
        if rows.num_rows == 0:
            return empty_fates()
        shard_size = int(read_manifest(ctx.layout.stage_dir(self.upstream))["shard_size"])  # type: ignore[index]
        arrow_path = workdir / "_input.arrow"
        with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_file(sink, rows.schema) as writer:
            writer.write_table(rows)
        downloader = self._downloader(str(workdir), max(shard_size, rows.num_rows))
        succeeded, _ = downloader((int(shard), str(arrow_path)))
        arrow_path.unlink(missing_ok=True)
        if not succeeded:
            raise DownloadError(f"img2dataset could not process shard {shard} (see its log above)")
        return self.fates_from_results(rows, pq.read_table(workdir / f"{shard}.parquet"))

    def _downloader(self, output_folder: str, samples_per_shard: int):  # type: ignore[no-untyped-def]
        from img2dataset.downloader import Downloader
        from img2dataset.resizer import Resizer
        from img2dataset.writer import WebDatasetSampleWriter

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
        return Downloader(
            sample_writer_class=WebDatasetSampleWriter,
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
            retries=cfg.retries,
            user_agent_token=cfg.user_agent_token,
            disallowed_header_directives=cfg.disallowed_header_directives or None,
        )

    def fates_from_results(self, rows: pa.Table, results: pa.Table) -> pa.Table:
        by_uid = {r["uid"]: r for r in results.to_pylist()}
        statuses, reasons, details, hashes, widths, heights = [], [], [], [], [], []
        for uid in rows["uid"].to_pylist():
            result = by_uid.get(uid)
            if result is None:
                status, reason, detail = (
                    Status.FAILED,
                    "download_error",
                    "img2dataset wrote no record for this row",
                )
            elif result["status"] == "success":
                status, reason, detail = Status.KEPT, None, None
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


def _int_or_none(result: dict | None, key: str) -> int | None:
    if not result or result.get(key) is None:
        return None
    value = result[key]
    return None if isinstance(value, float) and math.isnan(value) else int(value)
