"""User plugins: filters of one's own (`filter.custom`) and per-sample scores from the embeddings (`embed.heads`),
named in the config by `module:function` or `module:Class`.

A plugin is called once per shard with a pyarrow table of the shard's samples and, as keyword arguments, the
embeddings it names in `needs` ("image_embeddings", "text_embeddings": float32 (n, dim), L2-normalised,
row-aligned with the table):

    filter:  plugin(table, **embeddings) -> (values, keep)   one number per row, and True where the row stays
    head:    plugin(table, **embeddings) -> values           one number per row, stored as a float32 column

A filter's table holds uid, url, caption, clip_score, every head's score column, width and height (the original
image size); a head's holds uid, url, caption and clip_score.

Optional attributes of the function or class: `name` (snake_case; default: its own name in snake_case) is a
filter's ledger reason and a head's column; `needs`; `rule`, on a filter instance, explains a drop in the ledger's
`detail` (e.g. ">= 0.5"); `Settings`, on a class, a dataclass or pydantic model that the config entry's other keys
are validated into (unknown keys are errors) and the class is constructed with. A class without `Settings` is
constructed with no arguments and takes no keys; a function takes none.

The driver imports each plugin in the stage's preflight (a bad path is a config error before any work); the
workers construct them in the stage's setup. What a plugin computes enters its stage's fingerprint: its
`__version__` (on the object or on its module) when it has one, else the bytes of the module file that defines
it, and the bytes of every file a setting names.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import pkgutil
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.config import ConfigError, PluginConfig
from curate.stage import content_identity

EMBEDDINGS = ("image_embeddings", "text_embeddings")
NAME = re.compile(r"[a-z][a-z0-9_]*")


class PluginError(ConfigError):
    """A plugin that cannot be used, or returned something other than its protocol says: retrying cannot help."""


@dataclass(frozen=True)
class Plugin:
    """A plugin found and checked in the driver (imported, settings validated), not yet constructed."""

    key: str
    """Its config key, e.g. 'filter.custom.0', which error messages name."""
    path: str
    target: Any
    name: str
    needs: tuple[str, ...]
    settings: Any
    """The validated `Settings` instance, or None."""
    given: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The settings as the config gave them."""

    def build(self) -> Callable[..., Any]:
        """The callable a task runs: the function, or an instance of the class (models load here)."""
        if not inspect.isclass(self.target):
            return self.target
        return self.target(self.settings) if self.settings is not None else self.target()

    def identity(self) -> dict[str, Any]:
        """What the plugin computes, for the fingerprint: its version or its source file's bytes, and the
        bytes of files its settings name (never their paths or modification times)."""
        module = sys.modules.get(getattr(self.target, "__module__", ""), None)
        version = getattr(self.target, "__version__", None) or getattr(module, "__version__", None)
        code = {"version": str(version)} if version is not None else {"source": content_identity(self.source_file())}
        files = {key: content_identity(value) for key, value in _file_settings(self.given)}
        return {"path": self.path, **code, "files": files}

    def source_file(self) -> Path:
        try:
            return Path(inspect.getsourcefile(self.target) or "")
        except TypeError:  # a builtin: no Python source
            raise PluginError(f"{self.key}: {self.path!r} has neither a __version__ nor a Python source file") from None

    def describe(self) -> str:
        return f"{self.key} ({self.path})"


def _file_settings(given: dict[str, Any]) -> Iterable[tuple[str, str]]:
    for key, value in given.items():
        values = value if isinstance(value, list) else [value]
        for index, item in enumerate(values):
            if isinstance(item, str) and Path(item).is_file():
                yield (key if len(values) == 1 else f"{key}.{index}"), item


# --------------------------------------------------------------------------------------------------
# Resolving `module:attr` in the driver


def resolve_plugins(refs: Sequence[PluginConfig], section: str, reserved: Iterable[str] = ()) -> list[Plugin]:
    """Import and check every plugin of `section` ('filter.custom', 'embed.heads'); their names must be unique
    and not among `reserved` (built-in filter names, metadata columns). Raises ConfigError."""
    taken = set(reserved)
    plugins = []
    for index, ref in enumerate(refs):
        plugin = resolve_plugin(ref, f"{section}.{index}")
        if plugin.name in taken:
            raise PluginError(
                f"{plugin.describe()}: the name {plugin.name!r} is already taken "
                f"({', '.join(sorted(taken))}); give the plugin a `name` attribute"
            )
        taken.add(plugin.name)
        plugins.append(plugin)
    return plugins


