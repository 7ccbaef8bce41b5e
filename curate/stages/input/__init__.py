"""Input stage: read URL/caption tables as streams, validate, give each row a stable uid, shard them.

File-level problems (missing column, wrong type, empty or corrupt file, duplicate uids) raise InputError
and leave the run directory as it was. Row-level problems become fates:

- url null, empty, longer than `input.max_url_chars`, not http(s), no host, or containing whitespace
  -> failed / invalid_url
- caption that is not valid UTF-8 -> failed / invalid_caption
- caption longer than `input.max_caption_chars` -> dropped / caption_too_long (the ledger keeps its
  first `max_caption_chars` characters)
- control characters in a caption are replaced by spaces and runs of whitespace collapsed; the row is
  kept and its ledger `detail` says so. A null caption is read as "".
- an exact repeat of an earlier (url, caption) pair (after cleaning, across shards and files)
  -> dropped / dup_url_caption, detail = the uid of the first occurrence

With `input.uid_col`, that column (text or integers, trimmed) is the uid and must be unique over all
files. Without it, a row's uid is blake2b-128 (hex) of "<file name>\\x1f<row number in the file>"
(rows counted from 0, blank jsonl lines not counted): stable across runs, unique while file names are.

`sources` finds and reads the files (local paths or fsspec URLs, through `curate.io.storage`), `rows`
decides row-level fates and uids, `columns` carries `input.keep_columns`, and `stage` runs it all as phases
of tasks (per file, per hash bucket, per shard).
"""

from curate.stages.input.rows import decode_utf8, generated_uids, string_hashes, url_caption_hashes, validate_batch
from curate.stages.input.sources import (
    InputError,
    SourceFile,
    check_columns,
    inspect_sources,
    open_table_reader,
    resolve_sources,
)
from curate.stages.input.stage import (
    SHARD_SCHEMA,
    STAGE,
    InputOutputs,
    InputStage,
    discard_unfinished,
    input_fingerprint,
    plan_file_tasks,
    read_manifest,
    read_shard_rows,
)

__all__ = [
    "SHARD_SCHEMA",
    "STAGE",
    "InputError",
    "InputOutputs",
    "InputStage",
    "SourceFile",
    "check_columns",
    "decode_utf8",
    "discard_unfinished",
    "generated_uids",
    "input_fingerprint",
    "inspect_sources",
    "open_table_reader",
    "plan_file_tasks",
    "read_manifest",
    "read_shard_rows",
    "resolve_sources",
    "string_hashes",
    "url_caption_hashes",
    "validate_batch",
]
