"""The typed pipeline config: YAML file + dotted `--set` overrides, validated once at load time."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputConfig(Section):
    path: str | list[str] = Field(description="file, glob or list of them (parquet, csv, tsv, jsonl; .gz ok)")
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = "auto"
    url_col: str = "url"
    caption_col: str = "caption"
    uid_col: str | None = None
    header: Literal["auto", "yes", "no"] = Field(
        "auto", description="csv/tsv only: 'no' reads header-less files (CC12M) with `columns` as names"
    )
    columns: list[str] = Field(default_factory=lambda: ["url", "caption"])
    shard_size: int = Field(10_000, gt=0, description="rows per shard: the unit of work, retry and resume")
    max_url_chars: int = Field(2048, gt=0)
    max_caption_chars: int = Field(4096, gt=0, description="longer captions are dropped (caption_too_long)")
    batch_rows: int = Field(65_536, gt=0, description="rows read at a time; bounds input memory")

    @field_validator("path")
    @classmethod
    def _non_empty_path(cls, value: str | list[str]) -> str | list[str]:
        if not value:
            raise ValueError("must name at least one file")
        return value

    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)


class DownloadConfig(Section):
    image_size: int = Field(256, gt=0)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "border"
    resize_only_if_bigger: bool = False
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    min_image_size: int = Field(0, ge=0, description="shorter side below this is dropped (min_side)")
    max_aspect_ratio: float = Field(float("inf"), gt=0)
    max_image_area: float = Field(float("inf"), gt=0)
    timeout: float = Field(10, gt=0, description="seconds per socket read (img2dataset semantics)")
    retries: int = Field(0, ge=0)
    threads: int = Field(64, gt=0, description="concurrent fetches per shard")
    processes: int = Field(2, gt=0, description="shards downloaded at once by the local executor")
    user_agent_token: str | None = "curate"
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that opt an image out; [] disables the check",
    )
    compute_hash: Literal["sha256", "md5", "sha512"] | None = "sha256"
    extract_exif: bool = False


class PipelineConfig(Section):
    output: str
    executor: Literal["local", "dask"] = "local"
    scheduler: str | None = Field(None, description="address of a running Dask scheduler")
    stages: list[Literal["input", "download"]] = Field(default_factory=lambda: ["input", "download"])
    input: InputConfig
    download: DownloadConfig = Field(default_factory=DownloadConfig)

    @model_validator(mode="after")
    def _stages_in_order(self) -> PipelineConfig:
        order = ["input", "download"]
        if self.stages != [s for s in order if s in self.stages] or self.stages[:1] != ["input"]:
            raise ValueError(f"stages must start with 'input' and follow the order {order}")
        return self

    def section_fingerprint(self, section: str) -> str:
        payload = json.dumps(getattr(self, section).model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a pipeline YAML, apply `key.sub=value` overrides, validate; raise ConfigError on any problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override, source=path)
    return validate_config(raw, source=path)


def validate_config(raw: dict[str, Any], source: str | Path = "<config>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {describe_validation_error(err)}") from None


def apply_override(raw: dict[str, Any], override: str, source: str | Path = "<config>") -> None:
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: {part!r} is not a section in {source}")
        node = child
    node[parts[-1]] = value


def describe_validation_error(err: ValidationError) -> str:
    problems = []
    for problem in err.errors():
        location = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            problems.append(f"unknown key {location!r}{did_you_mean(problem['loc'])}")
        elif problem["type"] == "missing":
            problems.append(f"missing required key {location!r}")
        else:
            problems.append(f"{location}: {problem['msg']} (got {problem.get('input')!r})")
    return "; ".join(problems)


def did_you_mean(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    matches = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    if not matches:
        return ""
    return f" (did you mean {'.'.join([*map(str, loc[:-1]), matches[0]])!r}?)"


def dump_config(config: PipelineConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
