"""The ledger: every input row once, with the fate the last stage that decided it gave. Not a stage users list:
the pipeline runs it right after the last stage that decides fates."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from curate.ledger import LEDGER_SCHEMA, FateError, Status, ledger_table, merge_ledger, read_fate_parts
from curate.stage import Phase, RunLayout, Stage, StageContext, StageOutputs, TaskOutput, single_task

LEDGER = "ledger"


class LedgerOutputs(StageOutputs):
    stage = LEDGER

    @property
    def path(self) -> Path:
        return self.layout.ledger_path


class LedgerStage(Stage):
    name = LEDGER
    decides_fates = False
    default = False
    outputs = LedgerOutputs

    def phases(self) -> list[Phase]:
        return [Phase("merge", single_task, self._merge, output_root=lambda ctx: ctx.layout.root)]

    def _merge(self, ctx: StageContext, _task: str, workdir: Path) -> TaskOutput:
        from curate.stages import fate_stage_names
        from curate.stages.input import InputOutputs

        stages = fate_stage_names(self.config.stages)
        rows, kept = write_ledger(stages, ctx.layout, list(ctx.shards), workdir / ctx.layout.ledger_path.name)
        input_rows = int(InputOutputs(ctx.layout).manifest()["rows"])  # type: ignore[index]
        if rows != input_rows:
            raise FateError(f"ledger has {rows} rows for {input_rows} input rows")
        return TaskOutput(counts={"rows": rows, "kept": kept})


def write_ledger(stages: list[str], layout: RunLayout, shards: list[str], path: Path) -> tuple[int, int]:
    """Merge the fates shard by shard (a uid never changes shard), so memory stays one shard deep."""
    rows = kept = 0
    with pq.ParquetWriter(path, LEDGER_SCHEMA) as writer:
        for shard in shards:
            parts = [(name, read_fate_parts([layout.fates_path(name, shard)])) for name in stages]
            ledger = merge_ledger(parts)
            writer.write_table(ledger_table(ledger))
            rows += len(ledger)
            kept += int((ledger["status"] == Status.KEPT.value).sum())
    return rows, kept
