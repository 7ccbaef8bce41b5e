"""The pipeline config: YAML into typed objects, did-you-mean errors, `--set` overrides, file errors."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from curate.config import (
    ConfigError,
    DownloadConfig,
    InputConfig,
    PipelineConfig,
    dump_config,
    load_config,
    validate_config,
)
from curate.stages import stage_names
from tests.readme import readme_section

REPO = Path(__file__).resolve().parent.parent

FULL = """\
output: runs/laion
executor: local
stages: [input, download]
input:
  path: [data/part-0.parquet, data/part-1.parquet]
  url_col: URL
  caption_col: TEXT
  uid_col: key
  shard_size: 500
download:
  image_size: 224
  resize_mode: center_crop
  timeout: 2.5
  retries: 1
  disallowed_header_directives: []
"""


def write(tmp_path: Path, text: str, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides or [])
    return str(caught.value)


# ---------------------------------------------------------------- loading


def test_yaml_becomes_typed_sections_with_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))

    assert isinstance(config, PipelineConfig)
    assert isinstance(config.input, InputConfig) and isinstance(config.download, DownloadConfig)
    assert config.output == "runs/laion"
    assert config.stages == ["input", "download"]
    assert config.input.paths() == ["data/part-0.parquet", "data/part-1.parquet"]
    assert (config.input.url_col, config.input.caption_col, config.input.uid_col) == ("URL", "TEXT", "key")
    assert config.input.shard_size == 500
    assert config.input.format == "auto" and config.input.header == "auto"  # defaults filled in
    assert config.download.timeout == 2.5 and isinstance(config.download.timeout, float)
    assert config.download.resize_mode == "center_crop"
    assert config.download.disallowed_header_directives == []
    assert config.download.encode_format == "jpg"
    assert math.isinf(config.download.max_aspect_ratio)


def test_minimal_config_and_single_path(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "output: out\ninput:\n  path: crawl.csv\n"))
    assert config.input.paths() == ["crawl.csv"]
    assert config.stages == ["input", "download", "embed", "filter", "dedup", "materialize"]
    assert config.input.shard_size == 10_000


@pytest.mark.parametrize("pipeline", sorted((REPO / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_pipelines_load(pipeline: Path) -> None:
    assert isinstance(load_config(pipeline), PipelineConfig)


def test_dumped_config_loads_back_equal(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL), ["download.max_aspect_ratio=3.5"])
    again = load_config(write(tmp_path, dump_config(config), "resolved.yaml"))
    assert again == config
    default_inf = load_config(write(tmp_path, dump_config(load_config(write(tmp_path, FULL))), "inf.yaml"))
    assert math.isinf(default_inf.download.max_image_area)


def test_sections_are_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    with pytest.raises(ValueError, match="frozen"):
        config.input.shard_size = 3  # type: ignore[misc]


# ---------------------------------------------------------------- unknown keys


def test_unknown_top_level_key_suggests_the_right_one(tmp_path: Path) -> None:
    path = write(tmp_path, FULL.replace("executor: local", "executer: local"))
    message = error_of(path)
    assert message.startswith(f"{path}: ")
    assert "unknown key 'executer' (did you mean 'executor'?)" in message


def test_unknown_nested_key_suggests_the_dotted_key(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, FULL.replace("  timeout: 2.5", "  timout: 2.5")))
    assert "unknown key 'download.timout' (did you mean 'download.timeout'?)" in message

    message = error_of(write(tmp_path, FULL.replace("  shard_size: 500", "  shard_sise: 500")))
    assert "unknown key 'input.shard_sise' (did you mean 'input.shard_size'?)" in message


def test_unknown_key_without_a_close_match_has_no_suggestion(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, FULL + "  zzzzzz: 1\n"))
    assert "unknown key 'download.zzzzzz'" in message
    assert "did you mean" not in message


def test_every_problem_is_reported_once(tmp_path: Path) -> None:
    text = FULL.replace("  timeout: 2.5", "  timout: 2.5").replace("  shard_size: 500", "  shard_size: -1")
    message = error_of(write(tmp_path, text))
    assert message.count("download.timout") == 1 and message.count("input.shard_size") == 1


# ---------------------------------------------------------------- wrong values


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("  timeout: 2.5", "  timeout: soon", "download.timeout: Input should be a valid number"),
        ("  shard_size: 500", "  shard_size: 0", "input.shard_size: Input should be greater than 0 (got 0)"),
        ("  shard_size: 500", "  shard_size: many", "input.shard_size: Input should be a valid integer"),
        ("  resize_mode: center_crop", "  resize_mode: squash", "download.resize_mode: Input should be 'no'"),
        ("  url_col: URL", "  header: maybe", "input.header: Input should be 'auto', 'yes' or 'no' (got 'maybe')"),
        ("executor: local", "executor: spark", "executor: Input should be 'local' or 'dask' (got 'spark')"),
        ("stages: [input, download]", "stages: [download]", "stages: must be the first stages of"),
        ("stages: [input, download]", "stages: [input, embed]", "stages: must be the first stages of"),
        ("stages: [input, download]", "stages: [input, dedupe]", "stages.1: unknown stage 'dedupe' (did you mean"),
        ("  path: [data/part-0.parquet, data/part-1.parquet]", "  path: []", "input.path: must name at least one"),
        ("  path: [data/part-0.parquet, data/part-1.parquet]", "  path: 5", "input.path: Input should be a valid"),
    ],
)
def test_wrong_value_names_the_key(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in FULL
    message = error_of(write(tmp_path, FULL.replace(old, new)))
    assert expected in message
    assert ".str" not in message and "list[str]" not in message  # no pydantic union tags in key names


def test_section_that_is_not_a_mapping(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, FULL.split("download:")[0] + "download: 7\n"))
    assert "download: Input should be a valid dictionary or instance of DownloadConfig (got 7)" in message


def test_missing_required_keys(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "input:\n  url_col: u\n"))
    assert "missing required key 'output'" in message
    assert "missing required key 'input.path'" in message


# ---------------------------------------------------------------- --set overrides


def test_overrides_set_nested_keys_with_yaml_types(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, FULL),
        [
            "download.timeout=7",
            "input.shard_size=64",
            "input.uid_col=null",
            "input.path=[a.csv, b.csv]",
            "stages=[input]",
            "output=elsewhere",
        ],
    )
    assert config.download.timeout == 7.0
    assert config.input.shard_size == 64
    assert config.input.uid_col is None
    assert config.input.paths() == ["a.csv", "b.csv"]
    assert config.stages == ["input"]
    assert config.output == "elsewhere"
    assert config.download.image_size == 224  # untouched keys keep the file's values


def test_override_creates_a_section_absent_from_the_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "output: o\ninput:\n  path: x.csv\n"), ["download.retries=3"])
    assert config.download.retries == 3
    assert config.download.image_size == 256


def test_override_value_that_is_not_yaml_is_taken_as_text(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL), ["input.path=data/*.parquet"])
    assert config.input.paths() == ["data/*.parquet"]


def test_overrides_are_validated_and_named(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    message = error_of(path, ["download.timeout=-1"])
    assert "download.timeout: Input should be greater than 0 (got -1)" in message
    assert "[from --set download.timeout=-1]" in message

    message = error_of(path, ["download.timout=3"])
    assert "unknown key 'download.timout' (did you mean 'download.timeout'?)" in message

    message = error_of(path, ["downlaod.timeout=3"])
    assert "unknown key 'downlaod' (did you mean 'download'?)" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("download.timeout", "--set 'download.timeout': expected key.sub=value"),
        ("=3", "--set '=3': expected key.sub=value"),
        ("download..timeout=3", "expected key.sub=value"),
        ("input.path.glob=x", "--set 'input.path.glob=x': 'input.path' is a value, not a section"),
    ],
)
def test_malformed_override(tmp_path: Path, override: str, expected: str) -> None:
    assert expected in error_of(write(tmp_path, FULL), [override])


# ---------------------------------------------------------------- unreadable files


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert error_of(path) == f"{path}: no such config file"


def test_invalid_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "output: out\ninput:\n  path: [a.csv\n")
    message = error_of(path)
    assert message.startswith(f"{path}: not valid YAML")
    assert f'in "{path}", line' in message


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "output: out\ninput:\n  path: a.csv\n  path: b.csv\n")
    message = error_of(path)
    assert message.startswith(f"{path}: not valid YAML: duplicate key 'path'")
    assert "line 4" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"- output\n- input\n", "the top level must be a mapping of keys, got list"),
        (b"output: \xff\xfe\n", "not a UTF-8 text file"),
        (b"", "missing required key 'output'"),
    ],
)
def test_unusable_file_contents(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_bytes(content)
    message = error_of(path)
    assert message.startswith(f"{path}: ") and expected in message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert error_of(tmp_path).startswith(f"{tmp_path}: cannot read the config file")


def test_validate_config_names_its_source() -> None:
    with pytest.raises(ConfigError, match=r"^<config>: missing required key 'output'"):
        validate_config({"input": {"path": "x.csv"}})
    raw = yaml.safe_load(FULL)
    assert validate_config(raw).input.uid_col == "key"


# ---------------------------------------------------------------- presets, combinations, format limits

MINIMAL = "output: out\ninput:\n  path: crawl.csv\n"


def test_a_null_key_removes_the_presets_value(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "filter:\n  preset: laion\n  clip_threshold: null\n")
    assert load_config(path).filter.clip_threshold is None
    assert load_config(path).filter.caption_min_chars == 5  # the preset's other keys stay
    nulled = load_config(write(tmp_path, MINIMAL + "filter:\n  preset: laion\n"), ["filter.clip_threshold=null"])
    assert nulled.filter.clip_threshold is None and nulled.filter.clip_rules() == (None, None)
    assert load_config(write(tmp_path, dump_config(nulled), "resolved.yaml")) == nulled


def test_threshold_and_top_fraction_together_need_clip_combine(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "filter:\n  preset: laion\n")
    message = error_of(path, ["filter.clip_top_fraction=0.3"])
    both = "filter.clip_combine: filter.clip_threshold (0.28) and filter.clip_top_fraction (0.3) are both set"
    assert both in message
    assert "max (keep pairs that pass both), threshold_only or top_fraction_only" in message
    chosen = {
        "max": (0.28, 0.3),
        "threshold_only": (0.28, None),
        "top_fraction_only": (None, 0.3),
    }
    for combine, rules in chosen.items():
        config = load_config(path, ["filter.clip_top_fraction=0.3", f"filter.clip_combine={combine}"])
        assert config.filter.clip_rules() == rules
    assert load_config(path, ["filter.clip_top_fraction=0.3", "filter.clip_threshold=null"]).filter.clip_rules() == (
        None,
        0.3,
    )


def test_clip_combine_naming_an_unset_rule_is_an_error(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, MINIMAL), ["filter.clip_combine=top_fraction_only"])
    assert "filter.clip_combine: top_fraction_only needs filter.clip_top_fraction, which is not set" in message


@pytest.mark.parametrize(
    ("download", "expected"),
    [
        ("  encode_format: png\n  encode_quality: 95\n", "encode_quality: must be a png compression level in [0, 9]"),
        ("  encode_format: png\n  encode_quality: -1\n", "encode_quality: Input should be greater than or equal to 0"),
        ("  encode_format: jpg\n  encode_quality: 0\n", "encode_quality: must be a jpg quality in [1, 100]"),
        ("  encode_format: webp\n  encode_quality: 101\n", "encode_quality: Input should be less than or equal to 100"),
    ],
)  # fmt: skip
def test_encode_quality_limits_depend_on_the_format(tmp_path: Path, download: str, expected: str) -> None:
    assert f"download.{expected}" in error_of(write(tmp_path, MINIMAL + "download:\n" + download))


def test_png_takes_a_compression_level_and_defaults_to_the_smallest_files(tmp_path: Path) -> None:
    png = load_config(write(tmp_path, MINIMAL + "download:\n  encode_format: png\n")).download
    assert png.encode_quality == 9 and DownloadConfig(encode_format="png").encode_quality == 9
    assert load_config(write(tmp_path, MINIMAL), ["download.encode_format=png", "download.encode_quality=0"])
    assert DownloadConfig().encode_quality == 95 and DownloadConfig(encode_format="webp").encode_quality == 95


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["validate.samples_seen=1000", "validate.batch_size=256"],
         "validate.warmup_steps: must be less than the run's 3 steps (validate.samples_seen 1000 // "
         "validate.batch_size 256) (got 10)"),
        (["validate.warmup_steps=100"], "validate.warmup_steps: must be less than the run's 100 steps"),
        (["validate.samples_seen=100", "validate.batch_size=256"],
         "validate.samples_seen: must be at least one batch (validate.batch_size = 256) (got 100)"),
    ],
)  # fmt: skip
def test_warmup_must_fit_in_the_runs_steps(tmp_path: Path, overrides: list[str], expected: str) -> None:
    assert expected in error_of(write(tmp_path, MINIMAL), overrides)
    assert load_config(write(tmp_path, MINIMAL), ["validate.warmup_steps=99"]).validate.warmup_steps == 99


@pytest.mark.parametrize(("spelling", "header"), [("no", "no"), ("off", "no"), ("yes", "yes"), ("on", "yes"),
                                                  ("'no'", "no"), ("auto", "auto")])  # fmt: skip
def test_yes_no_settings_take_yaml_booleans(tmp_path: Path, spelling: str, header: str) -> None:
    config = load_config(write(tmp_path, MINIMAL.replace("crawl.csv", f"crawl.tsv\n  header: {spelling}")))
    assert config.input.header == header
    assert load_config(write(tmp_path, MINIMAL + "download:\n  resize_mode: no\n")).download.resize_mode == "no"
    assert "download.resize_mode: Input should be 'no'" in error_of(
        write(tmp_path, MINIMAL + "download:\n  resize_mode: yes\n")
    )


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        ("[similarity, similarity]", "input.keep_columns: 'similarity' is listed twice"),
        ("[TEXT]", "input.keep_columns: 'TEXT' is already carried as input.caption_col"),
        ("[key]", "input.keep_columns: 'key' is already carried as input.uid_col"),
        ("[similarity, status]", "input.keep_columns: 'status' is a field curate or img2dataset writes itself"),
        ("[width]", "input.keep_columns: 'width' is a field curate or img2dataset writes itself"),
    ],
)
def test_keep_columns_that_cannot_be_kept_are_config_errors(tmp_path: Path, columns: str, expected: str) -> None:
    message = error_of(write(tmp_path, FULL), [f"input.keep_columns={columns}"])
    assert expected in message and "\n" not in message.strip()


def test_keep_columns_that_can_be_kept_load(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL), ["input.keep_columns=[similarity, punsafe, LICENSE]"])
    assert config.input.keep_columns == ["similarity", "punsafe", "LICENSE"]


def readme_config_table() -> dict[str, str]:
    """The README's config table: dotted key -> its default column, as written."""
    lines = readme_section("Config").splitlines()
    start = lines.index("| key | default | meaning |") + 2
    rows = {}
    for line in itertools.takewhile(lambda text: text.startswith("|"), lines[start:]):
        key, default, _meaning = (cell.strip() for cell in line.strip().strip("|").split(" | ", 2))
        rows[key.strip("`")] = default.strip("`")
    return rows


