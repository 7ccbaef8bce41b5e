"""The typed pipeline config: YAML file + dotted `--set` overrides, validated once at load time."""

from __future__ import annotations

import difflib
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

PNG_COMPRESSION = 9  # png's encode_quality when not given: the smallest lossless shards


# Names the sample json (img2dataset's and curate's) and the ledger use: an input column kept beside them
# under the same name would overwrite one of them.
RESERVED_SAMPLE_FIELDS = frozenset(
    {
        *("uid", "source_uid", "url", "caption", "key", "status", "error_message", "exif"),
        *("width", "height", "original_width", "original_height", "md5", "sha256", "sha512"),
        *("stage", "reason", "detail", "clip_score"),
    }
)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def yes_no(value: Any) -> Any:
    """YAML 1.1 reads `yes`/`no`/`on`/`off` as booleans; a yes/no setting takes them back as words."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value


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
    task_rows: int = Field(
        1_000_000,
        gt=0,
        description="a parquet file with more rows is read as tasks of whole row groups of about this many",
    )
    hash_buckets: int | None = Field(
        None,
        gt=0,
        le=4096,
        description="partitions of the run-wide repeat and uid checks (default: one per 128 MiB of input)",
    )
    workers: int = Field(1, gt=0, description="input tasks run at once by the local executor")
    keep_columns: list[str] = Field(
        default_factory=list,
        description="more input columns carried into each sample's json (download and curated) and the ledger",
    )

    @field_validator("path")
    @classmethod
    def _non_empty_path(cls, value: str | list[str]) -> str | list[str]:
        if not value:
            raise ValueError("must name at least one file")
        return value

    @field_validator("header", mode="before")
    @classmethod
    def _header_words(cls, value: Any) -> Any:
        return yes_no(value)

    @field_validator("keep_columns")
    @classmethod
    def _keepable_columns(cls, value: list[str], info: ValidationInfo) -> list[str]:
        mapped = {info.data.get(key): key for key in ("url_col", "caption_col", "uid_col") if info.data.get(key)}
        seen: set[str] = set()
        for column in value:
            if column in seen:
                raise ValueError(f"{column!r} is listed twice")
            if column in mapped:
                raise ValueError(f"{column!r} is already carried as input.{mapped[column]}")
            if column in RESERVED_SAMPLE_FIELDS:
                raise ValueError(f"{column!r} is a field curate or img2dataset writes itself; it cannot be kept")
            seen.add(column)
        return value

    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)


DOWNLOAD_PRESETS: dict[str, dict[str, Any]] = {
    # model-sized shards for users who only need CLIP inputs: what a 224-px open_clip model's preprocess keeps
    "clip_224": {"image_size": 224, "resize_mode": "center_crop"},
}


class DownloadConfig(Section):
    """`preset: clip_224` sets image_size and resize_mode (keys given explicitly win); the saved config holds
    the settings it resolved to, so a preset and the same keys spelled out are the same download."""

    image_size: int = Field(256, gt=0)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "border"
    resize_only_if_bigger: bool = False
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(
        95,
        ge=0,
        le=100,
        description=f"jpg/webp: quality 1-100; png: zlib compression 0-9 (lossless), {PNG_COMPRESSION} when not given",
    )
    min_image_size: int = Field(0, ge=0, description="shorter side below this is dropped (min_side)")
    max_aspect_ratio: float = Field(float("inf"), gt=0)
    max_image_area: float = Field(float("inf"), gt=0)
    timeout: float = Field(10, gt=0, description="seconds per socket read; deadline_s bounds the whole request")
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
    guarded_fetch: bool = Field(
        True, description="fetch through curate's guarded client (deadline, byte cap, address guard, robots.txt)"
    )
    deadline_s: float = Field(30, gt=0, description="whole-request deadline, on top of the per-read timeout")
    max_bytes: int = Field(32 * 2**20, gt=0, description="bodies larger than this fail as too_large")
    max_pixels: int = Field(100_000_000, gt=0, description="declared pixel count above this: decompression_bomb")
    allow_hosts: list[str] = Field(
        default_factory=list, description="host or host:port allowed even if not globally routable (tests, demo)"
    )
    max_redirects: int = Field(5, ge=0)
    respect_robots_txt: bool = True
    user_agent: str = Field(
        "curate/0.1 (image-text dataset curation; +https://example.invalid/curate)",
        description="always names the tool and a contact",
    )
    per_host_connections: int = Field(8, gt=0, description="concurrent requests to one host")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay for transient failures (doubles)")
    max_retry_after_s: float = Field(10, ge=0, description="longest Retry-After honoured on a 429")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, raw: Any) -> Any:
        if not isinstance(raw, dict) or "preset" not in raw:
            return raw
        settings = dict(raw)
        name = settings.pop("preset")
        if name is None:
            return settings
        if name not in DOWNLOAD_PRESETS:
            close = difflib.get_close_matches(str(name), list(DOWNLOAD_PRESETS), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"preset {name!r} is unknown{hint}; the presets are {', '.join(DOWNLOAD_PRESETS)}")
        return {**DOWNLOAD_PRESETS[name], **settings}

    @model_validator(mode="before")
    @classmethod
    def _png_compression_default(cls, raw: Any) -> Any:
        # the default 95 is a jpg/webp quality; png's number is a compression level
        if isinstance(raw, dict) and raw.get("encode_format") == "png" and raw.get("encode_quality") is None:
            return {**raw, "encode_quality": PNG_COMPRESSION}
        return raw

    @field_validator("resize_mode", mode="before")
    @classmethod
    def _resize_mode_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads `no` as false

    @field_validator("encode_quality")
    @classmethod
    def _quality_fits_format(cls, value: int, info: ValidationInfo) -> int:
        encode_format = info.data.get("encode_format")
        low, high = (0, 9) if encode_format == "png" else (1, 100)
        if encode_format is not None and not low <= value <= high:
            what = "compression level" if encode_format == "png" else "quality"
            raise ValueError(f"must be a {encode_format} {what} in [{low}, {high}] for encode_format {encode_format}")
        return value


def _device_name(value: str) -> str:
    from curate.clip import valid_device

    if not valid_device(value):
        raise ValueError(f"unknown device {value!r}; give auto, cpu, cuda or cuda:N")
    return value


Device = Annotated[str, AfterValidator(_device_name)]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PLUGIN_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class PluginConfig(BaseModel):
    """A user plugin (`curate.plugins`): `path` is `module:function` or `module:Class`; every other key is a
    setting, checked against the plugin's `Settings` when the stage's preflight imports the module."""

    model_config = ConfigDict(extra="allow", frozen=True)

    path: str = Field(description="module:function or module:Class, importable where the tasks run")

    @model_validator(mode="before")
    @classmethod
    def _bare_path(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "path" not in raw:
            raise ValueError("needs a 'path': module:function or module:Class")
        return {"path": raw} if isinstance(raw, str) else raw

    @field_validator("path")
    @classmethod
    def _module_and_name(cls, value: str) -> str:
        if not PLUGIN_PATH.fullmatch(value):
            raise ValueError("must be module:function or module:Class, e.g. 'examples.plugins.aesthetic:MinAesthetic'")
        return value

    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class EmbedConfig(Section):
    model: str = Field("ViT-B-32", description="open_clip model name, or a path to a model-config JSON")
    pretrained: str | None = Field(None, description="open_clip pretrained tag, or a local checkpoint file")
    device: Device = Field("auto", description="auto, cpu, cuda or cuda:N; local workers spread over the GPUs")
    precision: Precision = Field("auto", description="auto: bf16 autocast on cuda, fp32 on cpu")
    batch_size: int = Field(256, gt=0)
    decode_workers: int = Field(
        2,
        ge=0,
        description="processes reading, decoding, preprocessing and tokenising batches ahead of the model, started "
        "once per worker and kept across shards; 0: one thread of the model's process",
    )
    decode: Literal["draft", "full", "gpu"] = Field(
        "draft",
        description="JPEG decoding: draft (PIL at the smallest DCT scale covering the model's input), full (PIL at "
        "full size), gpu (torchvision.io.decode_jpeg on the model's cuda device); each gives other pixels",
    )
    workers: int = Field(1, gt=0, description="shards embedded at once by the local executor (one model each)")
    heads: list[PluginConfig] = Field(
        default_factory=list, description="plugins scoring each sample from its embeddings: extra metadata columns"
    )

    @field_validator("decode")
    @classmethod
    def _gpu_decode_needs_cuda(cls, value: str, info: ValidationInfo) -> str:
        if value == "gpu" and info.data.get("device") == "cpu":
            raise ValueError("'gpu' decodes on the model's cuda device; embed.device is cpu (give cuda or auto)")
        return value


FILTER_PRESETS: dict[str, dict[str, Any]] = {
    "laion": {"clip_threshold": 0.28, "caption_min_chars": 5},
    "datacomp_basic": {"caption_min_words": 3, "caption_min_chars": 6, "min_side": 200, "max_aspect_ratio": 3.0},
}


class FilterConfig(Section):
    preset: Literal["laion", "datacomp_basic"] | None = Field(
        None, description="named settings; keys given explicitly win over the preset's"
    )
    caption_min_words: int | None = Field(None, ge=1, description="keep captions with at least this many words")
    caption_min_chars: int | None = Field(None, ge=1, description="keep captions with at least this many characters")
    min_side: int | None = Field(None, ge=1, description="keep images whose shorter original side is >= this")
    max_aspect_ratio: float | None = Field(None, ge=1, description="keep images with long/short side <= this")
    clip_threshold: float | None = Field(None, ge=-1, le=1, description="keep pairs with CLIP score >= this")
    clip_top_fraction: float | None = Field(
        None, gt=0, le=1, description="keep this fraction of the run's pairs with the highest CLIP score"
    )
    clip_combine: Literal["max", "threshold_only", "top_fraction_only"] | None = Field(
        None,
        validate_default=True,
        description="when clip_threshold and clip_top_fraction are both set: 'max' keeps pairs that pass both "
        "(the higher cutoff), or use only one of them; required then",
    )
    min_scores: dict[str, float] = Field(
        default_factory=dict, description="per embed.heads score column: keep samples scoring >= this"
    )
    max_scores: dict[str, float] = Field(
        default_factory=dict, description="per embed.heads score column: keep samples scoring <= this"
    )
    custom: list[PluginConfig] = Field(
        default_factory=list, description="plugin filters (module:function or module:Class), applied last"
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, raw: Any) -> Any:
        # keys given explicitly win, null included: `clip_threshold: null` removes the preset's threshold
        if isinstance(raw, dict) and raw.get("preset") in FILTER_PRESETS:
            return {**FILTER_PRESETS[raw["preset"]], **raw}
        return raw

    @field_validator("clip_combine")
    @classmethod
    def _combine_is_explicit(cls, value: str | None, info: ValidationInfo) -> str | None:
        threshold, fraction = info.data.get("clip_threshold"), info.data.get("clip_top_fraction")
        if value is None and threshold is not None and fraction is not None:
            raise ValueError(
                f"filter.clip_threshold ({threshold}) and filter.clip_top_fraction ({fraction}) are both set: "
                "choose how they combine with filter.clip_combine: max (keep pairs that pass both), "
                "threshold_only or top_fraction_only; or set one of them to null"
            )
        needed = {"threshold_only": ("clip_threshold", threshold), "top_fraction_only": ("clip_top_fraction", fraction)}
        if value in needed and needed[value][1] is None:
            raise ValueError(f"{value} needs filter.{needed[value][0]}, which is not set")
        return value

    def clip_rules(self) -> tuple[float | None, float | None]:
        """The (threshold, top fraction) that apply once clip_combine has chosen between them."""
        threshold = None if self.clip_combine == "top_fraction_only" else self.clip_threshold
        fraction = None if self.clip_combine == "threshold_only" else self.clip_top_fraction
        return threshold, fraction


class DedupConfig(Section):
    exact: bool = Field(True, description="drop byte-identical images (sha256), keeping the best CLIP score")
    near_threshold: float | None = Field(
        0.95, ge=-1, le=1, description="image-embedding cosine at which two samples are one group; null disables"
    )
    near_features: Literal["clip", "thumbnail"] = Field(
        "clip", description="what near-duplicate search compares: CLIP image embeddings or 16x16 colour thumbnails"
    )
    near_method: Literal["auto", "flat", "ivf"] = Field(
        "auto", description="'auto': exact search up to 10k samples, then the partitioned approximate search"
    )
    semantic_eps: float | None = Field(
        None, gt=0, lt=1, description="SemDeDup: drop within a k-means cluster above cosine 1 - eps; null disables"
    )
    semantic_clusters: int | None = Field(None, gt=0, description="k-means clusters (default from the run size)")
    partition_rows: int = Field(
        250_000,
        gt=0,
        description="samples per near/semantic partition and per exact-dedup bucket: one task's share of the run",
    )
    eval_sets: list[str] = Field(
        default_factory=list, description="folders of images or webdataset tar globs to decontaminate against"
    )
    contamination_threshold: float = Field(0.95, ge=-1, le=1)
    seed: int = 0


class MaterializeConfig(Section):
    samples_per_shard: int = Field(10_000, gt=0)


class ValidateConfig(Section):
    objective: Literal["clip", "simclr"] = Field("clip", description="simclr: image-only, NT-Xent on two views")
    model: str = Field("curate-tiny", description="open_clip model name, or a path to a model-config JSON")
    batch_size: int = Field(256, gt=0)
    samples_seen: int = Field(
        25_600,
        gt=0,
        validate_default=True,
        description="the compute budget, the same for every arm and seed: samples_seen // batch_size steps",
    )
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0, validate_default=True, description="fewer than the run's steps")
    weight_decay: float = Field(0.1, ge=0)
    seeds: int = Field(5, gt=0, description="every arm trains with seeds 0..seeds-1 (per seed, one initialisation)")
    device: Device = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Precision = Field("auto", description="auto: bf16 autocast on cuda, fp32 on cpu")
    augment: bool = True
    checkpoint_every: int = Field(100, gt=0, description="steps")
    decode_workers: int = Field(
        2, ge=0, description="processes building training batches ahead of the model (0: in the training process)"
    )
    workers: int = Field(
        1,
        gt=0,
        description="runs (arm, seed) trained at once by the local executor, each on its share of the cores "
        "(on cuda: one GPU each)",
    )
    decoded_cache_mb: int = Field(
        512, ge=0, description="per process building batches: decoded images kept after the first epoch (0: none)"
    )
    shuffle_buffer: int = Field(2_000, gt=0)
    simclr_temperature: float = Field(0.1, gt=0)
    baseline_size: int | Literal["curated", "all"] = Field(
        "curated", description="samples in the baseline's random subset of the download: as many as curated/, or all"
    )
    baseline_seed: int = Field(0, description="seed of the baseline's subset (one subset for every training seed)")
    arms: list[str] = Field(
        default_factory=lambda: ["baseline", "curated"],
        min_length=1,
        description="the training sets compared, the reference first: curated, baseline, no_filter, basic_filters, "
        "clip_score (see the README's Validation section)",
    )
    paired_bar: float = Field(
        5.0, gt=0, description="a pair of arms passes when its mean per-seed difference exceeds this many stds of them"
    )
    bar_metrics: list[str] | None = Field(
        None, description="metrics a pair must pass on; default: zero-shot accuracy on every eval-set task"
    )
    eval_set: str | None = Field(None, description="folder with images/ and labels.json, fixed before curation")
    classnames: list[str] | None = Field(None, description="zero-shot class names; default: the eval set's classes")
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {}.", "a drawing of a {}.", "a {} shape."])
    task_templates: dict[str, list[str]] = Field(
        default_factory=dict, description="zero-shot templates per eval-set task (labels.json tasks); else templates"
    )
    recall_ks: list[int] = Field(default_factory=lambda: [1, 5, 10])
    probe_train_fraction: float = Field(0.5, gt=0, lt=1)
    probe_l2: float = Field(1e-3, ge=0)
    eval_batch_size: int = Field(256, gt=0)

    @field_validator("arms")
    @classmethod
    def _known_arms(cls, value: list[str]) -> list[str]:
        from curate.stages.validate.arms import ARMS

        for name in value:
            if name not in ARMS:
                close = difflib.get_close_matches(name, list(ARMS), n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown arm {name!r}{hint}; the arms are {', '.join(ARMS)}")
        if len(set(value)) != len(value):
            raise ValueError(f"lists an arm twice: {value}")
        return value

    @field_validator("samples_seen")
    @classmethod
    def _at_least_one_batch(cls, value: int, info: ValidationInfo) -> int:
        batch_size = info.data.get("batch_size")
        if batch_size is not None and value < batch_size:
            raise ValueError(f"must be at least one batch (validate.batch_size = {batch_size})")
        return value

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_within_the_run(cls, value: int, info: ValidationInfo) -> int:
        batch_size, samples_seen = info.data.get("batch_size"), info.data.get("samples_seen")
        if batch_size is None or samples_seen is None:
            return value  # reported on their own keys
        steps = samples_seen // batch_size
        if value >= steps:
            raise ValueError(
                f"must be less than the run's {steps} steps "
                f"(validate.samples_seen {samples_seen} // validate.batch_size {batch_size})"
            )
        return value


class DaskConfig(Section):
    n_workers: int | None = Field(None, gt=0, description="LocalCluster worker processes (default: one per core)")
    threads_per_worker: int = Field(1, gt=0)
    memory_limit: str = Field("auto", description="per LocalCluster worker, e.g. '4GiB'")
    dashboard_address: str = Field(":0", description="LocalCluster dashboard; ':0' picks a free port")
    shard_retries: int = Field(2, ge=0, description="extra attempts for a shard whose task raised")
    worker_profiler: bool = Field(
        False, description="Dask's statistical profiler in LocalCluster workers (samples each worker every 10 ms)"
    )


class StorageConfig(Section):
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options for every URL path (s3://, gs://, ...): e.g. client_kwargs.endpoint_url, "
        "profile, anon, key, secret; s3fs also reads the AWS_* environment variables. Credentials (key, secret, "
        "tokens, passwords) are not written to the run directory's config.yaml",
    )


def _known_stage(name: str) -> str:
    from curate.stages import stage_names

    order = list(stage_names())
    if name not in order:
        close = difflib.get_close_matches(name, order, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown stage {name!r}{hint}; the stages are {', '.join(order)}")
    return name


def _default_stages() -> list[str]:
    from curate.stages import default_stage_names

    return list(default_stage_names())


# A field named `validate` shadows a deprecated BaseModel method; the field is what we want.
warnings.filterwarnings("ignore", message='Field name "validate"', category=UserWarning)


class PipelineConfig(Section):
    output: str
    executor: Literal["local", "dask"] = "local"
    scheduler: str | None = Field(None, description="address of a running Dask scheduler")
    stages: list[Annotated[str, AfterValidator(_known_stage)]] = Field(
        default_factory=_default_stages, description="the first stages of the registry (curate.stages.STAGES)"
    )
    dask: DaskConfig = Field(default_factory=DaskConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    input: InputConfig
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    materialize: MaterializeConfig = Field(default_factory=MaterializeConfig)
    validate: ValidateConfig = Field(default_factory=ValidateConfig)

    @field_validator("stages")
    @classmethod
    def _stages_in_order(cls, stages: list[str]) -> list[str]:
        from curate.stages import stage_names

        order = list(stage_names())
        if stages != order[: len(stages)] or not stages:
            raise ValueError(f"must be the first stages of {order}, in that order")
        return stages


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a pipeline YAML, apply `key.sub=value` overrides, validate; raise ConfigError on any problem."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as stream:  # a file stream: YAML errors then name the file
            raw = yaml.load(stream, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    origins = {}
    for override in overrides:
        origins[apply_override(raw, override, source=path)] = override
    return validate_config(raw, source=path, origins=origins)


def validate_config(
    raw: dict[str, Any], source: str | Path = "<config>", origins: dict[str, str] | None = None
) -> PipelineConfig:
    """`origins` maps dotted keys set by `--set` to the override text, so errors can point at it."""
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {describe_validation_error(err, origins)}") from None


def apply_override(raw: dict[str, Any], override: str, source: str | Path = "<config>") -> str:
    """Set `key.sub=value` (value parsed as YAML) in `raw`; return the dotted key."""
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(part.strip() for part in parts):
        raise ConfigError(f"--set {override!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            section = ".".join(parts[: depth + 1])
            raise ConfigError(f"--set {override!r}: {section!r} is a value, not a section, in {source}")
        node = child
    node[parts[-1]] = value
    return ".".join(parts)


def describe_validation_error(err: ValidationError, origins: dict[str, str] | None = None) -> str:
    """One clause per problem key, in order: 'input.shard_size: Input should be greater than 0 (got 0)'."""
    problems: dict[str, list[str]] = {}
    for problem in err.errors():
        loc = _field_location(problem["loc"])
        location = ".".join(map(str, loc))
        if problem["type"] == "extra_forbidden":
            text = f"unknown key {location!r}{did_you_mean(loc)}"
        elif problem["type"] == "missing":
            text = f"missing required key {location!r}"
        else:
            message = problem["msg"].removeprefix("Value error, ")
            text = f"{location}: {message} (got {_short_repr(problem.get('input'))})"
        origin = _origin(location, origins or {})
        if origin:
            text += f" [from --set {origin}]"
        key = location if problem["type"] not in ("extra_forbidden", "missing") else text
        problems.setdefault(key, []).append(text)
    return "; ".join(_merge_alternatives(texts) for texts in problems.values())


def _field_location(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """`loc` without pydantic's union-member tags ('str', 'list[str]'): field names and list indexes."""
    kept: list[Any] = []
    model: type[BaseModel] | None = PipelineConfig
    for part in loc:
        if model is not None:
            kept.append(part)
            field = model.model_fields.get(str(part))
            annotation = field.annotation if field else None
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        elif isinstance(part, int):
            kept.append(part)
    return tuple(kept)


