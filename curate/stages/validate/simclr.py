"""SimCLR: an image-only objective for validating image diversity rather than image-text alignment.

The encoder is the image tower of an open_clip model (so checkpoints load with open_clip like the CLIP
arm's); a two-layer projection head is trained with it and saved beside it. The loss is NT-Xent (Chen
et al. 2020) on two augmented views of each image. Data, optimiser, LR schedule and resume reuse the
CLIP trainer's pieces, so both objectives see the same seeded stream of samples; the forward passes run under
the loaded model's autocast (`validate.precision`), the loss in float32.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from curate.io.fs import temp_sibling
from curate.stages.validate.train import (
    CHECKPOINT_NAME,
    Progress,
    TrainRecipe,
    TrainResult,
    crop_params,
    load_checkpoint,
    make_optimizer,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torchvision.transforms import Compose

log = logging.getLogger(__name__)

CROP_SCALE = (0.2, 1.0)  # SimCLR's crops are much more aggressive than CLIP's (0.9, 1.0)
JITTER = 0.4  # brightness, contrast and saturation factors drawn from [1 - JITTER, 1 + JITTER]
JITTER_P, GRAYSCALE_P, FLIP_P = 0.8, 0.2, 0.5


def nt_xent_loss(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over 2N views: row i of `a` and row i of `b` are the positive pair, every other view a negative."""
    import torch
    import torch.nn.functional as F

    z = F.normalize(torch.cat([a, b]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(-torch.inf)  # a view is never its own candidate
    n = len(a)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def view_generator(seed: int, index: int, view: int) -> torch.Generator:
    import torch

    state = np.random.SeedSequence([seed, index, view]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def simclr_view(image: Any, train_transform: Compose, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop, flip, colour jitter and grey-scale, each drawn from `generator`; then open_clip's
    deterministic steps (to tensor, normalise)."""
    import torch
    import torchvision.transforms.functional as TF

    crop, *rest = train_transform.transforms
    top, left, h, w = crop_params(image.size, CROP_SCALE, crop.ratio, generator)
    image = TF.resized_crop(image, top, left, h, w, crop.size, crop.interpolation, antialias=True)

    def draw() -> float:
        return float(torch.rand(1, generator=generator))

    if draw() < FLIP_P:
        image = TF.hflip(image)
    if draw() < JITTER_P:
        for adjust in (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation):
            image = adjust(image, 1 - JITTER + 2 * JITTER * draw())
    if draw() < GRAYSCALE_P:
        image = TF.to_grayscale(image, num_output_channels=3)
    for transform in rest:
        image = transform(image)
    return image


@dataclass(frozen=True)
class TwoViewDecoder:
    """(index, jpg, caption) -> (view 1, view 2); the caption is ignored."""

    transform: Compose
    seed: int

    def __call__(self, index: int, jpg: bytes, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.finish(index, self.prepare(jpg, caption))

    def prepare(self, jpg: bytes, caption: str) -> tuple[Image.Image]:
        """The decoded image, which the batch stream may keep for the sample's later epochs."""
        from PIL import Image

        with Image.open(io.BytesIO(jpg)) as raw:
            return (raw.convert("RGB"),)

    def finish(self, index: int, prepared: tuple[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """The `index`-th sample's two views, each with its own RNG."""
        (image,) = prepared
        return tuple(simclr_view(image, self.transform, view_generator(self.seed, index, v)) for v in (0, 1))  # type: ignore[return-value]


def projection_head(dim: int) -> torch.nn.Module:
    import torch

    return torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), torch.nn.Linear(dim, dim))


def train_simclr(
    shards: Sequence[Path],
    recipe: TrainRecipe,
    out_dir: Path,
    temperature: float = 0.1,
    progress: Progress | None = None,
) -> TrainResult:
    """Train the image tower of `recipe.model` with NT-Xent (or resume out_dir/checkpoint.pt)."""
    import torch

    from curate.clip import load_clip
    from curate.stages.validate.batches import make_batches

    out_dir = Path(out_dir)
    path = out_dir / CHECKPOINT_NAME
    checkpoint = _resumable(path, recipe, temperature)
    if checkpoint is not None and checkpoint["step"] >= recipe.total_steps:
        return _result(path, checkpoint, recipe)
    torch.manual_seed(recipe.seed)  # the weights' initialisation
    loaded = load_clip(recipe.clip_spec, train=True)
    model, model_name, device, train_transform = loaded.model, loaded.model_name, loaded.device, loaded.train_preprocess
    head = projection_head(model.visual.output_dim).to(device)
    trainable = torch.nn.ModuleDict({"visual": model.visual, "head": head})
    optimizer = make_optimizer(trainable, recipe.lr, recipe.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=loaded.precision == "fp16")
    step, losses, seconds = 0, [], 0.0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["state_dict"])
        head.load_state_dict(checkpoint["head"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
        step, losses, seconds = int(checkpoint["step"]), list(checkpoint["losses"]), float(checkpoint["seconds"])
        log.info("resuming %s from step %d of %d", path, step, recipe.total_steps)
    start_step = step
    trainable.train()
    decoder = TwoViewDecoder(train_transform, recipe.seed)
    batches = make_batches(shards, decoder, recipe, step)
    loop = _Loop(model, head, optimizer, recipe, temperature, path, model_name, loaded.autocast, scaler)
    with contextlib.closing(batches):
        step, seconds = loop.run(batches, step, losses, seconds, progress)
    return TrainResult(path, list(losses), step * recipe.batch_size, seconds, step, start_step)


@dataclass
class _Loop:
    model: torch.nn.Module
    head: torch.nn.Module
    optimizer: torch.optim.Optimizer
    recipe: TrainRecipe
    temperature: float
    path: Path
    model_name: str
    autocast: Callable[[], AbstractContextManager[Any]]
    scaler: torch.amp.GradScaler

    def run(
        self,
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
        step: int,
        losses: list[float],
        seconds: float,
        progress: Progress | None,
    ) -> tuple[int, float]:
        from open_clip_train.scheduler import cosine_lr

        recipe = self.recipe
        schedule = cosine_lr(self.optimizer, recipe.lr, recipe.warmup_steps, recipe.total_steps)
        device = next(self.model.parameters()).device
        while step < recipe.total_steps:
            started = time.perf_counter()
            a, b = (x.to(device) for x in next(batches))
            schedule(step)
            self.optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                za, zb = self.head(self.model.encode_image(a)), self.head(self.model.encode_image(b))
            loss = nt_xent_loss(za.float(), zb.float(), self.temperature)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            losses.append(float(loss.detach()))
            step += 1
            seconds += time.perf_counter() - started
            if step % recipe.checkpoint_every == 0 or step == recipe.total_steps:
                self.save(step, losses, seconds)
            if progress is not None:
                progress(recipe.batch_size, losses[-1])
        return step, seconds

    def save(self, step: int, losses: list[float], seconds: float) -> None:
        """Plain types and tensors only; "state_dict" is the whole open_clip model, so open_clip loads it."""
        import torch

        payload = {
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "head": {k: v.detach().cpu() for k, v in self.head.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": step,
            "samples_seen": step * self.recipe.batch_size,
            "recipe": self.recipe.to_dict(),
            "objective": {"name": "simclr", "temperature": self.temperature},
            "model_name": self.model_name,
            "losses": list(losses),
            "seconds": seconds,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(self.path)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


def _resumable(path: Path, recipe: TrainRecipe, temperature: float) -> dict[str, Any] | None:
    if not path.exists():
        return None
    checkpoint = load_checkpoint(path)
    objective = checkpoint.get("objective", {})
    if recipe.same_run(checkpoint["recipe"]) and objective == {"name": "simclr", "temperature": temperature}:
        return checkpoint
    log.warning("%s was written by another recipe or objective; training from scratch", path)
    return None


def _result(path: Path, checkpoint: dict[str, Any], recipe: TrainRecipe) -> TrainResult:
    step = int(checkpoint["step"])
    return TrainResult(path, list(checkpoint["losses"]), step * recipe.batch_size, float(checkpoint["seconds"]), step)