def resolve_plugin(ref: PluginConfig, key: str) -> Plugin:
    module_name, _, attr = ref.path.partition(":")
    module = import_plugin_module(module_name, key)
    if not hasattr(module, attr):
        public = [name for name in dir(module) if not name.startswith("_")]
        close = difflib.get_close_matches(attr, public, n=1, cutoff=0.6)
        hint = f" (did you mean '{module_name}:{close[0]}'?)" if close else ""
        raise PluginError(f"{key}: module {module_name!r} has no {attr!r}{hint}")
    target = getattr(module, attr)
    if not callable(target):
        raise PluginError(f"{key}: {ref.path!r} is a {type(target).__name__}, not a function or a class")
    settings = plugin_settings(target, ref.settings(), key, ref.path)
    if inspect.isclass(target):
        _check_constructor(target, settings, key, ref.path)
    return Plugin(
        key=key,
        path=ref.path,
        target=target,
        name=plugin_name(target, key, ref.path),
        needs=plugin_needs(target, key, ref.path),
        settings=settings,
        given=ref.settings(),
    )


def _check_constructor(target: type, settings: Any, key: str, path: str) -> None:
    """A class is constructed with its settings, or with nothing when it declares none: say so now, not in a task."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # no signature to read (a builtin): constructing it will tell
        return
    try:
        signature.bind(settings) if settings is not None else signature.bind()
    except TypeError as err:
        takes = "its Settings" if settings is not None else "no arguments (it declares no `Settings`)"
        raise PluginError(
            f"{key}: {path!r} is constructed with {takes}, but its __init__ does not take that: {err}"
        ) from None


def import_plugin_module(name: str, key: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and (name == err.name or name.startswith(f"{err.name}.")):
            raise PluginError(f"{key}: no module named {err.name!r}{_module_hint(err.name)}") from None
        raise PluginError(f"{key}: importing {name!r} failed: {err}") from err
    except Exception as err:  # the plugin's own module raised while importing: its message is the cause
        raise PluginError(f"{key}: importing {name!r} failed: {type(err).__name__}: {err}") from err


def _module_hint(missing: str) -> str:
    parent, _, leaf = missing.rpartition(".")
    try:
        search = importlib.import_module(parent).__path__ if parent else None
    except (ImportError, AttributeError):
        return ""
    names = [info.name for info in pkgutil.iter_modules(search)]
    close = difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)
    return f" (did you mean {'.'.join(filter(None, [parent, close[0]]))!r}?)" if close else ""


def snake_case(name: str) -> str:
    """MinAesthetic -> min_aesthetic, NSFWHead -> nsfw_head."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


def plugin_name(target: Any, key: str, path: str) -> str:
    name = getattr(target, "name", None)
    if name is None:
        name = snake_case(getattr(target, "__name__", ""))
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise PluginError(f"{key}: {path!r} has name {name!r}; a plugin's name must be snake_case ([a-z][a-z0-9_]*)")
    return name


