"""User plugins on a real run over the served world: a filter plugin's name is its ledger reason, a head's scores
are embed metadata columns that a threshold filters, editing a plugin's file re-runs only its stage and the later
ones, and a bad plugin is a config error before any work."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from curate.config import ConfigError, PipelineConfig, PluginConfig, load_config, validate_config
from curate.ledger import read_ledger
from curate.pipeline import run_pipeline, stage_fingerprints
from curate.plugins import PluginError, PluginFilter, resolve_plugin
from curate.stage import RunLayout
from curate.stages import plan
from curate.stages.embed import METADATA_SCHEMA, EmbedOutputs
from curate.stages.filters import apply_filters
from tests.run_fixtures import CuratedRun, shared_curated_run
from tests.world_fixtures import ServedWorld

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "plugins" / "aesthetic.py"

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def curated_run(served_world: ServedWorld, tmp_path_factory: pytest.TempPathFactory) -> CuratedRun:
    return shared_curated_run(served_world, tmp_path_factory)


def copied(run: CuratedRun, dest: Path, **sections: dict[str, Any]) -> PipelineConfig:
    """A copy of the finished run, and its config with `sections` updated."""
    shutil.copytree(run.root, dest)
    raw = load_config(RunLayout(dest).config_path).model_dump(mode="json")
    raw["output"] = str(dest)
    for section, values in sections.items():
        raw[section].update(values)
    return validate_config(raw)


def stored_image_embeddings(root: Path) -> tuple[list[str], np.ndarray]:
    embed = EmbedOutputs(root)
    uids = [uid for s in embed.shards() for uid in embed.metadata(s, columns=["uid"])["uid"].to_pylist()]
    return uids, np.concatenate([embed.image_embeddings(s) for s in embed.shards()]).astype(np.float32)


def linear_head(run: CuratedRun, path: Path) -> tuple[Path, dict[str, float], float]:
    """A random linear head over the run's image embeddings (.npz), every embedded uid's score, and a threshold
    halfway between two neighbouring scores near the median (so no score ties with it)."""
    uids, embeddings = stored_image_embeddings(run.root)
    w = np.random.default_rng(0).normal(size=embeddings.shape[1]).astype(np.float32)
    np.savez(path, w=w, b=np.float32(0.1))
    scores = embeddings @ w + np.float32(0.1)
    ranked = np.sort(scores)
    middle = len(ranked) // 2
    return path, dict(zip(uids, scores.tolist(), strict=True)), float((ranked[middle - 1] + ranked[middle]) / 2)


def plugin_copy(tmp_path: Path, module: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example plugin as an importable module of its own, which a test may edit."""
    path = tmp_path / "plugins" / f"{module}.py"
    path.parent.mkdir()
    shutil.copy(EXAMPLE, path)
    monkeypatch.syspath_prepend(str(path.parent))
    return path


def markers(run_dir: Path, stage: str) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in (run_dir / stage).rglob("_done/**/*.json")}


def passed_filter(ledger: pd.DataFrame, embedded: dict[str, float]) -> set[str]:
    """The embedded uids that the filter stage did not drop."""
    by_filter = set(ledger[(ledger.stage == "filter") & (ledger.status == "dropped")].uid)
    return set(embedded) - by_filter


def test_a_filter_plugin_drops_with_its_name_as_the_reason(curated_run: CuratedRun, tmp_path: Path) -> None:
    weights, scores, threshold = linear_head(curated_run, tmp_path / "head.npz")
    plugin = {"path": "examples.plugins.aesthetic:MinAesthetic", "weights": str(weights), "min_score": threshold}
    config = copied(curated_run, tmp_path / "run", filter={"custom": [plugin]})
    embed_markers = markers(tmp_path / "run", "embed")

    result = run_pipeline(config)

    assert result.complete and result.tasks_run > 0
    assert markers(tmp_path / "run", "embed") == embed_markers  # a filter plugin never re-embeds
    before, ledger = read_ledger(curated_run.root), read_ledger(tmp_path / "run")
    assert len(ledger) == len(before) and ledger.uid.is_unique  # every input row once
    dropped = ledger[ledger.reason == "min_aesthetic"]
    expected = {uid for uid in passed_filter(before, scores) if scores[uid] < threshold}
    assert len(expected) > 5 and set(dropped.uid) == expected
    assert (dropped.stage == "filter").all() and (dropped.status == "dropped").all()
    assert dropped.detail.str.fullmatch(rf"min_aesthetic=-?[\d.]+ \(needs >= {threshold:g}\)").all()
    kept = ledger[ledger.status == "kept"]
    assert len(kept) > 0 and all(scores[uid] >= threshold for uid in kept.uid)


