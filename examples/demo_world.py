"""A synthetic web crawl with planted noise, and a loopback HTTP server for it.

``generate_world`` draws simple scenes (1-3 coloured shapes on a plain background)
and writes them under ``root/files``, together with ``root/truth.parquet`` holding
the ground truth of every crawl-table row: what the image shows, what the caption
claims, which noise ``kind`` was planted, and which row a duplicate copies.

``DemoServer`` serves ``root/files`` on 127.0.0.1; the first path segment selects
the behaviour (``/img`` plain, ``/optout`` adds ``X-Robots-Tag: noai``, ``/slow``
answers after a short delay, ``/hang`` stays silent longer than a downloader waits,
``/corrupt`` serves undecodable bytes as ``image/jpeg``). ``write_input_table``
writes the ``url, caption`` table that img2dataset consumes.

CLI::

    python -m examples.demo_world generate --root DIR [--n-base N] [--seed S]
    python -m examples.demo_world serve --root DIR --port 8765
    python -m examples.demo_world table --root DIR --base-url URL --out PATH
"""

from __future__ import annotations

import argparse
import collections
import io
import logging
import math
import shutil
import signal
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

RGB = tuple[int, int, int]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")

COLORS: dict[str, RGB] = {
    "red": (220, 30, 35),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "purple": (130, 45, 170),
    "orange": (245, 135, 20),
    "black": (15, 15, 15),
    "white": (248, 248, 248),
}

BACKGROUNDS: dict[str, RGB] = {
    "white": (242, 242, 242),
    "grey": (128, 128, 128),
    "black": (28, 28, 28),
    "beige": (232, 218, 190),
    "light blue": (178, 208, 238),
    "pink": (246, 196, 208),
    "navy": (22, 32, 84),
}

BACKGROUND_SYNONYMS: dict[str, tuple[str, ...]] = {"grey": ("grey", "gray")}

MIN_COLOR_DISTANCE = 150.0
MIN_LUMINANCE_GAP = 40.0

MISMATCH_FRACTION = 0.30
NOISE_FRACTIONS: dict[str, float] = {
    "junk_caption": 0.05,
    "dup_exact": 0.05,
    "dup_near": 0.05,
    "tiny": 0.02,
    "http_404": 0.02,
    "corrupt": 0.02,
    "opt_out": 0.02,
    "slow": 0.02,
    "timeout": 0.01,
    "invalid_url": 0.01,
    "dup_url_caption": 0.01,
}
MIN_ROWS_PER_KIND = 2
KINDS: tuple[str, ...] = ("clean", "mismatch", *NOISE_FRACTIONS)
DUP_KINDS: frozenset[str] = frozenset({"dup_exact", "dup_near", "dup_url_caption"})
KINDS_WITHOUT_IMAGE: frozenset[str] = frozenset({"http_404", "corrupt", "invalid_url"})
MIN_N_BASE = 20

PREFIX_BY_KIND: dict[str, str] = {
    "opt_out": "optout",
    "slow": "slow",
    "timeout": "hang",
    "corrupt": "corrupt",
}
DEFAULT_PREFIX = "img"

TRUTH_COLUMNS: tuple[str, ...] = (
    "row_key",
    "url_path",
    "caption",
    "kind",
    "shape",
    "color",
    "count",
    "caption_shape",
    "caption_color",
    "dup_of",
    "width",
    "height",
    "background",
)
INT_COLUMNS: tuple[str, ...] = ("count", "width", "height")

TABLE_FORMATS: tuple[str, ...] = ("parquet", "csv", "tsv", "jsonl")

DEFAULT_SIZE = 256
SUPERSAMPLE = 4

CAPTION_TEMPLATES: tuple[str, ...] = (
    "{np}",
    "{np} on a {bg} background",
    "{np} on {bg}",
    "photo of {np}",
    "a photo of {np} on a {bg} background",
    "an illustration of {np}",
    "{np} against a plain {bg} backdrop",
    "simple drawing of {np}",
    "picture showing {np} on a {bg} background",
    "clip art: {np}",
    "close-up of {np}",
    "{bare} on {bg}",
    "{bare}",
    "{np}, flat style",
)