def plugin_needs(target: Any, key: str, path: str) -> tuple[str, ...]:
    needs = getattr(target, "needs", ())
    if isinstance(needs, str) or not all(isinstance(need, str) for need in needs):
        raise PluginError(f"{key}: {path!r}: `needs` must be a tuple of names, e.g. ('image_embeddings',)")
    for need in needs:
        if need not in EMBEDDINGS:
            close = difflib.get_close_matches(need, EMBEDDINGS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PluginError(f"{key}: {path!r} needs {need!r}{hint}; a plugin may ask for {', '.join(EMBEDDINGS)}")
    return tuple(needs)


def plugin_settings(target: Any, given: dict[str, Any], key: str, path: str) -> Any:
    """The entry's keys (less `path`) validated into the class's `Settings`; unknown keys are errors."""
    from pydantic import BaseModel, TypeAdapter, ValidationError

    schema = getattr(target, "Settings", None) if inspect.isclass(target) else None
    if schema is None:
        if given:
            raise PluginError(
                f"{key}: {path!r} takes no settings (got {', '.join(map(repr, given))}); "
                "a plugin class declares the ones it takes in a `Settings` dataclass or pydantic model"
            )
        return None
    if inspect.isclass(schema) and issubclass(schema, BaseModel):
        fields = list(schema.model_fields)
    elif dataclasses.is_dataclass(schema):
        fields = [field.name for field in dataclasses.fields(schema)]
    else:
        raise PluginError(f"{key}: {path!r}: `Settings` must be a dataclass or a pydantic model")
    for name in given:
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
            hint = f" (did you mean '{key}.{close[0]}'?)" if close else ""
            raise PluginError(f"{key}: unknown setting {name!r} of {path!r}{hint}; it takes {', '.join(fields)}")
    try:
        return TypeAdapter(schema).validate_python(given)
    except ValidationError as err:
        problems = [
            f"{'.'.join([key, *map(str, problem['loc'])])}: {problem['msg'].removeprefix('Value error, ')} "
            f"(got {problem.get('input')!r})"
            if problem["type"] != "missing"
            else f"missing required setting {'.'.join([key, *map(str, problem['loc'])])!r} of {path!r}"
            for problem in err.errors()
        ]
        raise PluginError("; ".join(problems)) from None


# --------------------------------------------------------------------------------------------------
# Running plugins in a task


EmbeddingLoader = Callable[[str], np.ndarray]
"""need name -> float32 (n, dim) array row-aligned with the table."""


def plugin_inputs(plugin: Plugin, load: EmbeddingLoader) -> dict[str, np.ndarray]:
    return {need: load(need) for need in plugin.needs}


@dataclass(frozen=True)
class PluginFilter:
    """A filter plugin bound to one shard's embeddings, in the shape `apply_filters` takes (`decide`)."""

    plugin: Plugin
    function: Callable[..., Any]
    inputs: dict[str, np.ndarray]

    @property
    def name(self) -> str:
        return self.plugin.name

    @property
    def rule(self) -> str:
        rule = getattr(self.function, "rule", None)
        return str(rule) if rule is not None else f"{self.plugin.path} to keep it"

    def decide(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        result = self.function(table, **self.inputs)
        if not (isinstance(result, tuple) and len(result) == 2):
            returned = type(result).__name__
            raise PluginError(f"{self.plugin.describe()} returned {returned}; a filter returns (values, keep)")
        values, keep = result
        return as_values(values, table.num_rows, self.plugin), as_mask(keep, table.num_rows, self.plugin)


def head_scores(plugin: Plugin, function: Callable[..., Any], table: pa.Table, load: EmbeddingLoader) -> np.ndarray:
    """A head's float32 score per row of `table`."""
    if not table.num_rows:  # nothing to score: the plugin is not asked about an empty shard
        return np.zeros(0, np.float32)
    values = function(table, **plugin_inputs(plugin, load))
    return as_values(values, table.num_rows, plugin).astype(np.float32)


def as_values(values: Any, rows: int, plugin: Plugin) -> np.ndarray:
    array = _to_numpy(values, plugin)
    if array.shape != (rows,) or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise PluginError(
            f"{plugin.describe()} returned values of shape {array.shape} and dtype {array.dtype} for {rows} rows; "
            "it must return one number per row"
        )
    return array.astype(np.float64)


def as_mask(keep: Any, rows: int, plugin: Plugin) -> np.ndarray:
    if isinstance(keep, pa.Array | pa.ChunkedArray) and pa.types.is_boolean(keep.type):
        keep = pc.fill_null(keep, False)  # a null decision does not keep the row
    array = _to_numpy(keep, plugin)
    if array.shape != (rows,) or array.dtype != bool:
        raise PluginError(
            f"{plugin.describe()} returned a keep mask of shape {array.shape} and dtype {array.dtype} for {rows} "
            "rows; it must return one bool per row"
        )
    return array


def _to_numpy(values: Any, plugin: Plugin) -> np.ndarray:
    if isinstance(values, pa.ChunkedArray | pa.Array):
        return np.asarray(values.to_numpy(zero_copy_only=False))
    try:
        return np.asarray(values)
    except (TypeError, ValueError) as err:
        raise PluginError(f"{plugin.describe()} returned {type(values).__name__}, not an array: {err}") from None
