"""CLIP scores from a trained checkpoint, and their calibration on held-out pairs.

`calibrate` scores every held-out image with its own caption (matched) and with the caption of another
image drawn with a fixed seed (mismatched), and suggests the threshold that best separates the two.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from curate.io.wds import image_extension_of, iter_members

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
Objective = Literal["balanced_accuracy", "f1_mismatched"]
Pair = tuple[Any, str]  # (image as a path, encoded bytes or a PIL image; caption)


@dataclass
class ClipScorer:
    """An open_clip model with its val preprocess and tokenizer; `score` gives cosine similarities."""

    model: torch.nn.Module
    preprocess: Any
    tokenizer: Any
    device: torch.device
    batch_size: int = 256
    decode_threads: int = 2

    @classmethod
    def load(cls, checkpoint: Path | str | None, model: str, device: str = "auto", batch_size: int = 256) -> ClipScorer:
        """`checkpoint`: a file open_clip's `pretrained=` accepts (e.g. train_clip's), or None for random weights."""
        from curate.clip import ClipSpec, load_clip

        pretrained = str(checkpoint) if checkpoint is not None else None
        loaded = load_clip(ClipSpec(model, pretrained, device))
        return cls(loaded.model, loaded.preprocess, loaded.tokenizer, loaded.device, batch_size)

    def score(self, images: Sequence[Any], captions: Sequence[str]) -> np.ndarray:
        """Cosine similarity of each image with the caption at the same position."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        if not images:
            return np.zeros(0, dtype=np.float32)
        image_features = self.embed_images(images)
        text_features = self.embed_texts(captions)
        return np.einsum("ij,ij->i", image_features, text_features)

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """L2-normalised image embeddings; images decode and preprocess in threads."""
        import torch

        with ThreadPoolExecutor(max_workers=self.decode_threads) as pool:
            chunks = [
                self._encode(self.model.encode_image, torch.stack(list(pool.map(self._pixels, batch))))
                for batch in _batched(images, self.batch_size)
            ]
        return np.concatenate(chunks)

    def embed_texts(self, captions: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings."""
        chunks = [
            self._encode(self.model.encode_text, self.tokenizer(list(batch)))
            for batch in _batched(captions, self.batch_size)
        ]
        return np.concatenate(chunks)

    def _pixels(self, image: Any) -> torch.Tensor:
        return self.preprocess(open_image(image))

    def _encode(self, encode: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> np.ndarray:
        import torch

        with torch.inference_mode():
            features = encode(inputs.to(self.device)).float()
            features = torch.nn.functional.normalize(features, dim=-1)
        return features.cpu().numpy()


def open_image(image: Any) -> Image.Image:
    """A path, encoded bytes or a PIL image, as an RGB PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, bytes | bytearray):
        with Image.open(io.BytesIO(image)) as raw:
            return raw.convert("RGB")
    with Image.open(image) as raw:
        return raw.convert("RGB")


def _batched(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---------------------------------------------------------------- held-out pairs


def read_shard_pairs(shards: Sequence[Path]) -> list[Pair]:
    """(image bytes, caption) of every sample with an image and a .txt in `shards`, in shard order."""
    pairs: list[Pair] = []
    for shard in shards:
        for _, members in iter_members(shard):
            extension = image_extension_of(members)
            if extension is not None and "txt" in members:
                pairs.append((members[extension], members["txt"].decode("utf-8")))
    return pairs


def mismatched_captions(captions: Sequence[str], seed: int) -> list[str]:
    """For each position, the caption of another position (a seeded derangement), never an identical text
    where an alternative exists: an identical caption would make a 'mismatched' pair a matched one."""
    n = len(captions)
    if n < 2:
        raise ValueError("need at least two pairs to build mismatched ones")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    result = [""] * n
    for rank, i in enumerate(order):
        for step in range(1, n):
            j = order[(rank + step) % n]
            if captions[j] != captions[i]:
                break
        result[i] = captions[j]
    return result


# ---------------------------------------------------------------- thresholds


def suggest_threshold(
    matched: np.ndarray, mismatched: np.ndarray, objective: Objective = "balanced_accuracy"
) -> tuple[float, float]:
    """The threshold t (keep score >= t) that maximises `objective`, and the objective's value there.

    Candidates are midpoints between consecutive distinct scores, so for two separated clusters the
    threshold lands halfway across the gap. "f1_mismatched" is F1 of dropping the mismatched pairs.
    """
    matched, mismatched = np.sort(np.asarray(matched, float)), np.sort(np.asarray(mismatched, float))
    if not len(matched) or not len(mismatched):
        raise ValueError("need matched and mismatched scores")
    values = np.unique(np.concatenate([matched, mismatched]))
    candidates = (values[:-1] + values[1:]) / 2 if len(values) > 1 else values
    dropped_mismatched = np.searchsorted(mismatched, candidates, side="left")  # true positives
    dropped_matched = np.searchsorted(matched, candidates, side="left")  # false positives
    if objective == "balanced_accuracy":
        values_at = 0.5 * (dropped_mismatched / len(mismatched) + 1 - dropped_matched / len(matched))
    elif objective == "f1_mismatched":
        false_negatives = len(mismatched) - dropped_mismatched
        values_at = 2 * dropped_mismatched / np.maximum(2 * dropped_mismatched + dropped_matched + false_negatives, 1)
    else:
        raise ValueError(f"unknown objective {objective!r}")
    best = np.flatnonzero(values_at >= values_at.max() - 1e-12)
    pick = best[len(best) // 2]
    return float(candidates[pick]), float(values_at[pick])


def quantiles(scores: np.ndarray, qs: Sequence[float] = QUANTILES) -> dict[str, float]:
    return {f"{q:g}": float(v) for q, v in zip(qs, np.quantile(scores, qs), strict=True)}


def calibrate(
    checkpoint: Path | str | None,
    model: str,
    shards_or_pairs: Sequence[Path] | Sequence[Pair],
    *,
    seed: int = 0,
    objective: Objective = "balanced_accuracy",
    device: str = "auto",
    batch_size: int = 256,
    scorer: ClipScorer | None = None,
) -> dict[str, Any]:
    """Score held-out matched pairs and seeded mismatches; suggest the threshold that separates them.

    `shards_or_pairs`: webdataset shards (an image + txt per sample) or (image, caption) pairs, the image a path,
    encoded bytes or a PIL image. Pass `scorer` to reuse a loaded model.
    """
    pairs = _as_pairs(shards_or_pairs)
    images, captions = [p[0] for p in pairs], [p[1] for p in pairs]
    scorer = scorer or ClipScorer.load(checkpoint, model, device=device, batch_size=batch_size)
    image_features = scorer.embed_images(images)
    matched = _row_dot(image_features, scorer.embed_texts(captions))
    mismatched = _row_dot(image_features, scorer.embed_texts(mismatched_captions(captions, seed)))
    threshold, value = suggest_threshold(matched, mismatched, objective)
    log.info("calibrated on %d pairs: threshold %.4f (%s %.4f)", len(pairs), threshold, objective, value)
    return {
        "n_pairs": len(pairs),
        "seed": seed,
        "objective": objective,
        "matched_quantiles": quantiles(matched),
        "mismatched_quantiles": quantiles(mismatched),
        "suggested_threshold": threshold,
        objective: value,
    }


def _as_pairs(shards_or_pairs: Sequence[Path] | Sequence[Pair]) -> list[Pair]:
    items = list(shards_or_pairs)
    if items and all(isinstance(item, str | Path) for item in items):
        return read_shard_pairs([Path(item) for item in items])
    return [(image, str(caption)) for image, caption in items]


def _row_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)