COUNT_WORDS: dict[int, tuple[str, ...]] = {
    1: ("a", "one", "a single"),
    2: ("two", "2", "a pair of"),
    3: ("three", "3"),
}

INVALID_URL_PATTERNS: tuple[str, ...] = (
    "ftp://demo.invalid/{key}.jpg",
    "",
    "not a url",
    "javascript:alert(1)",
    "mailto:webmaster@demo.invalid",
    "http//demo.invalid/{key}.jpg",
)

CONTENT_TYPES: dict[str, str] = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
}


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    count: int
    background: str
    width: int
    height: int


@dataclass(frozen=True)
class World:
    """A generated crawl.

    ``truth`` has one row per input-table row, in the same order as the table that
    ``write_input_table`` writes, so table row ``i`` is ``truth.iloc[i]``. The pair
    ``(url, caption)`` also identifies a truth row, except that a ``dup_url_caption``
    row repeats the pair of its ``dup_of`` row (which always comes earlier).
    """

    root: Path
    truth: pd.DataFrame

    @property
    def files_dir(self) -> Path:
        return self.root / "files"

    def kind_counts(self) -> dict[str, int]:
        counts = self.truth["kind"].value_counts()
        return {kind: int(counts.get(kind, 0)) for kind in KINDS}

    def file_path(self, row_key: str) -> Path | None:
        """Path of the file served for ``row_key``; None for 404 and invalid-url rows."""
        row = self.truth.loc[self.truth["row_key"] == row_key].iloc[0]
        if row["kind"] in ("http_404", "invalid_url"):
            return None
        return self.files_dir / row["url_path"]


def classes() -> list[str]:
    """Shape class names, in a fixed order."""
    return list(SHAPES)


def colors() -> list[str]:
    """Shape colour names, in a fixed order."""
    return list(COLORS)


def kind_counts(n_base: int) -> dict[str, int]:
    """How many rows of each kind a world with ``n_base`` clean-image rows has.

    ``n_base`` rows carry a freshly drawn image and a real caption (``clean`` or
    ``mismatch``); the noise kinds are added on top so that each makes up roughly
    its ``NOISE_FRACTIONS`` share of the final table, with at least two rows each.
    """
    if n_base < MIN_N_BASE:
        raise ValueError(f"n_base must be at least {MIN_N_BASE}, got {n_base}")
    total = n_base / (1.0 - sum(NOISE_FRACTIONS.values()))
    n_mismatch = round(MISMATCH_FRACTION * n_base)
    counts = {"clean": n_base - n_mismatch, "mismatch": n_mismatch}
    for kind, fraction in NOISE_FRACTIONS.items():
        counts[kind] = max(MIN_ROWS_PER_KIND, round(fraction * total))
    return counts


def _luminance(rgb: RGB) -> float:
    r, g, b = rgb
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _contrasts(a: RGB, b: RGB) -> bool:
    return math.dist(a, b) >= MIN_COLOR_DISTANCE and abs(_luminance(a) - _luminance(b)) >= MIN_LUMINANCE_GAP


def _contrasting_backgrounds(color: str) -> list[str]:
    return [name for name, rgb in BACKGROUNDS.items() if _contrasts(rgb, COLORS[color])]


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _plural(shape: str) -> str:
    return shape + "es" if shape.endswith(("s", "x")) else shape + "s"


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(rng: np.random.Generator, shape: str, color: str, count: int) -> str:
    noun = shape if count == 1 else _plural(shape)
    count_word = _pick(rng, COUNT_WORDS[count])
    if count_word == "a":
        return _with_article(f"{color} {noun}")
    return f"{count_word} {color} {noun}"


