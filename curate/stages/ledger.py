"""The ledger: every input row once, with the fate the last stage that decided it gave. Not a stage users list:
the pipeline runs it right after the last stage that decides fates.

Phases: `parts` merges each shard's fates into its ledger rows (one task per shard: a uid never changes shard)
and counts its (stage, status, reason, detail) combinations; `merge` streams the parts into `ledger.parquet`
and sums the counts into `ledger/details.json`, which `curate status` reads instead of the ledger itself.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from curate.io.fs import write_json_atomic
from curate.ledger import (
    FateError,
    Status,
    add_kept_columns,
    ledger_schema,
    ledger_table,
    merge_ledger,
    read_fate_parts,
)
from curate.stage import Phase, Stage, StageContext, StageOutputs, TaskOutput, run_shards, single_task

LEDGER = "ledger"
DETAILS_PER_REASON = 3
DETAIL_CHARS = 160


class LedgerOutputs(StageOutputs):
    stage = LEDGER

    @property
    def path(self) -> Path:
        return self.layout.ledger_path

    def part_path(self, shard: str) -> Path:
        return self.folder / "parts" / f"{shard}.parquet"

    def part_details_path(self, shard: str) -> Path:
        return self.folder / "parts" / f"{shard}.details.json"

    @property
    def details_path(self) -> Path:
        return self.folder / "details.json"

    def details(self) -> dict[str, Any] | None:
        """{"stage/status/reason": {"rows": n, "details": {detail: rows, ...}}} of the finished ledger."""
        try:
            return self.layout.read_json(self.details_path)
        except FileNotFoundError:
            return None


class LedgerStage(Stage):
    name = LEDGER
    decides_fates = False
    default = False
    outputs = LedgerOutputs

    def phases(self) -> list[Phase]:
        return [
            Phase("parts", run_shards, self._write_part),
            Phase("merge", single_task, self._merge, output_root=lambda ctx: ctx.layout.root),
        ]

    def _write_part(self, ctx: StageContext, shard: str, workdir: Path) -> TaskOutput:
        from curate.stages import fate_stage_names
        from curate.stages.input import InputOutputs

        stages = fate_stage_names(self.config.stages)
        parts = [(name, read_fate_parts([ctx.layout.fetch(ctx.layout.fates_path(name, shard))])) for name in stages]
        ledger = merge_ledger(parts)
        outputs = LedgerOutputs(ctx.layout)
        target = workdir / outputs.part_path(shard).relative_to(outputs.folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(add_kept_columns(ledger_table(ledger), InputOutputs(ctx.layout).kept_columns(shard)), target)
        write_json_atomic(
            workdir / outputs.part_details_path(shard).relative_to(outputs.folder), failure_details(ledger)
        )
        kept = int((ledger["status"] == Status.KEPT.value).sum())
        return TaskOutput(counts={"rows": len(ledger), "kept": kept})

    def _merge(self, ctx: StageContext, _task: str, workdir: Path) -> TaskOutput:
        from curate.stages.input import InputOutputs

        outputs = LedgerOutputs(ctx.layout)
        rows = kept = 0
        details: dict[str, dict[str, Any]] = {}
        schema = ledger_schema(InputOutputs(ctx.layout).kept_columns_schema())
        with pq.ParquetWriter(workdir / ctx.layout.ledger_path.name, schema) as writer:
            for shard in ctx.shards:
                part = pq.read_table(ctx.layout.fetch(outputs.part_path(shard)), schema=schema)
                writer.write_table(part)
                rows += part.num_rows
                kept += int((part["status"].to_numpy(zero_copy_only=False) == Status.KEPT.value).sum())
                add_details(details, ctx.layout.read_json(outputs.part_details_path(shard)))
        input_rows = int(InputOutputs(ctx.layout).manifest()["rows"])  # type: ignore[index]
        if rows != input_rows:
            raise FateError(f"ledger has {rows} rows for {input_rows} input rows")
        write_json_atomic(workdir / outputs.details_path.relative_to(ctx.layout.root), trim_details(details))
        return TaskOutput(counts={"rows": rows, "kept": kept})


def failure_details(ledger: Any) -> dict[str, dict[str, Any]]:
    """Per "stage/status/reason" of the rows not kept: their count and the counts of their commonest details."""
    lost = ledger[ledger["status"] != Status.KEPT.value]
    found: dict[str, dict[str, Any]] = {}
    for (stage, status, reason), group in lost.groupby(["stage", "status", "reason"], dropna=False):
        details = Counter(str(d)[:DETAIL_CHARS] for d in group["detail"].dropna())
        found[f"{stage}/{status}/{reason}"] = {"rows": len(group), "details": dict(details.most_common(20))}
    return found


def add_details(total: dict[str, dict[str, Any]], part: dict[str, dict[str, Any]]) -> None:
    for key, entry in part.items():
        into = total.setdefault(key, {"rows": 0, "details": Counter()})
        into["rows"] += entry["rows"]
        into["details"].update(entry["details"])
        # bounded whatever the run's size; a detail that is rare in every shard may be missed
        into["details"] = Counter(dict(into["details"].most_common(200)))


def trim_details(details: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        key: {"rows": entry["rows"], "details": dict(Counter(entry["details"]).most_common(DETAILS_PER_REASON))}
        for key, entry in sorted(details.items())
    }
