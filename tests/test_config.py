"""The pipeline config: YAML into typed objects, did-you-mean errors, `--set` overrides, file errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from curate.config import (
    ConfigError,
    DownloadConfig,
    InputConfig,
    PipelineConfig,
    dump_config,
    load_config,
    validate_config,
)

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
        ("stages: [input, download]", "stages: [input, dedupe]", "stages.1: Input should be 'input', 'download'"),
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