def _background_word(rng: np.random.Generator, background: str) -> str:
    return _pick(rng, BACKGROUND_SYNONYMS.get(background, (background,)))


def make_caption(rng: np.random.Generator, shape: str, color: str, count: int, background: str) -> str:
    """A caption that says exactly ``count`` ``color`` ``shape``s (and the background)."""
    template = _pick(rng, CAPTION_TEMPLATES)
    noun = shape if count == 1 else _plural(shape)
    caption = template.format(
        np=_noun_phrase(rng, shape, color, count),
        bare=f"{color} {noun}",
        bg=_background_word(rng, background),
    )
    if rng.random() < 0.2:
        caption = caption[0].upper() + caption[1:]
    return caption


def make_junk_caption(rng: np.random.Generator) -> str:
    number = int(rng.integers(1, 10_000))
    options = (
        f"IMG_{number:04d}.jpg",
        f"DSC{number:05d}",
        f"DSC_{number:04d}.JPG",
        f"{int(rng.integers(16**8)):08x}.png",
        f"screenshot {number}",
        "click here",
        "",
        "image",
        "untitled",
        "Untitled-1",
        "photo",
        "thumbnail",
        "download (1)",
    )
    return _pick(rng, options)


def _random_canvas_size(rng: np.random.Generator) -> tuple[int, int]:
    if rng.random() < 0.5:
        return DEFAULT_SIZE, DEFAULT_SIZE
    return int(rng.integers(200, 401)), int(rng.integers(200, 401))


def _tiny_canvas_size(rng: np.random.Generator) -> tuple[int, int]:
    short = int(rng.integers(16, 49))
    long = round(short * rng.uniform(1.0, 1.5))
    return (short, long) if rng.random() < 0.5 else (long, short)


def random_scene(rng: np.random.Generator, size: tuple[int, int] | None = None) -> Scene:
    color = _pick(rng, list(COLORS))
    width, height = size if size is not None else _random_canvas_size(rng)
    return Scene(
        shape=_pick(rng, SHAPES),
        color=color,
        count=int(rng.integers(1, 4)),
        background=_pick(rng, _contrasting_backgrounds(color)),
        width=width,
        height=height,
    )


def _mismatched_scene(rng: np.random.Generator, scene: Scene) -> Scene:
    """A scene whose shape and colour both differ from ``scene``'s."""
    shape = _pick(rng, [s for s in SHAPES if s != scene.shape])
    color = _pick(rng, [c for c in COLORS if c != scene.color])
    return Scene(
        shape=shape,
        color=color,
        count=int(rng.integers(1, 4)),
        background=_pick(rng, list(BACKGROUNDS)),
        width=scene.width,
        height=scene.height,
    )


def _rotate(points: list[tuple[float, float]], angle: float) -> list[tuple[float, float]]:
    cos, sin = math.cos(angle), math.sin(angle)
    return [(x * cos - y * sin, x * sin + y * cos) for x, y in points]


