"""The fate contract, the ledger merge and the shard runner, on small hand-made stages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pytest

from curate.config import validate_config
from curate.ledger import FateError, Status, check_fates, count_fates, make_fates, merge_ledger
from curate.runner import ShardState, run_shard, shard_state
from curate.stage import RunLayout, Stage, StageContext


def test_check_fates_demands_exactly_one_fate_per_uid():
    expected = pa.array(["a", "b", "c"])
    check_fates(make_fates(["a", "b", "c"], "kept"), expected, where="t")
    with pytest.raises(FateError, match="1 missing"):
        check_fates(make_fates(["a", "b"], "kept"), expected, where="t")
    with pytest.raises(FateError, match="more than one fate"):
        check_fates(make_fates(["a", "b", "c", "c"], "kept"), expected, where="t")
    with pytest.raises(FateError, match="1 unexpected"):
        check_fates(make_fates(["a", "b", "c", "d"], "kept"), expected, where="t")
    with pytest.raises(FateError, match="without a reason"):
        check_fates(make_fates(["a", "b", "c"], ["kept", "dropped", "kept"]), expected, where="t")
    with pytest.raises(FateError, match="unknown status"):
        check_fates(make_fates(["a", "b", "c"], ["kept", "lost", "kept"], ["x"] * 3), expected, where="t")


def test_merge_takes_the_last_decision_and_accumulates_attributes():
    first = make_fates(
        ["a", "b", "c", "d"],
        ["kept", "kept", "kept", "failed"],
        [None, None, None, "invalid_url"],
        url=["u1", "u2", "u3", "bad"],
        caption=["x", "y", "z", "w"],
    )
    second = make_fates(
        ["a", "b", "c"],
        ["kept", "failed", "kept"],
        [None, "http_404", None],
        sha256=["h1", None, "h3"],
        width=[10, None, 30],
        height=[11, None, 31],
    )
    third = make_fates(["a", "c"], ["kept", "dropped"], [None, "clip_score"], ["", "0.1"], clip_score=[0.4, 0.1])
    ledger = merge_ledger([("input", first), ("download", second), ("filter", third)]).set_index("uid")

    assert ledger.loc["a", ["status", "stage", "sha256", "width"]].tolist() == ["kept", "filter", "h1", 10]
    assert ledger.loc["b", ["status", "stage", "reason"]].tolist() == ["failed", "download", "http_404"]
    assert ledger.loc["c", ["status", "stage", "reason", "detail"]].tolist() == [
        "dropped",
        "filter",
        "clip_score",
        "0.1",
    ]
    assert ledger.loc["d", ["status", "stage", "url"]].tolist() == ["failed", "input", "bad"]
    assert ledger.loc["c", "clip_score"] == pytest.approx(0.1)
    assert ledger.loc["c", "width"] == 30


def test_merge_refuses_a_stage_that_decides_other_uids_than_were_kept():
    first = make_fates(["a", "b"], ["kept", "failed"], [None, "invalid_url"])
    with pytest.raises(FateError, match="previous stage kept 1"):
        merge_ledger([("input", first), ("download", make_fates(["a", "b"], "kept"))])


def test_counts_are_keyed_by_status_and_reason():
    fates = make_fates(["a", "b", "c"], ["kept", "failed", "failed"], [None, "http_404", "http_404"])
    assert count_fates(fates) == {"kept": 1, "failed/http_404": 2}


class UpperStage(Stage):
    """Writes the uid list in upper case; fails uids starting with 'x'."""

    name: ClassVar[str] = "upper"
    calls: ClassVar[int] = 0

    def __init__(self, uids: list[str], crash: bool = False) -> None:
        self.uids, self.crash = uids, crash

    def setup(self) -> None:
        pass

    def expected_uids(self, ctx: StageContext, shard: str) -> pa.Array:
        return pa.array(self.uids)

    def process_shard(self, ctx: StageContext, shard: str, workdir: Path) -> pa.Table:
        UpperStage.calls += 1
        (workdir / f"{shard}.txt").write_text(",".join(u.upper() for u in self.uids))
        if self.crash:
            raise RuntimeError("boom")
        failed = [u.startswith("x") for u in self.uids]
        return make_fates(
            self.uids,
            [Status.FAILED.value if f else "kept" for f in failed],
            ["bad_uid" if f else None for f in failed],
        )


def make_ctx(tmp_path: Path, fingerprint: str) -> StageContext:
    config = validate_config({"output": str(tmp_path), "input": {"path": "unused.parquet"}})
    return StageContext(config, RunLayout(tmp_path), fingerprint)


def test_runner_commits_outputs_then_marker_and_skips_when_done(tmp_path: Path):
    ctx = make_ctx(tmp_path, "fp1")
    stage = UpperStage(["a", "xb"])
    UpperStage.calls = 0
    report = run_shard(stage, ctx, "00000")
    assert not report.skipped and report.stats.counts == {"kept": 1, "failed/bad_uid": 1}
    assert (tmp_path / "upper" / "00000.txt").read_text() == "A,XB"
    marker = json.loads((tmp_path / "upper" / "_done" / "00000.json").read_text())
    assert marker["fingerprint"] == "fp1" and marker["counts"] == {"kept": 1, "failed/bad_uid": 1}

    assert run_shard(stage, ctx, "00000").skipped
    assert UpperStage.calls == 1
    assert shard_state(make_ctx(tmp_path, "fp2"), "upper", "00000") is ShardState.STALE
    assert not run_shard(stage, make_ctx(tmp_path, "fp2"), "00000").skipped
    assert UpperStage.calls == 2


def test_a_crashing_shard_commits_nothing(tmp_path: Path):
    ctx = make_ctx(tmp_path, "fp1")
    with pytest.raises(RuntimeError, match="boom"):
        run_shard(UpperStage(["a"], crash=True), ctx, "00001")
    assert not (tmp_path / "upper" / "00001.txt").exists()
    assert shard_state(ctx, "upper", "00001") is ShardState.PENDING


class Forgetful(UpperStage):
    def process_shard(self, ctx: StageContext, shard: str, workdir: Path) -> pa.Table:
        super().process_shard(ctx, shard, workdir)
        return make_fates(self.uids[:1], "kept")


def test_a_shard_breaking_the_fate_contract_is_not_committed(tmp_path: Path):
    ctx = make_ctx(tmp_path, "fp1")
    with pytest.raises(FateError, match="1 missing"):
        run_shard(Forgetful(["a", "b"]), ctx, "00002")
    assert not (tmp_path / "upper" / "00002.txt").exists()
    assert shard_state(ctx, "upper", "00002") is ShardState.PENDING
