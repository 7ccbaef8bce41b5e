"""Held-out evaluation sets: a folder of images plus `labels.json`, fixed before curation.

Layout (dedup's decontamination reads the same folder as a plain image folder):

    EVAL/labels.json       {"classes": [...], "items": [{"file": "images/00000.jpg", "label": "circle",
                             "caption": "a red circle on white", ...}, ...]}
    EVAL/images/*.jpg

`classes` and each item's `label` are the set's main task. An optional `"tasks": {"shape": [classes],
"color": [...], ...}` labels the same images for more tasks: each item then holds its class of task T under
the key T (the demo's sets label colour, shape and the joint class "red circle").
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from curate.io.fs import write_json_atomic

log = logging.getLogger(__name__)

LABELS_NAME = "labels.json"
DEMO_IMAGE_SIZE = 224  # the demo pipeline's download.image_size: eval images look like downloaded ones


@dataclass(frozen=True)
class EvalTask:
    classes: list[str]
    labels: list[int]  # index into `classes`, one per image


@dataclass(frozen=True)
class EvalSet:
    root: Path
    classes: list[str]
    files: list[Path]
    labels: list[int]  # index into `classes`
    captions: list[str]
    tasks: dict[str, EvalTask] = field(default_factory=dict)  # more labellings of the same images, by task name

    def __len__(self) -> int:
        return len(self.files)

    def load_image(self, index: int) -> Image.Image:
        with Image.open(self.files[index]) as image:
            return image.convert("RGB")


def load_eval_set(root: Path) -> EvalSet:
    """Read `root/labels.json`; raise FileNotFoundError / ValueError naming the file when it is unusable."""
    root = Path(root)
    path = root / LABELS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"validate.eval_set: no {LABELS_NAME} in {root}")
    raw = json.loads(path.read_text(encoding="utf-8"))
    classes = list(raw["classes"])
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({item["label"] for item in raw["items"]} - set(index))
    if unknown:
        raise ValueError(f"{path}: labels {unknown} are not in its classes {classes}")
    items = raw["items"]
    if not items:
        raise ValueError(f"{path}: no items")
    return EvalSet(
        root=root,
        classes=classes,
        files=[root / item["file"] for item in items],
        labels=[index[item["label"]] for item in items],
        captions=[str(item["caption"]) for item in items],
        tasks={name: _task(path, name, names, items) for name, names in (raw.get("tasks") or {}).items()},
    )


def _task(path: Path, name: str, classes: list[str], items: list[dict[str, Any]]) -> EvalTask:
    index = {label: i for i, label in enumerate(classes)}
    labels = []
    for i, item in enumerate(items):
        if item.get(name) not in index:
            raise ValueError(f"{path}: items[{i}] has {name}={item.get(name)!r}, not one of tasks.{name} {classes}")
        labels.append(index[item[name]])
    return EvalTask(classes=list(classes), labels=labels)


def eval_set_fingerprint(root: Path) -> str:
    """Changes when the labels or any image file changes (names and sizes; images are never edited in place)."""
    root = Path(root)
    digest = hashlib.sha256((root / LABELS_NAME).read_bytes())
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.name != LABELS_NAME):
        digest.update(f"{file.relative_to(root)}:{file.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def letterbox(image: Image.Image, size: int) -> Image.Image:
    """Resize the longer side to `size` and pad to a black square: img2dataset's `border` resize mode."""
    scale = size / max(image.size)
    resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return canvas


DEMO_LABELS = ("shape", "color", "joint")


def joint_classes() -> list[str]:
    """The demo's joint task: every colour-shape pair, named as captions name it ("red circle")."""
    from examples.demo_world import classes, colors

    return [f"{color} {shape}" for color in colors() for shape in classes()]


def make_demo_eval_set(out: Path, n: int, seed: int, image_size: int = DEMO_IMAGE_SIZE, label: str = "shape") -> Path:
    """Write `n` clean rows of a demo world drawn with `seed` (use one the demo's crawl and scorer do not):
    images resized like the demo download, their true `label` ("shape", "color" or "joint") as the main class and
    all three as tasks, their truthful caption. Returns `out`; an existing set made with the same arguments is
    kept as is."""
    from examples.demo_world import classes, colors, generate_world

    if label not in DEMO_LABELS:
        raise ValueError(f"make_demo_eval_set: label must be one of {DEMO_LABELS}, got {label!r}")
    out = Path(out)
    spec = {
        "n": n,
        "seed": seed,
        "image_size": image_size,
        "label": label,
        "tasks": list(DEMO_LABELS),
        "source": "examples.demo_world",
    }
    labels_path = out / LABELS_NAME
    if labels_path.is_file() and json.loads(labels_path.read_text()).get("spec") == spec:
        return out
    # about 70% of a world's rows are clean (see demo_world.kind_counts); draw with margin
    n_base = max(20, math.ceil(n / 0.6))
    with tempfile.TemporaryDirectory(prefix="curate-eval-") as tmp:
        world = generate_world(Path(tmp), n_base=n_base, seed=seed)
        clean = world.truth[world.truth["kind"] == "clean"].head(n)
        if len(clean) < n:
            raise ValueError(f"the demo world with n_base={n_base} has only {len(clean)} clean rows, {n} asked")
        shutil.rmtree(out / "images", ignore_errors=True)
        (out / "images").mkdir(parents=True, exist_ok=True)
        items = [
            _write_item(world.files_dir, out, i, row, image_size, label)
            for i, row in enumerate(clean.to_dict("records"))
        ]
    tasks = {"color": colors(), "shape": classes(), "joint": joint_classes()}
    write_json_atomic(labels_path, {"classes": tasks[label], "tasks": tasks, "spec": spec, "items": items})
    log.info("wrote %d evaluation images to %s", len(items), out)
    return out


def _write_item(files_dir: Path, out: Path, i: int, row: dict[str, Any], image_size: int, label: str) -> dict[str, Any]:
    with Image.open(files_dir / row["url_path"]) as raw:
        image = letterbox(raw.convert("RGB"), image_size)
    file = f"images/{i:05d}.jpg"
    image.save(out / file, quality=90)
    joint = f"{row['color']} {row['shape']}"
    return {
        "file": file,
        "label": joint if label == "joint" else row[label],
        "caption": row["caption"],
        "shape": row["shape"],
        "color": row["color"],
        "joint": joint,
        "count": int(row["count"]),
    }