def _regular_polygon(n: int, radius: float, start: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [
        (radius * math.cos(start + 2 * math.pi * i / n), radius * math.sin(start + 2 * math.pi * i / n))
        for i in range(n)
    ]


def _star_outline(radius: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.42
        angle = -math.pi / 2 + math.pi * i / 5
        points.append((r * math.cos(angle), r * math.sin(angle)))
    return points


def _cross_outline(radius: float) -> list[tuple[float, float]]:
    a, b = radius * 0.85, radius * 0.3
    return [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]


def _heart_outline(radius: float) -> list[tuple[float, float]]:
    scale = radius / 17.0
    points = []
    for i in range(120):
        t = 2 * math.pi * i / 120
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        points.append((x * scale, (y - 2.5) * scale))
    return points


def shape_outline(shape: str, radius: float, angle: float) -> list[tuple[float, float]]:
    """Polygon outline of ``shape`` centred on the origin, fitting in ``radius``."""
    outlines = {
        "circle": lambda: _regular_polygon(96, radius),
        "square": lambda: _regular_polygon(4, radius, start=-math.pi / 4),
        "triangle": lambda: _regular_polygon(3, radius),
        "star": lambda: _star_outline(radius),
        "cross": lambda: _cross_outline(radius),
        "heart": lambda: _heart_outline(radius),
    }
    return _rotate(outlines[shape](), angle)


def _radius_range(count: int) -> tuple[float, float]:
    return {1: (0.24, 0.36), 2: (0.15, 0.21), 3: (0.12, 0.16)}[count]


def _place_shapes(
    rng: np.random.Generator, count: int, width: float, height: float
) -> list[tuple[float, float, float]]:
    """Non-overlapping (x, y, radius) placements inside the canvas."""
    low, high = _radius_range(count)
    radius = min(width, height) * rng.uniform(low, high)
    while True:
        placed: list[tuple[float, float, float]] = []
        for _ in range(400):
            if len(placed) == count:
                return placed
            r = radius * rng.uniform(0.85, 1.0)
            margin = r * 1.08
            x = rng.uniform(margin, width - margin)
            y = rng.uniform(margin, height - margin)
            if all(math.dist((x, y), (px, py)) > (r + pr) * 1.1 for px, py, pr in placed):
                placed.append((x, y, r))
        if len(placed) == count:
            return placed
        radius *= 0.85


def _jitter_color(rng: np.random.Generator, rgb: RGB, amount: int = 10) -> RGB:
    r, g, b = (int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)
    return r, g, b


def render_scene(rng: np.random.Generator, scene: Scene) -> Image.Image:
    """Draw ``scene`` supersampled, then downscale for anti-aliased edges."""
    big_w, big_h = scene.width * SUPERSAMPLE, scene.height * SUPERSAMPLE
    image = Image.new("RGB", (big_w, big_h), _jitter_color(rng, BACKGROUNDS[scene.background], 6))
    draw = ImageDraw.Draw(image)
    fill = _jitter_color(rng, COLORS[scene.color])
    for x, y, r in _place_shapes(rng, scene.count, big_w, big_h):
        angle = rng.uniform(-0.2, 0.2)
        outline = shape_outline(scene.shape, r, angle)
        draw.polygon([(x + dx, y + dy) for dx, dy in outline], fill=fill)
    return image.reduce(SUPERSAMPLE)


def encode_image(image: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _encode_random_format(rng: np.random.Generator, image: Image.Image) -> tuple[bytes, str]:
    if rng.random() < 0.2:
        return encode_image(image, "png"), ".png"
    return encode_image(image, "jpeg", quality=int(rng.integers(85, 96))), ".jpg"


def _corrupt_bytes(rng: np.random.Generator, scene: Scene) -> bytes:
    """Bytes that neither PIL nor OpenCV can decode, even leniently."""
    variant = int(rng.integers(3))
    if variant == 0:
        return rng.bytes(int(rng.integers(1_000, 8_000)))
    if variant == 1:
        return b"\xff\xd8\xff\xe0" + rng.bytes(int(rng.integers(1_000, 8_000)))
    jpeg = encode_image(render_scene(rng, scene), "jpeg")
    start_of_scan = jpeg.find(b"\xff\xda")
    return jpeg[: start_of_scan // 2]


def _near_duplicate(rng: np.random.Generator, original: bytes) -> tuple[bytes, str]:
    """Re-encode, shrink, or slightly crop ``original``; returns (bytes, transform name)."""
    image = Image.open(io.BytesIO(original)).convert("RGB")
    transform = _pick(rng, ("reencode", "resize", "crop"))
    if transform == "resize":
        factor = rng.uniform(0.85, 0.95)
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    elif transform == "crop":
        dx = int(image.width * rng.uniform(0.01, 0.025))
        dy = int(image.height * rng.uniform(0.01, 0.025))
        image = image.crop((dx, dy, image.width - dx, image.height - dy))
    quality = int(rng.integers(45, 70)) if transform == "reencode" else int(rng.integers(75, 90))
    return encode_image(image, "jpeg", quality=quality), transform


def _empty_truth_row(row_key: str, kind: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(TRUTH_COLUMNS)
    row.update(row_key=row_key, kind=kind)
    return row


def _image_fields(scene: Scene) -> dict[str, Any]:
    return {
        "shape": scene.shape,
        "color": scene.color,
        "count": scene.count,
        "background": scene.background,
        "width": scene.width,
        "height": scene.height,
    }


def _truthful_caption_fields(rng: np.random.Generator, scene: Scene) -> dict[str, Any]:
    return {
        "caption": make_caption(rng, scene.shape, scene.color, scene.count, scene.background),
        "caption_shape": scene.shape,
        "caption_color": scene.color,
    }


def _assign_kinds(rng: np.random.Generator, n_base: int) -> list[str]:
    kinds = [kind for kind, n in kind_counts(n_base).items() for _ in range(n)]
    return [kinds[i] for i in rng.permutation(len(kinds))]


def _row_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


class _WorldBuilder:
    """Builds truth rows and file contents; nothing touches the disk here."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rows: dict[str, dict[str, Any]] = {}
        self.files: dict[str, bytes] = {}

    def add_original(self, index: int, kind: str) -> None:
        rng = _row_rng(self.seed, index)
        key = f"r{index:05d}"
        row = _empty_truth_row(key, kind)
        prefix = PREFIX_BY_KIND.get(kind, DEFAULT_PREFIX)
        if kind in ("http_404", "invalid_url", "corrupt"):
            self._add_without_image(rng, row, prefix)
        else:
            self._add_with_image(rng, row, prefix)
        self.rows[key] = row

    def _add_with_image(self, rng: np.random.Generator, row: dict[str, Any], prefix: str) -> None:
        kind = row["kind"]
        size = _tiny_canvas_size(rng) if kind == "tiny" else None
        scene = random_scene(rng, size)
        data, ext = _encode_random_format(rng, render_scene(rng, scene))
        row.update(_image_fields(scene))
        if kind == "mismatch":
            lie = _mismatched_scene(rng, scene)
            row.update(_truthful_caption_fields(rng, lie))
        elif kind == "junk_caption":
            row["caption"] = make_junk_caption(rng)
        else:
            row.update(_truthful_caption_fields(rng, scene))
        row["url_path"] = f"{prefix}/{row['row_key']}{ext}"
        self.files[row["url_path"]] = data

    def _add_without_image(self, rng: np.random.Generator, row: dict[str, Any], prefix: str) -> None:
        kind = row["kind"]
        claimed = random_scene(rng)
        row.update(_truthful_caption_fields(rng, claimed))
        if kind == "invalid_url":
            row["url_path"] = _pick(rng, INVALID_URL_PATTERNS).format(key=row["row_key"])
        else:
            row["url_path"] = f"{prefix}/{row['row_key']}.jpg"
        if kind == "corrupt":
            self.files[row["url_path"]] = _corrupt_bytes(rng, claimed)

    def add_duplicate(self, index: int, kind: str, original_key: str) -> None:
        rng = _row_rng(self.seed, index)
        key = f"r{index:05d}"
        original = self.rows[original_key]
        row = _empty_truth_row(key, kind)
        row.update({c: original[c] for c in ("shape", "color", "count", "background", "width", "height")})
        row["dup_of"] = original_key
        if kind == "dup_url_caption":
            row.update({c: original[c] for c in ("url_path", "caption", "caption_shape", "caption_color")})
        else:
            scene = Scene(
                original["shape"],
                original["color"],
                original["count"],
                original["background"],
                original["width"],
                original["height"],
            )
            row.update(_truthful_caption_fields(rng, scene))
            self._add_duplicate_file(rng, row, original)
        self.rows[key] = row

    def _add_duplicate_file(self, rng: np.random.Generator, row: dict[str, Any], original: dict[str, Any]) -> None:
        source = self.files[original["url_path"]]
        if row["kind"] == "dup_exact":
            data, ext = source, Path(original["url_path"]).suffix
        else:
            data, _ = _near_duplicate(rng, source)
            ext = ".jpg"
            with Image.open(io.BytesIO(data)) as image:
                row["width"], row["height"] = image.size
        row["url_path"] = f"{DEFAULT_PREFIX}/{row['row_key']}{ext}"
        self.files[row["url_path"]] = data

    def make_invalid_pairs_unique(self) -> None:
        """Redraw captions of invalid-url rows whose (url, caption) pair is taken."""
        seen = {(r["url_path"], r["caption"]) for r in self.rows.values() if r["kind"] != "invalid_url"}
        for row in self.rows.values():
            if row["kind"] != "invalid_url":
                continue
            rng = _row_rng(self.seed, 1_000_003 + int(row["row_key"][1:]))
            while (row["url_path"], row["caption"]) in seen:
                row.update(_truthful_caption_fields(rng, random_scene(rng)))
            seen.add((row["url_path"], row["caption"]))


def _pick_originals(rng: np.random.Generator, clean_keys: list[str], n_needed: int) -> list[str]:
    replace = n_needed > len(clean_keys)
    return [clean_keys[i] for i in rng.choice(len(clean_keys), size=n_needed, replace=replace)]


def _table_order(rng: np.random.Generator, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shuffle rows, then swap any dup_url_caption row that precedes its original."""
    ordered = [rows[i] for i in rng.permutation(len(rows))]
    position = {row["row_key"]: i for i, row in enumerate(ordered)}
    dup_rows = [row for row in ordered if row["kind"] == "dup_url_caption"]
    for row in dup_rows:
        i, j = position[row["row_key"]], position[row["dup_of"]]
        if i < j:
            ordered[i], ordered[j] = ordered[j], ordered[i]
            position[ordered[i]["row_key"]], position[ordered[j]["row_key"]] = i, j
    return ordered


def _truth_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(TRUTH_COLUMNS))
    for column in INT_COLUMNS:
        frame[column] = frame[column].astype("Int64")
    return frame.reset_index(drop=True)


def _write_files(files_dir: Path, files: dict[str, bytes]) -> None:
    if files_dir.exists():
        shutil.rmtree(files_dir)
    for relative_path, data in sorted(files.items()):
        target = files_dir / relative_path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def generate_world(root: Path, n_base: int = 600, seed: int = 0) -> World:
    """Write ``root/files`` and ``root/truth.parquet``; same arguments give identical bytes.

    ``root/files`` is replaced on every call; nothing else under ``root`` is touched.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    kinds = _assign_kinds(rng, n_base)
    builder = _WorldBuilder(seed)
    for index, kind in enumerate(kinds):
        if kind not in DUP_KINDS:
            builder.add_original(index, kind)
    clean_keys = [key for key, row in builder.rows.items() if row["kind"] == "clean"]
    dup_indices = [i for i, kind in enumerate(kinds) if kind in DUP_KINDS]
    for index, original_key in zip(dup_indices, _pick_originals(rng, clean_keys, len(dup_indices)), strict=True):
        builder.add_duplicate(index, kinds[index], original_key)
    builder.make_invalid_pairs_unique()
    rows = [builder.rows[f"r{i:05d}"] for i in range(len(kinds))]
    truth = _truth_frame(_table_order(rng, rows))

    root.mkdir(parents=True, exist_ok=True)
    _write_files(root / "files", builder.files)
    truth.to_parquet(root / "truth.parquet", index=False)
    world = load_world(root)
    log.info("generated demo world at %s: %s", root, world.kind_counts())
    return world


def load_world(root: Path) -> World:
    root = Path(root)
    return World(root=root, truth=pd.read_parquet(root / "truth.parquet"))


def row_url(base_url: str, kind: str, url_path: str) -> str:
    if kind == "invalid_url":
        return url_path
    return base_url.rstrip("/") + "/" + url_path


def input_table(world: World, base_url: str) -> pd.DataFrame:
    """The crawl table (``url``, ``caption``), row ``i`` describing ``world.truth.iloc[i]``."""
    urls = [
        row_url(base_url, kind, url_path)
        for kind, url_path in zip(world.truth["kind"], world.truth["url_path"], strict=True)
    ]
    return pd.DataFrame({"url": urls, "caption": world.truth["caption"].tolist()})


def write_input_table(world: World, base_url: str, path: Path, fmt: str = "parquet") -> Path:
    """Write the crawl table with exactly the columns ``url`` and ``caption``.

    Rows are in the (deterministically shuffled) order of ``world.truth``: row ``i``
    of the written table is ``world.truth.iloc[i]``, so img2dataset's sample keys
    (which encode the input row index) map straight back to truth. The pair
    ``(url, caption)`` identifies the truth row too, except for ``dup_url_caption``
    rows, which repeat the pair of an earlier row by design (``dup_of`` names it).
    URLs are ``base_url + "/" + url_path``; ``invalid_url`` rows keep their literal
    invalid url. ``fmt`` is one of parquet, csv, tsv, jsonl.
    """
    if fmt not in TABLE_FORMATS:
        raise ValueError(f"fmt must be one of {TABLE_FORMATS}, got {fmt!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = input_table(world, base_url)
    if fmt == "parquet":
        table.to_parquet(path, index=False)
    elif fmt == "csv":
        table.to_csv(path, index=False)
    elif fmt == "tsv":
        table.to_csv(path, index=False, sep="\t")
    else:
        table.to_json(path, orient="records", lines=True, force_ascii=False)
    return path


class _DemoHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 512

    def __init__(
        self,
        address: tuple[str, int],
        files_dir: Path,
        slow_delay_s: float,
        hang_s: float,
        hits: collections.Counter[str],
    ) -> None:
        self.files_dir = files_dir.resolve()
        self.slow_delay_s = slow_delay_s
        self.hang_s = hang_s
        self.hits = hits
        self.hits_lock = threading.Lock()
        self.stopping = threading.Event()
        super().__init__(address, _DemoRequestHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("demo server: error while handling %s", client_address, exc_info=True)

    def record_hit(self, path: str) -> None:
        with self.hits_lock:
            self.hits[path] += 1

    def resolve(self, url_path: str) -> Path | None:
        relative = urllib.parse.unquote(url_path).lstrip("/")
        if not relative or ".." in Path(relative).parts:
            return None
        candidate = (self.files_dir / relative).resolve()
        if not candidate.is_file() or self.files_dir not in candidate.parents:
            return None
        return candidate


class _DemoRequestHandler(BaseHTTPRequestHandler):
    server: _DemoHTTPServer
    server_version = "DemoWorld/1.0"

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("demo server: " + fmt, *args)

    def _respond(self, send_body: bool) -> None:
        url_path = urllib.parse.urlsplit(self.path).path
        if send_body:
            self.server.record_hit(url_path)
        prefix = url_path.lstrip("/").split("/", 1)[0]
        if not self._wait_for_prefix(prefix):
            self.close_connection = True
            return
        file_path = self.server.resolve(url_path)
        try:
            if file_path is None:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", {}, send_body)
            else:
                self._send(
                    HTTPStatus.OK,
                    file_path.read_bytes(),
                    _content_type(prefix, file_path),
                    _extra_headers(prefix),
                    send_body,
                )
        except (BrokenPipeError, ConnectionResetError):
            log.debug("demo server: client went away during %s", url_path)

    def _wait_for_prefix(self, prefix: str) -> bool:
        """Sleep as the prefix demands; False when the server stopped meanwhile."""
        delays = {"slow": self.server.slow_delay_s, "hang": self.server.hang_s}
        if prefix not in delays:
            return True
        return not self.server.stopping.wait(delays[prefix])

    def _send(
        self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str], send_body: bool
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)


def _content_type(prefix: str, file_path: Path) -> str:
    if prefix == "corrupt":
        return "image/jpeg"
    return CONTENT_TYPES.get(file_path.suffix.lower(), "application/octet-stream")


def _extra_headers(prefix: str) -> dict[str, str]:
    return {"X-Robots-Tag": "noai"} if prefix == "optout" else {}


class DemoServer:
    """Serves a world's files over HTTP on a loopback port, in a daemon thread.

    ``hits`` counts GET requests per URL path (e.g. ``"/img/r00042.jpg"``), 404s and
    requests still sleeping included; it is updated under a lock.
    """

    def __init__(
        self,
        world_root: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        slow_delay_s: float = 0.5,
        hang_s: float = 5.0,
    ) -> None:
        self.world_root = Path(world_root)
        self.host = host
        self.port = port
        self.slow_delay_s = slow_delay_s
        self.hang_s = hang_s
        self.hits: collections.Counter[str] = collections.Counter()
        self._httpd: _DemoHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("DemoServer is not running; call start() first")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> DemoServer:
        if self._httpd is not None:
            return self
        files_dir = self.world_root / "files"
        if not files_dir.is_dir():
            raise FileNotFoundError(f"no demo world files at {files_dir}; run generate_world first")
        self._httpd = _DemoHTTPServer((self.host, self.port), files_dir, self.slow_delay_s, self.hang_s, self.hits)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="demo-world-server",
            daemon=True,
        )
        self._thread.start()
        log.info("demo server listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        httpd, thread = self._httpd, self._thread
        httpd.stopping.set()
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=2.0)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> DemoServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _format_from_path(path: Path) -> str:
    suffix = path.suffix.lstrip(".").lower()
    return suffix if suffix in TABLE_FORMATS else "parquet"


def _cmd_generate(args: argparse.Namespace) -> int:
    world = generate_world(Path(args.root), n_base=args.n_base, seed=args.seed)
    counts = world.kind_counts()
    print(f"demo world at {world.root}: {len(world.truth)} rows")
    for kind, n in counts.items():
        print(f"  {kind:<16} {n:>5}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    stop_requested = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    server = DemoServer(Path(args.root), host=args.host, port=args.port, slow_delay_s=args.slow_delay, hang_s=args.hang)
    try:
        with server:
            print(f"serving {args.root} at {server.base_url} (Ctrl-C to stop)", flush=True)
            while not stop_requested.wait(0.5):
                pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"served {sum(server.hits.values())} GET requests")
    return 0


def _cmd_table(args: argparse.Namespace) -> int:
    out = Path(args.out)
    fmt = args.format or _format_from_path(out)
    path = write_input_table(load_world(Path(args.root)), args.base_url, out, fmt=fmt)
    print(f"wrote {path} ({fmt})")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.demo_world", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="write files and truth.parquet")
    generate.add_argument("--root", required=True)
    generate.add_argument("--n-base", type=int, default=600)
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(handler=_cmd_generate)

    serve = commands.add_parser("serve", help="serve a generated world until Ctrl-C / SIGTERM")
    serve.add_argument("--root", required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--slow-delay", type=float, default=0.5)
    serve.add_argument("--hang", type=float, default=5.0)
    serve.set_defaults(handler=_cmd_serve)

    table = commands.add_parser("table", help="write the url/caption input table")
    table.add_argument("--root", required=True)
    table.add_argument("--base-url", required=True)
    table.add_argument("--out", required=True)
    table.add_argument(
        "--format", choices=TABLE_FORMATS, default=None, help="default: from the --out suffix, else parquet"
    )
    table.set_defaults(handler=_cmd_table)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