def test_editing_a_filter_plugin_reruns_filter_and_later_stages_only(
    curated_run: CuratedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = plugin_copy(tmp_path, "edited_filter_plugin", monkeypatch)
    weights, _, threshold = linear_head(curated_run, tmp_path / "head.npz")
    plugin = {"path": "edited_filter_plugin:MinAesthetic", "weights": str(weights), "min_score": threshold}
    config = copied(curated_run, tmp_path / "run", filter={"custom": [plugin]})
    assert run_pipeline(config).complete
    prints = stage_fingerprints(plan(config))
    embed_markers, filter_markers = markers(tmp_path / "run", "embed"), markers(tmp_path / "run", "filter")

    module.write_text(module.read_text() + "\n# tuned: same code, new bytes\n")
    edited = stage_fingerprints(plan(config))
    again = run_pipeline(config)

    assert {s: edited[s] for s in ("input", "download", "embed")} == {
        s: prints[s] for s in ("input", "download", "embed")
    }
    assert all(edited[s] != prints[s] for s in ("filter", "dedup", "ledger", "materialize"))
    assert again.complete and markers(tmp_path / "run", "embed") == embed_markers
    rewritten = markers(tmp_path / "run", "filter")
    assert rewritten.keys() == filter_markers.keys() and all(rewritten[m] != filter_markers[m] for m in rewritten)


def test_a_head_scores_at_embed_time_and_a_threshold_filters_on_it(
    curated_run: CuratedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = plugin_copy(tmp_path, "edited_head_plugin", monkeypatch)
    weights, scores, threshold = linear_head(curated_run, tmp_path / "head.npz")
    config = copied(
        curated_run,
        tmp_path / "run",
        embed={"heads": [{"path": "edited_head_plugin:AestheticScore", "weights": str(weights)}]},
        filter={"min_scores": {"aesthetic_score": threshold}},
    )
    result = run_pipeline(config)

    assert result.complete
    embed = EmbedOutputs(tmp_path / "run")
    for shard in embed.shards():
        metadata = embed.metadata_with_scores(shard)
        assert metadata.schema.field("aesthetic_score").type == pa.float32()
        expected = np.array([scores[uid] for uid in metadata["uid"].to_pylist()], np.float32)
        np.testing.assert_allclose(metadata["aesthetic_score"].to_numpy(), expected, rtol=1e-5, atol=1e-6)
        assert embed.metadata(shard).schema == METADATA_SCHEMA  # readers of the clip-retrieval columns see no change
    ledger = read_ledger(tmp_path / "run")
    dropped = ledger[ledger.reason == "aesthetic_score"]
    expected_drops = {uid for uid in passed_filter(read_ledger(curated_run.root), scores) if scores[uid] < threshold}
    assert len(expected_drops) > 5 and set(dropped.uid) == expected_drops
    assert dropped.detail.str.fullmatch(rf"aesthetic_score=-?[\d.]+ \(needs >= {threshold:g}\)").all()

    prints = stage_fingerprints(plan(config))
    module.write_text(module.read_text() + "\n# retrained\n")
    edited = stage_fingerprints(plan(config))
    assert edited["download"] == prints["download"] and edited["embed"] != prints["embed"]  # a head is embed's
    np.savez(weights, w=np.zeros(len(np.load(weights)["w"]), np.float32), b=np.float32(0.0))
    assert stage_fingerprints(plan(config))["embed"] != edited["embed"]  # so are the bytes of its weights file


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            'filter.custom=[{path: "examples.plugins.aesthetc:MinAesthetic"}]',
            r"filter\.custom\.0: no module named 'examples\.plugins\.aesthetc' "
            r"\(did you mean 'examples\.plugins\.aesthetic'\?\)",
        ),
        (
            'filter.custom=[{path: "examples.plugins.aesthetic:MinAesthetik"}]',
            r"filter\.custom\.0: module 'examples\.plugins\.aesthetic' has no 'MinAesthetik' "
            r"\(did you mean 'examples\.plugins\.aesthetic:MinAesthetic'\?\)",
        ),
        (
            'filter.custom=[{path: "examples.plugins.aesthetic:MinAesthetic", weights: WEIGHTS, min_scor: 0.5}]',
            r"filter\.custom\.0: unknown setting 'min_scor' of 'examples\.plugins\.aesthetic:MinAesthetic' "
            r"\(did you mean 'filter\.custom\.0\.min_score'\?\)",
        ),
        (
            'filter.custom=[{path: "examples.plugins.aesthetic:MinAesthetic", weights: WEIGHTS}]',
            r"missing required setting 'filter\.custom\.0\.min_score'",
        ),
        (
            'embed.heads=[{path: "examples.plugins.aesthetic:AestheticScore", weights: no-such.npz}]',
            r"embed\.heads\.0\.weights: no such file 'no-such\.npz'",
        ),
        (
            'embed.heads=[{path: "examples.plugins.aesthetic:AestheticScore", weights: WEIGHTS}]',
            r"filter\.min_scores\.aesthetic: no embed\.heads plugin writes 'aesthetic' "
            r"\(did you mean 'aesthetic_score'\?\)",
        ),
    ],
)
def test_a_bad_plugin_is_a_config_error_before_anything_is_written(
    served_world: ServedWorld, tmp_path: Path, setting: str, message: str
) -> None:
    weights = tmp_path / "head.npz"
    np.savez(weights, w=np.ones(8, np.float32), b=np.float32(0))
    pipeline = served_world.pipeline(tmp_path, output=tmp_path / "run")
    overrides = [
        "stages=[input,download,embed,filter]",
        "embed.model=curate-tiny",
        setting.replace("WEIGHTS", str(weights)),
    ]
    if setting.startswith("embed.heads") and "WEIGHTS" in setting:
        overrides.append("filter.min_scores={aesthetic: 0.5}")
    with pytest.raises(ConfigError, match=message):
        run_pipeline(load_config(pipeline, overrides))
    assert not (tmp_path / "run").exists()


