"""Train a small CLIP on webdataset shards: open_clip's model, preprocess, tokenizer, loss and LR schedule.

The data stream is a pure function of the recipe's seed: shards are shuffled per epoch, samples pass a
seeded shuffle buffer, and each sample's augmentation draws from its own generator (seeded by its
position in the stream), so how many worker processes decode, and which one builds which batch, does not
change what the model sees. A run resumed from a checkpoint therefore ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from curate.clip import PRECISIONS, ClipSpec, PixelSteps, autocast, valid_device
from curate.io.fs import temp_sibling

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torchvision.transforms import Compose

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
# Recipe fields that change how a run is executed, not what it computes: a checkpoint written under
# other values of these is still resumable.
EXECUTION_FIELDS = frozenset({"checkpoint_every", "decode_workers", "decoded_cache_mb"})
LOG_EVERY_STEPS = 10
MAX_LOGIT_SCALE = math.log(100)  # open_clip_train's clamp

Device = str  # auto, cpu, cuda or cuda:N
Precision = Literal["auto", "fp32", "bf16", "fp16"]  # auto: bf16 autocast on cuda, fp32 on cpu
Progress = Callable[[int, float], object]
"""Called after every step with the number of samples it consumed and the latest loss read: losses stay on the
device until a logging or checkpoint step (or the run's first step) reads them."""


@dataclass(frozen=True)
class TrainRecipe:
    model: str = "curate-tiny"  # open_clip model name, or a path to a model-config JSON
    batch_size: int = 256
    samples_seen: int = 25_600  # the compute budget: steps = samples_seen // batch_size
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.1
    seed: int = 0
    device: Device = "auto"
    precision: Precision = "fp32"  # validate.precision (default auto) sets it for the validate stage
    augment: bool = True
    checkpoint_every: int = 100  # steps
    decode_workers: int = 2  # processes building batches ahead of the model; 0: in the training process
    shuffle_buffer: int = 2_000  # samples
    decoded_cache_mb: int = 512  # per process building batches: decoded images kept after the first epoch

    def __post_init__(self) -> None:
        for name in ("batch_size", "samples_seen", "checkpoint_every", "shuffle_buffer"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainRecipe.{name} must be > 0, got {getattr(self, name)}")
        for name in ("decode_workers", "decoded_cache_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainRecipe.{name} must be >= 0, got {getattr(self, name)}")
        if self.samples_seen < self.batch_size:
            raise ValueError(f"TrainRecipe.samples_seen ({self.samples_seen}) is less than one batch")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"TrainRecipe.warmup_steps must be in [0, {self.total_steps}), got {self.warmup_steps}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("TrainRecipe.lr must be > 0 and weight_decay >= 0")
        if not valid_device(self.device) or self.precision not in PRECISIONS:
            raise ValueError(f"TrainRecipe: unknown device {self.device!r} or precision {self.precision!r}")

    @property
    def total_steps(self) -> int:
        return self.samples_seen // self.batch_size

    @property
    def clip_spec(self) -> ClipSpec:
        """The model to train: random weights, on the recipe's device and precision."""
        return ClipSpec(self.model, device=self.device, precision=self.precision, section="validate")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainRecipe:
        return cls(**raw)

    def same_run(self, other: TrainRecipe | dict[str, Any]) -> bool:
        """True when `other` computes the same weights (fields like checkpoint_every may differ)."""
        theirs = other if isinstance(other, dict) else other.to_dict()
        ours = self.to_dict()
        return {k: v for k, v in ours.items() if k not in EXECUTION_FIELDS} == {
            k: v for k, v in theirs.items() if k not in EXECUTION_FIELDS
        }


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    losses: list[float]
    samples_seen: int
    seconds: float
    steps: int
    resumed_from_step: int = 0


@dataclass
class TrainState:
    """Everything a step changes; what a checkpoint saves and restores."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------- data


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The augmentation RNG of the `index`-th sample of the stream."""
    import torch

    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def crop_params(
    size: tuple[int, int], scale: Sequence[float], ratio: Sequence[float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from `generator` instead of the global RNG."""
    import torch

    width, height = size
    area = width * height
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    # fallback to a central crop, as torchvision does
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_image(image: Any, train_transform: Compose, generator: torch.Generator) -> torch.Tensor:
    """open_clip's train transform (RandomResizedCrop, then deterministic steps) with a seeded crop."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import RandomResizedCrop

    crop, *rest = train_transform.transforms
    if not isinstance(crop, RandomResizedCrop):
        raise TypeError(f"expected open_clip's train transform to start with RandomResizedCrop, got {crop!r}")
    top, left, h, w = crop_params(image.size, crop.scale, crop.ratio, generator)
    image = TF.resized_crop(image, top, left, h, w, crop.size, crop.interpolation, antialias=crop.antialias)
    for transform in rest:
        image = transform(image)
    return image


@dataclass(frozen=True)
class SampleDecoder:
    """Turns (jpg bytes, caption) into model inputs; runs in the decode workers."""

    transform: Compose  # open_clip's train transform when augmenting, else its val transform
    tokenizer: Callable[[list[str]], torch.Tensor]
    augment: bool
    seed: int
    input_size: int | None = None  # the model's input side; JPEGs then decode at the smallest DCT scale that covers it
    uint8: bool = False
    """`transform` ends with the PIL steps (`PixelSteps.pil`): samples are (H, W, 3) uint8, a quarter of the
    bytes of float pixels, scaled and normalised per batch on the model's device (`PixelSteps.to_model_input`)."""

    def __call__(self, index: int, jpg: bytes, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.finish(index, self.prepare(jpg, caption))

    def prepare(self, jpg: bytes, caption: str) -> tuple[Image.Image, torch.Tensor]:
        """What does not depend on the sample's place in the stream: the decoded image and the tokens. The
        batch stream may keep it and pass it to `finish` again when the sample comes round in a later epoch."""
        from PIL import Image

        with Image.open(io.BytesIO(jpg)) as raw:
            if self.draft_side is not None:
                raw.draft("RGB", (self.draft_side, self.draft_side))
            image = raw.convert("RGB")
        return image, self.tokenizer([caption])[0]

    def finish(self, index: int, prepared: tuple[Image.Image, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The `index`-th sample of the stream from its prepared image and tokens (augmented with its own RNG)."""
        import torch

        image, tokens = prepared
        if self.augment:
            pixels = augment_image(image, self.transform, sample_generator(self.seed, index))
        else:
            pixels = self.transform(image)
        if self.uint8:
            pixels = torch.from_numpy(np.asarray(pixels if pixels.mode == "RGB" else pixels.convert("RGB")).copy())
        return pixels, tokens

    @functools.cached_property
    def draft_side(self) -> int | None:
        if self.input_size is None:
            return None
        return decode_side(self.input_size, self.transform if self.augment else None)


def decode_side(input_size: int, train_transform: Compose | None) -> int:
    """The smallest side a JPEG may decode to (libjpeg scales by 1/2, 1/4, 1/8 while decoding) so that the
    model still never sees an upsampled image: the input side, or, after a random crop keeping at least
    `scale[0]` of the area, the side that crop needs."""
    from torchvision.transforms import RandomResizedCrop

    crop = train_transform.transforms[0] if train_transform is not None else None
    if isinstance(crop, RandomResizedCrop):
        return math.ceil(input_size / math.sqrt(min(crop.scale)))
    return input_size


def input_side(model: torch.nn.Module) -> int:
    """The shorter side of the images `model` takes."""
    size = model.visual.image_size
    return min(size) if isinstance(size, tuple | list) else int(size)


# ---------------------------------------------------------------- optimisation


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW without weight decay on gains, biases and the logit scale (open_clip_train's grouping)."""
    import torch

    def exempt(name: str, param: torch.nn.Parameter) -> bool:
        return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if exempt(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exempt(n, p)], "weight_decay": weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def train_step(
    state: TrainState,
    loss_fn: torch.nn.Module,
    images: torch.Tensor,
    texts: torch.Tensor,
    precision: str,
    pixel_steps: PixelSteps | None = None,
) -> torch.Tensor:
    """One optimiser step on one batch; returns the loss, detached and on the device: reading its value waits
    for the step, so the loop reads losses only when it logs. uint8 images ((n, H, W, 3), from a decoder with
    `uint8`) are normalised on the device with `pixel_steps`."""
    import torch

    device = next(state.model.parameters()).device
    if images.dtype == torch.uint8:
        assert pixel_steps is not None, "uint8 images need the pixel steps that normalise them"
        images = pixel_steps.to_model_input(images, device)
    images, texts = images.to(device, non_blocking=True), texts.to(device, non_blocking=True)
    images = images.contiguous(memory_format=torch.channels_last)
    state.optimizer.zero_grad(set_to_none=True)
    with autocast(device, precision):
        image_features, text_features, logit_scale = state.model(images, texts)[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    with torch.no_grad():
        state.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return loss.detach()


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: TrainState, recipe: TrainRecipe, model_name: str) -> None:
    """Write the checkpoint atomically. Only plain types and tensors, so `torch.load(weights_only=True)`
    (what open_clip's `pretrained=path` uses) can read it; "state_dict" is the key open_clip looks for."""
    import torch

    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in state.model.state_dict().items()},
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "step": state.step,  # the LR schedule is a pure function of the step
        "samples_seen": state.step * recipe.batch_size,
        "recipe": recipe.to_dict(),
        "model_name": model_name,
        "losses": list(state.losses),
        "seconds": state.seconds,
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": cuda_rng_state(next(state.model.parameters()).device),
    }
    save_atomic(payload, path)


def cuda_rng_state(device: torch.device) -> torch.Tensor | None:
    """The RNG state of the one GPU a run trains on (None on cpu). Only that one: the machine that resumes the run
    may see another number of GPUs, and its training device need not have the same index."""
    import torch

    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def restore_cuda_rng_state(checkpoint: dict[str, Any], device: torch.device) -> None:
    """Put the saved GPU RNG state on `device`, the GPU this run now trains on; nothing on cpu. Checkpoints of
    older versions hold every visible GPU's state (`cuda_rng_states`): the entry of `device`'s index is used when
    there is one, so a checkpoint written with more GPUs than this machine has still resumes."""
    import torch

    if device.type != "cuda":
        return
    state = checkpoint.get("cuda_rng_state")
    if state is None and checkpoint.get("cuda_rng_states"):
        states, index = checkpoint["cuda_rng_states"], device.index or 0
        state = states[index] if index < len(states) else None
        if state is None:
            log.warning("checkpoint has no GPU RNG state for %s (it saved %d); not restoring it", device, len(states))
    if state is not None:
        torch.cuda.set_rng_state(state, device)


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary sibling, then rename: a reader never sees half a checkpoint."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    import torch

    return torch.load(path, map_location=map_location, weights_only=True)


def restore_state(state: TrainState, checkpoint: dict[str, Any]) -> None:
    """Weights, optimiser, scaler, progress and RNG states (the GPU's onto the model's device)."""
    import torch

    state.model.load_state_dict(checkpoint["state_dict"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.scaler.load_state_dict(checkpoint["scaler"])
    state.step = int(checkpoint["step"])
    state.losses = list(checkpoint["losses"])
    state.seconds = float(checkpoint["seconds"])
    torch.set_rng_state(checkpoint["torch_rng_state"])
    restore_cuda_rng_state(checkpoint, next(state.model.parameters()).device)


def export_model(checkpoint: Path, dest: Path) -> Path:
    """A slim copy of a training checkpoint (weights, model name, recipe; no optimizer state) that open_clip's
    `create_model_and_transforms(name, pretrained=dest)` loads."""
    full = load_checkpoint(checkpoint)
    save_atomic({k: full[k] for k in ("state_dict", "model_name", "recipe", "samples_seen", "step")}, dest)
    return dest


def _resumable(path: Path, recipe: TrainRecipe) -> dict[str, Any] | None:
    if not path.exists():
        return None
    checkpoint = load_checkpoint(path)
    if recipe.same_run(checkpoint["recipe"]):
        return checkpoint
    log.warning("%s was written by another recipe; training from scratch and replacing it", path)
    return None


# ---------------------------------------------------------------- the loop


def train_clip(
    shards: Sequence[Path], recipe: TrainRecipe, out_dir: Path, progress: Progress | None = None
) -> TrainResult:
    """Train `recipe.model` from scratch (or resume out_dir/checkpoint.pt) on the jpg+txt samples of `shards`."""
    import torch

    from curate.clip import load_clip
    from curate.stages.validate.batches import make_batches

    if not shards:
        raise ValueError("train_clip needs at least one shard")
    out_dir = Path(out_dir)
    path = out_dir / CHECKPOINT_NAME
    checkpoint = _resumable(path, recipe)
    if checkpoint is not None and checkpoint["step"] >= recipe.total_steps:
        log.info("%s is complete (%d steps); nothing to train", path, checkpoint["step"])
        return _result(path, checkpoint["losses"], recipe, checkpoint["seconds"], checkpoint["step"])

    torch.manual_seed(recipe.seed)  # the weights' initialisation
    loaded = load_clip(recipe.clip_spec, train=True)
    model, model_name = loaded.model.to(memory_format=torch.channels_last), loaded.model_name
    state = TrainState(
        model=model,
        optimizer=make_optimizer(model, recipe.lr, recipe.weight_decay),
        scaler=torch.amp.GradScaler(loaded.device.type, enabled=loaded.precision == "fp16"),
    )
    if checkpoint is not None:
        restore_state(state, checkpoint)
        log.info("resuming %s from step %d of %d", path, state.step, recipe.total_steps)
    start_step = state.step
    transform = loaded.train_preprocess if recipe.augment else loaded.preprocess
    steps = PixelSteps.from_preprocess(transform)
    decoder = SampleDecoder(
        transform=steps.pil if steps is not None else transform,
        tokenizer=loaded.tokenizer,
        augment=recipe.augment,
        seed=recipe.seed,
        input_size=input_side(model),
        uint8=steps is not None,
    )
    batches = make_batches(shards, decoder, recipe, state.step, pin_memory=loaded.device.type == "cuda")
    with contextlib.closing(batches):
        _run_steps(state, recipe, batches, path, model_name, progress, loaded.precision, steps)
    return _result(path, state.losses, recipe, state.seconds, state.step, start_step)


def _run_steps(
    state: TrainState,
    recipe: TrainRecipe,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    path: Path,
    model_name: str,
    progress: Progress | None,
    precision: str,
    pixel_steps: PixelSteps | None = None,
) -> None:
    import torch
    from open_clip import ClipLoss
    from open_clip_train.scheduler import cosine_lr

    loss_fn = ClipLoss()
    schedule = cosine_lr(state.optimizer, recipe.lr, recipe.warmup_steps, recipe.total_steps)
    waited = 0.0
    window_start, window_steps = time.perf_counter(), 0
    unread: list[torch.Tensor] = []  # losses still on the device: read at logging and checkpoint steps only
    while state.step < recipe.total_steps:
        started = time.perf_counter()
        images, texts = next(batches)
        fetched = time.perf_counter()
        lr = schedule(state.step)
        unread.append(train_step(state, loss_fn, images, texts, precision, pixel_steps))
        state.step += 1
        state.seconds += time.perf_counter() - started
        waited += fetched - started
        window_steps += 1
        logs = state.step % LOG_EVERY_STEPS == 0 or state.step == recipe.total_steps
        saves = state.step % recipe.checkpoint_every == 0 or state.step == recipe.total_steps
        if logs or saves or not state.losses:
            state.losses.extend(torch.stack(unread).tolist())
            unread.clear()
        if logs:
            rate = window_steps * recipe.batch_size / (time.perf_counter() - window_start)
            latest = state.losses[-1]
            log.info("step %d/%d loss %.4f lr %.2e %.0f samples/s", state.step, recipe.total_steps, latest, lr, rate)
            window_start, window_steps = time.perf_counter(), 0
        if saves:
            save_checkpoint(path, state, recipe, model_name)
        if progress is not None:
            progress(recipe.batch_size, state.losses[-1])
    log.info("trained %d steps in %.1f s; %.1f s of it waiting for data", state.step, state.seconds, waited)


def _result(
    path: Path, losses: list[float], recipe: TrainRecipe, seconds: float, steps: int, start_step: int = 0
) -> TrainResult:
    return TrainResult(
        checkpoint=path,
        losses=list(losses),
        samples_seen=steps * recipe.batch_size,
        seconds=seconds,
        steps=steps,
        resumed_from_step=start_step,
    )