def _merge_alternatives(texts: list[str]) -> str:
    """Errors from each member of a union on one key: 'input.path: Input should be a valid string, or
    Input should be a valid list (got 5)'."""
    if len(texts) == 1:
        return texts[0]
    location, _, first = texts[0].partition(": ")
    messages = [text.partition(": ")[2].rsplit(" (got ", 1)[0] for text in texts]
    return f"{location}: {', or '.join(dict.fromkeys(messages))} (got {first.rsplit(' (got ', 1)[-1]}"


def _origin(location: str, origins: dict[str, str]) -> str | None:
    for key, override in origins.items():
        if location == key or location.startswith(f"{key}.") or key.startswith(f"{location}."):
            return override
    return None


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


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


SECRET_WORDS = ("secret", "token", "password", "credential", "access_key", "account_key")


def dump_config(config: PipelineConfig) -> str:
    """The config as the run directory keeps it: credentials in `storage.options` (key, secret, tokens,
    passwords, at any depth) are left out, so that a run directory can be shared; commands that reopen a run
    take them from the environment (AWS_* variables, a profile) or `--set` again."""
    dumped = config.model_dump(mode="json")
    dumped["storage"]["options"] = _without_secrets(dumped["storage"]["options"])
    return yaml.safe_dump(dumped, sort_keys=False)


def is_secret_option(name: str) -> bool:
    name = name.lower()
    return name == "key" or any(word in name for word in SECRET_WORDS)


def _without_secrets(options: Any) -> Any:
    if isinstance(options, dict):
        return {k: _without_secrets(v) for k, v in options.items() if not is_secret_option(str(k))}
    if isinstance(options, list):
        return [_without_secrets(v) for v in options]
    return options