PROTOCOL_PLUGINS = '''
import numpy as np
import pyarrow.compute as pc


def caption_match(table, *, text_embeddings):
    """Keep rows whose text embedding leans towards the first axis; needs only the text embeddings."""
    values = text_embeddings[:, 0]
    return values, values > 0


caption_match.needs = ("text_embeddings",)


def short_answer(table):
    return np.zeros(1), np.ones(1, bool)


class WordCount:
    name = "words"

    def __call__(self, table):
        words = pc.list_value_length(pc.utf8_split_whitespace(table["caption"]))
        return words, pc.greater_equal(words, 2)
'''


def test_plugins_follow_the_protocol_and_a_wrong_answer_names_the_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "protocol_plugins.py").write_text(PROTOCOL_PLUGINS)
    monkeypatch.syspath_prepend(str(tmp_path))
    table = pa.table(
        {"uid": ["a", "b", "c"], "caption": ["one", "two words", "three more words"], "clip_score": [0.3] * 3}
    )
    text = np.array([[1.0, 0.0], [-1.0, 0.0], [0.5, 0.5]], np.float32)

    match = resolve_plugin(PluginConfig(path="protocol_plugins:caption_match"), "filter.custom.0")
    words = resolve_plugin(PluginConfig(path="protocol_plugins:WordCount"), "filter.custom.1")
    assert (match.name, match.needs, words.name, words.needs) == ("caption_match", ("text_embeddings",), "words", ())
    rules = [PluginFilter(match, match.build(), {"text_embeddings": text}), PluginFilter(words, words.build(), {})]
    fates = apply_filters(table, rules).to_pandas().set_index("uid")
    assert fates.loc["a", "reason"] == "words" and fates.loc["b", "reason"] == "caption_match"
    assert fates.loc["c", "status"] == "kept"

    short = resolve_plugin(PluginConfig(path="protocol_plugins:short_answer"), "filter.custom.2")
    with pytest.raises(
        PluginError, match=r"filter\.custom\.2 \(protocol_plugins:short_answer\) returned values of shape"
    ):
        apply_filters(table, [PluginFilter(short, short.build(), {})])


def test_a_function_or_a_class_without_settings_takes_no_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "protocol_plugins.py").write_text(PROTOCOL_PLUGINS)
    monkeypatch.syspath_prepend(str(tmp_path))
    for path in ("protocol_plugins:short_answer", "protocol_plugins:WordCount"):
        assert resolve_plugin(PluginConfig(path=path), "filter.custom.0").settings is None
        with pytest.raises(PluginError, match=rf"^filter\.custom\.0: '{path}' takes no settings \(got 'min_words'\)"):
            resolve_plugin(PluginConfig(path=path, min_words=2), "filter.custom.0")


def test_a_plugins_version_stands_for_its_source_in_the_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "versioned"
    folder.mkdir()
    source = folder / "versioned_plugin.py"
    source.write_text('__version__ = "1.0"\n\ndef keep_all(table):\n    return [True] * table.num_rows\n')
    (folder / "classy_plugin.py").write_text(
        "import dataclasses\n\nclass Scored:\n    __version__ = '2.3'\n\n"
        "    @dataclasses.dataclass\n    class Settings:\n        weights: str\n\n"
        "    def __init__(self, settings):\n        self.settings = settings\n\n"
        "    def __call__(self, table):\n        return [0.0] * table.num_rows\n"
    )
    weights = folder / "w.npz"
    weights.write_bytes(b"first")
    monkeypatch.syspath_prepend(str(folder))

    plugin = resolve_plugin(PluginConfig(path="versioned_plugin:keep_all"), "filter.custom.0")
    first = plugin.identity()
    assert first["version"] == "1.0" and "source" not in first  # the module's __version__
    source.write_text(source.read_text() + "# reformatted\n")
    assert plugin.identity() == first  # same version: same computation, whatever the bytes
    monkeypatch.setattr(sys.modules["versioned_plugin"], "__version__", "1.1")
    assert plugin.identity()["version"] == "1.1"

    head = resolve_plugin(PluginConfig(path="classy_plugin:Scored", weights=str(weights)), "embed.heads.0")
    before = head.identity()
    assert before["version"] == "2.3"  # the class's own __version__
    weights.write_bytes(b"second")
    assert head.identity()["files"] != before["files"]  # a file a setting names counts by its bytes

    with pytest.raises(PluginError, match=r"filter\.custom\.1: 'math:sqrt' has neither a __version__ nor a Python"):
        resolve_plugin(PluginConfig(path="math:sqrt"), "filter.custom.1").identity()


