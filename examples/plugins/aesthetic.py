"""An aesthetic score the way LAION computes its aesthetic and NSFW scores: a linear head on the CLIP image
embeddings, its weights in an .npz file (`w`: (dim,) float, `b`: a scalar).

As an embed head it writes the column `aesthetic_score` into embed/metadata at embed time; a threshold on it is
then a cheap filter that can be changed without re-embedding:

    embed:
      heads: [{path: "examples.plugins.aesthetic:AestheticScore", weights: head.npz}]
    filter:
      min_scores: {aesthetic_score: 0.5}

As a filter it scores and decides in the filter stage, from the stored embeddings (ledger reason `min_aesthetic`):

    filter:
      custom: [{path: "examples.plugins.aesthetic:MinAesthetic", weights: head.npz, min_score: 0.5}]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator


class LinearHead:
    """score = embedding . w + b."""

    def __init__(self, weights: str) -> None:
        with np.load(weights) as data:
            self.w = np.asarray(data["w"], dtype=np.float32)
            self.b = float(data["b"])

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        if embeddings.shape[1] != len(self.w):
            raise ValueError(f"the head takes {len(self.w)}-d embeddings, the model gives {embeddings.shape[1]}-d ones")
        return embeddings @ self.w + self.b


class HeadSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: str = Field(description=".npz file with w (dim,) and b")

    @field_validator("weights")
    @classmethod
    def _exists(cls, value: str) -> str:
        if not Path(value).is_file():
            raise ValueError(f"no such file {value!r}")
        return value


class AestheticScore:
    """embed.heads: one score per sample, stored as the `aesthetic_score` column."""

    name = "aesthetic_score"
    needs = ("image_embeddings",)
    Settings = HeadSettings

    def __init__(self, settings: HeadSettings) -> None:
        self.head = LinearHead(settings.weights)

    def __call__(self, table: pa.Table, *, image_embeddings: np.ndarray) -> np.ndarray:
        return self.head(image_embeddings)


class MinAestheticSettings(HeadSettings):
    min_score: float = Field(description="keep samples scoring at least this")


class MinAesthetic:
    """filter.custom: keep samples whose aesthetic score is >= min_score."""

    needs = ("image_embeddings",)
    Settings = MinAestheticSettings

    def __init__(self, settings: MinAestheticSettings) -> None:
        self.head = LinearHead(settings.weights)
        self.min_score = settings.min_score
        self.rule = f">= {settings.min_score:g}"

    def __call__(self, table: pa.Table, *, image_embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = self.head(image_embeddings)
        return scores, scores >= self.min_score