def setting_keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from setting_keys(kind, f"{prefix}{name}.")
        else:
            yield prefix + name


def test_the_readme_config_table_lists_every_key_with_the_default_a_minimal_config_gets(tmp_path: Path) -> None:
    table = readme_config_table()
    assert set(table) - {"download.preset"} == set(setting_keys(PipelineConfig))
    minimal = load_config(write(tmp_path, "output: run\ninput:\n  path: crawl.parquet\n"))
    for key, written in table.items():
        if written == "required":
            parent, _, name = key.rpartition(".")
            raw: dict[str, Any] = {"output": "run", "input": {"path": "crawl.parquet"}}
            del (raw[parent] if parent else raw)[name]
            with pytest.raises(ConfigError, match=f"missing required key '{key}'"):
                validate_config(raw)
            continue
        if key == "download.preset":  # resolved away at load time; none is accepted
            assert validate_config({"output": "run", "input": {"path": "p"}, "download": {"preset": None}})
            continue
        value: Any = minimal
        for part in key.split("."):
            value = getattr(value, part)
        value = value.model_dump() if isinstance(value, BaseModel) else value
        if key == "stages":
            order = list(stage_names())
            assert written == "input … materialize" and value == order[: order.index("materialize") + 1]
            continue
        expected = math.inf if written == "inf" else None if written == "none" else yaml.safe_load(written)
        assert value == expected, f"README says {key} defaults to {written!r}; it is {value!r}"