PROBE_PLUGINS = '''
import json
import os
import uuid

import numpy as np


def record(kind, table, embeddings):
    """What the plugin was called with: the table's columns and uids, and the embeddings as given."""
    stem = os.path.join(os.environ["CURATE_PROBE_DIR"], f"{kind}-{uuid.uuid4().hex}")
    np.savez(stem + ".npz", **embeddings)
    with open(stem + ".json", "w") as handle:
        json.dump({"columns": table.column_names, "uids": table["uid"].to_pylist()}, handle)


def probe_head(table, *, image_embeddings, text_embeddings):
    record("head", table, {"image_embeddings": image_embeddings, "text_embeddings": text_embeddings})
    return np.arange(table.num_rows)  # each row's position in the table the head was given


probe_head.needs = ("image_embeddings", "text_embeddings")


def probe_filter(table, *, image_embeddings):
    record("filter", table, {"image_embeddings": image_embeddings})
    return table["probe_head"].to_numpy(), np.ones(table.num_rows, bool)  # the head's score, as a filter sees it


probe_filter.needs = ("image_embeddings",)
'''


def test_plugins_get_each_shards_table_once_with_the_embeddings_they_need_row_aligned(
    curated_run: CuratedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "probe_plugins.py").write_text(PROBE_PLUGINS)
    monkeypatch.syspath_prepend(str(tmp_path / "probe"))
    calls = tmp_path / "calls"
    calls.mkdir()
    monkeypatch.setenv("CURATE_PROBE_DIR", str(calls))
    config = copied(
        curated_run,
        tmp_path / "run",
        embed={"heads": [{"path": "probe_plugins:probe_head"}]},
        filter={"custom": [{"path": "probe_plugins:probe_filter"}]},
    )
    assert run_pipeline(config).complete

    embed = EmbedOutputs(tmp_path / "run")
    stored = {}  # uid -> (its image embedding, its text embedding, its row in the shard's metadata)
    for shard in embed.shards():
        uids = embed.metadata(shard, columns=["uid"])["uid"].to_pylist()
        pairs = zip(embed.image_embeddings(shard), embed.text_embeddings(shard), strict=True)
        stored |= {uid: (image, text, row) for row, (uid, (image, text)) in enumerate(zip(uids, pairs, strict=True))}
    shards_embedded = sorted(sorted(embed.metadata(s, columns=["uid"])["uid"].to_pylist()) for s in embed.shards())

    def seen(kind: str) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
        found = []
        for path in sorted(calls.glob(f"{kind}-*.json")):
            arrays = np.load(path.with_suffix(".npz"))
            found.append((json.loads(path.read_text()), {name: arrays[name] for name in arrays.files}))
        return [(record, arrays) for record, arrays in found if record["uids"]]

    for kind, needs in (("head", ["image_embeddings", "text_embeddings"]), ("filter", ["image_embeddings"])):
        records = seen(kind)
        assert sorted(sorted(record["uids"]) for record, _ in records) == [s for s in shards_embedded if s]
        for record, arrays in records:
            assert sorted(arrays) == needs  # the embeddings it asks for, and only those
            for need, given in arrays.items():
                assert given.dtype == np.float32 and given.ndim == 2
                np.testing.assert_allclose(np.linalg.norm(given, axis=1), 1, atol=1e-2)  # L2-normalised
                column = 0 if need == "image_embeddings" else 1
                row_aligned = np.stack([stored[uid][column] for uid in record["uids"]]).astype(np.float32)
                np.testing.assert_array_equal(given, row_aligned)
    for record, _ in seen("filter"):
        columns = {"uid", "url", "caption", "clip_score", "probe_head", "width", "height"}
        assert columns <= set(record["columns"])  # every head's score too
    ledger = read_ledger(tmp_path / "run")
    assert not (ledger.reason == "probe_filter").any()
    metadata = pd.concat(embed.metadata_with_scores(s).to_pandas() for s in embed.shards())
    assert (metadata.probe_head == [stored[uid][2] for uid in metadata.uid]).all()  # stored as computed at embed
