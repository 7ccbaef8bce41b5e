"""The one CLIP factory: every open_clip model curate uses (embed, scorer, decontamination, evaluation,
training, SimCLR, search) comes from `load_clip`.

A `ClipSpec` names the model (an open_clip registry name, or a path to a model-config JSON, registered under
its file stem), its weights (an open_clip pretrained tag, a local checkpoint file, or None for a random init),
the device (auto, cpu, cuda or cuda:N) and the precision (auto: bf16 autocast on cuda and fp32 on cpu; fp32; or
bf16 / fp16 autocast; on cuda, every precision but an explicit fp32 also runs float32 matmuls as TF32). `resolve_model`
checks names, files and tags without loading weights (what a stage's preflight calls); `load_clip` returns the
model on its device with open_clip's train and val transforms and its tokenizer, in eval mode or, for the
trainers, in train mode.

Nothing is downloaded from a model hub: a pretrained tag is accepted only when its weights are already in the
local cache, and it is then loaded with the hub in offline mode.

torch and open_clip are imported inside functions: importing this module must stay cheap for the CLI.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from curate.config import ConfigError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from curate.io.storage import Storage

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICE_PATTERN = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")
URL_CACHE_DIR = "~/.cache/clip"  # where open_clip's download_pretrained_from_url keeps URL-only tags

_registered_paths: set[Path] = set()


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP to load, and where; `section` is the config section that error messages name."""

    model: str
    pretrained: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    """auto, fp32, bf16 or fp16 (`resolve_precision`); fp32 here, as the callers that do not say want it."""
    section: str | None = None
    storage: Storage | None = None
    """How to read `pretrained` when it is a URL (s3://, gs://, ...); None: each protocol's defaults."""


def config_key(section: str | None, name: str) -> str:
    return f"{section}.{name}" if section else name


# --------------------------------------------------------------------------------------------------
# Names, files and tags


def register_model_configs(path: Path = MODEL_CONFIG_DIR) -> None:
    """Add curate's model configs (or one JSON file / folder) to open_clip's registry, once per process."""
    path = path.resolve()
    if path in _registered_paths:
        return
    import open_clip

    import curate.convnet  # noqa: F401  registers the image towers curate's configs name with timm

    open_clip.add_model_config(path)
    _registered_paths.add(path)


def resolve_model(spec: ClipSpec, fetch: bool = False) -> tuple[str, str | None]:
    """(open_clip registry name, pretrained tag or absolute checkpoint path or None); raise ConfigError.

    Cheap: reads at most a model-config JSON and looks at the weights cache, never loads weights. A checkpoint
    at a URL is looked up (and stays a URL) unless `fetch`: then it is the path of its local copy.
    """
    name = resolve_model_name(spec.model, spec.section)
    return name, resolve_pretrained(name, spec.pretrained, spec.section, spec.storage, fetch)


def resolve_model_name(model: str, section: str | None = None) -> str:
    """The open_clip registry name of `model`: a registered name (curate's own configs included; ViT-B/32 is
    spelled ViT-B-32), or a model-config JSON path, registered under its file stem."""
    import open_clip

    register_model_configs()
    if model.endswith(".json"):
        return _register_config_file(Path(model).expanduser(), section)
    name = model.replace("/", "-")  # open_clip's own spelling rule
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ConfigError(
            f"{config_key(section, 'model')}: unknown open_clip model {model!r}{hint}; "
            "give a registry name (open_clip.list_models()) or a path to a model-config .json"
        )
    return name


def _register_config_file(path: Path, section: str | None) -> str:
    import open_clip

    key = config_key(section, "model")
    if not path.is_file():
        raise ConfigError(f"{key}: no such model-config file {str(path)!r}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{key}: cannot read model-config file {str(path)!r}: {err}") from None
    required = ("embed_dim", "vision_cfg", "text_cfg")
    missing = [field for field in required if not isinstance(config, dict) or field not in config]
    if missing:
        raise ConfigError(f"{key}: {str(path)!r} is not an open_clip model config (missing {missing})")
    name = path.stem
    registered = open_clip.get_model_config(name)
    if registered is None or path.resolve() not in _registered_paths:
        if registered is not None and registered != config:
            # the registry is process-wide: registering would silently change what `name` means elsewhere
            raise ConfigError(
                f"{key}: {str(path)!r} would replace open_clip's registered model {name!r}; rename the file"
            )
        register_model_configs(path)
    elif registered != config:
        open_clip.add_model_config(path)  # our own file, edited since: re-read it
    return name


def resolve_pretrained(
    name: str, pretrained: str | None, section: str | None = None, storage: Storage | None = None, fetch: bool = False
) -> str | None:
    """An absolute checkpoint path (a URL's local copy when `fetch`, else the URL), a tag of `name` whose
    weights are cached locally, or None."""
    import open_clip

    from curate.io.storage import LOCAL, locate

    if pretrained is None:
        return None
    key = config_key(section, "pretrained")
    location = locate(pretrained)
    if isinstance(location, str):
        return _remote_checkpoint(location, storage or LOCAL, key, fetch)
    path = location
    if path.is_file():
        return str(path.resolve())
    if "/" in pretrained or os.sep in pretrained or pretrained.lower().endswith(CHECKPOINT_SUFFIXES):
        raise ConfigError(f"{key}: no such checkpoint file {pretrained!r}")
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if tag_cfg:
        _check_cached(name, pretrained, tag_cfg, key)
        return pretrained
    tags = open_clip.list_pretrained_tags_by_model(name)
    if not tags:
        raise ConfigError(
            f"{key}: {pretrained!r} is neither a file nor a tag: {name!r} has no pretrained tags, "
            "give a checkpoint file"
        )
    close = difflib.get_close_matches(pretrained.lower().replace("-", "_"), tags, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"{key}: {pretrained!r} is neither a file nor a pretrained tag of {name!r} "
        f"({hint}valid tags: {', '.join(tags)})"
    )


def _remote_checkpoint(url: str, storage: Storage, key: str, fetch: bool) -> str:
    from curate.io.local_copy import kind_of, local_copy

    if kind_of(url, storage, key) != "file":
        raise ConfigError(f"{key}: {url} is a folder, not a checkpoint file")
    return str(local_copy(url, storage, key)) if fetch else url


def _check_cached(name: str, tag: str, tag_cfg: dict[str, Any], key: str) -> None:
    found, looked = cached_tag_weights(tag_cfg)
    if found is None:
        raise ConfigError(
            f"{key}: weights of tag {tag!r} for model {name!r} are not in the local cache ({looked}); "
            "give a local checkpoint file, or download them first"
        )


def cached_tag_weights(tag_cfg: dict[str, Any]) -> tuple[str | None, str]:
    """(the locally cached weights file of an open_clip pretrained config, or None; where we looked).

    Follows open_clip's `download_pretrained`: a `file` entry as is; else the Hugging Face hub when the config
    names a repo and huggingface_hub is installed (its safetensors twin first); else the URL's file in
    open_clip's download folder. Only looks at the disk.
    """
    from open_clip.pretrained import has_hf_hub

    if tag_cfg.get("file"):
        file = str(tag_cfg["file"])
        return (file if os.path.isfile(file) else None), file
    if has_hf_hub() and tag_cfg.get("hf_hub"):
        return _cached_hf_file(tag_cfg["hf_hub"])
    if tag_cfg.get("url"):
        file = os.path.join(os.path.expanduser(URL_CACHE_DIR), os.path.basename(tag_cfg["url"]))
        return (file if os.path.isfile(file) else None), file
    return None, "the tag names no file, hub repo or URL"


def _cached_hf_file(hf_hub: str) -> tuple[str | None, str]:
    from huggingface_hub import constants, try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    # open_clip spells a hub entry 'org/repo/filename', or 'org/repo/' for its default weights file
    repo_id, filename = os.path.split(hf_hub)
    filename = filename or HF_WEIGHTS_NAME
    if filename == HF_WEIGHTS_NAME:
        candidates = [HF_SAFE_WEIGHTS_NAME, filename]
    elif filename.endswith((".bin", ".pth")):
        candidates = [filename[:-4] + ".safetensors", filename]
    else:
        candidates = [filename]
    for candidate in candidates:
        found = try_to_load_from_cache(repo_id, candidate)
        if isinstance(found, str):
            return found, f"{repo_id}/{candidate}"
    return None, f"{repo_id}/{filename} in the Hugging Face cache {constants.HF_HUB_CACHE}"


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face hub look-ups answer from the local cache, without a request (HF_HUB_OFFLINE semantics)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


# --------------------------------------------------------------------------------------------------
# Devices and precision


def valid_device(device: str) -> bool:
    """auto, cpu, cuda or cuda:N (spelling only; `resolve_device` checks what the machine has)."""
    match = DEVICE_PATTERN.fullmatch(device)
    return match is not None and (match[2] is None or match[1] == "cuda")


def resolve_device(device: str = "auto", precision: str = "fp32", section: str | None = None) -> torch.device:
    """The torch device `device` names on this machine; `auto` means cuda when torch sees one, else cpu."""
    import torch

    key, precision_key = config_key(section, "device"), config_key(section, "precision")
    if not valid_device(device):
        raise ConfigError(f"{key}: unknown device {device!r}; give auto, cpu, cuda or cuda:N")
    if precision not in PRECISIONS:
        raise ConfigError(f"{precision_key}: unknown precision {precision!r}; give auto, fp32, bf16 or fp16")
    kind, _, index = device.partition(":")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    elif kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} is {device!r} but torch sees no CUDA device on this machine")
    elif index and int(index) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"{key} is {device!r} but torch sees {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    if kind == "cpu" and precision == "fp16":
        raise ConfigError(f"{precision_key} 'fp16' needs a CUDA device; use 'fp32' (or 'bf16') on cpu")
    return torch.device(kind, int(index)) if index else torch.device(kind)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 autocast on cuda (what an H100-class GPU runs at full rate) and fp32 on cpu, where
    results then stay bit-identical to an explicit fp32; the other precisions are taken as given."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def configure_matmul(device: torch.device, precision: str) -> None:
    """On cuda, float32 matmuls (those autocast leaves in float32) run as TF32 unless fp32 was asked for
    explicitly, which stays IEEE float32. Process-wide in torch; cpu is never touched, since there the same
    switch may let oneDNN compute float32 products at lower precision."""
    import torch

    if device.type == "cuda":
        torch.set_float32_matmul_precision("highest" if precision == "fp32" else "high")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for `precision` on `device` (none for fp32, and for auto on cpu)."""
    import torch

    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def wants_gpu(device: str) -> bool:
    """Whether a model on `device` asks the executor for a GPU worker: cuda and cuda:N, and auto where this
    process's torch sees a GPU (the LocalCluster of a GPU machine; a remote cluster's head node with one)."""
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def worker_device(device: str, rank: int | None) -> str:
    """The device of the `rank`-th of several local worker processes: with cuda (or auto on a machine with
    GPUs), worker i takes cuda:(i mod the GPUs torch sees), one model per GPU. An explicit cuda:N, cpu, and a
    process that is no pool worker (rank None) keep `device` as given."""
    if rank is None or device not in ("auto", "cuda"):
        return device
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"cuda:{rank % count}" if count else device


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class PixelSteps:
    """open_clip's val transform split at its ToTensor.

    The PIL steps (resize, crop, RGB) run per image in the decode threads and give uint8 pixels; ToTensor's
    scaling and Normalize run once per batch on the model's device. Per-image torch ops in decode threads
    would each start an intra-op parallel region that competes with the model's threads (on a busy 2-core
    machine we measured ~35 ms per 224-px image for ToTensor + Normalize, against ~0.1 ms single-threaded),
    and uint8 is a quarter of the bytes to copy to a GPU. The arithmetic is ToTensor's and Normalize's own
    (x / 255, then (x - mean) / std, in float32), so the result is bit-identical to `preprocess`.
    """

    pil: Callable[[Image.Image], Image.Image]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_preprocess(cls, preprocess: Any) -> PixelSteps | None:
        from torchvision.transforms import Compose, Normalize, ToTensor

        steps = list(getattr(preprocess, "transforms", []))
        if len(steps) < 2 or not isinstance(steps[-2], ToTensor) or not isinstance(steps[-1], Normalize):
            return None
        if any(isinstance(step, (ToTensor, Normalize)) for step in steps[:-2]):
            return None
        normalize = steps[-1]
        return cls(Compose(steps[:-2]), tuple(map(float, normalize.mean)), tuple(map(float, normalize.std)))

    def pixels(self, image: Image.Image) -> np.ndarray:
        """(H, W, 3) uint8 after the PIL steps."""
        image = self.pil(image)
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))

    def to_model_input(
        self, pixels: torch.Tensor, device: torch.device, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(n, H, W, 3) uint8 on any device -> normalised (n, 3, H, W) float32 on `device` (in `out` if given:
        a float32 tensor of that shape there)."""
        import torch

        x = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2)
        # uint8 to float32 is exact: copying into `out` gives the values of converting first
        x = x.contiguous().to(torch.float32) if out is None else out.copy_(x)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        return x.div_(255).sub_(mean).div_(std)


@dataclass(frozen=True)
class LoadedClip:
    """A model on its device with open_clip's transforms (val: `preprocess`) and tokenizer."""

    model: Any
    preprocess: Callable[[Image.Image], torch.Tensor]
    train_preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device
    model_name: str
    embed_dim: int
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    precision: str = "fp32"
    """What `autocast` runs: fp32, bf16 or fp16 (`auto` resolved for the device)."""
    pixel_steps: PixelSteps | None = None
    """`preprocess` split for batch work (None when its shape is not the usual one: then it runs per image)."""


def load_clip(spec: ClipSpec, *, train: bool = False) -> LoadedClip:
    """Load the model `spec` names: in eval mode, or with `train` in train mode (random weights expected).

    Draws from torch's global RNG only to initialise the weights, so a trainer seeds it just before.
    """
    import open_clip

    name, pretrained = resolve_model(spec, fetch=True)
    device = resolve_device(spec.device, spec.precision, spec.section)
    if pretrained is None and not train:
        log.warning(
            "%s: model %s has random weights (%s is not set): its scores mean nothing",
            spec.section or "clip",
            name,
            config_key(spec.section, "pretrained"),
        )
    model, train_preprocess, preprocess = _create(name, pretrained, device, spec.section)
    model.train(train)
    configure_matmul(device, spec.precision)
    precision = resolve_precision(spec.precision, device)
    return LoadedClip(
        model=model,
        preprocess=preprocess,
        train_preprocess=train_preprocess,
        tokenizer=open_clip.get_tokenizer(name),
        device=device,
        model_name=name,
        embed_dim=int(open_clip.get_model_config(name)["embed_dim"]),
        autocast=functools.partial(autocast, device, precision),
        precision=precision,
        pixel_steps=PixelSteps.from_preprocess(preprocess),
    )


def _create(name: str, pretrained: str | None, device: torch.device, section: str | None) -> tuple[Any, Any, Any]:
    import open_clip

    key = config_key(section, "pretrained")
    try:
        with hub_offline():  # a tag's weights were found in the cache: nothing to ask the hub
            # on the CPU first: an error here is about the weights, one in moving them about the device
            model, train_preprocess, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except (RuntimeError, AssertionError, KeyError) as err:  # how open_clip reports weights that do not fit
        if pretrained is not None and Path(pretrained).is_file():
            raise ConfigError(f"{key}: checkpoint {pretrained!r} does not fit model {name!r}: {err}") from err
        if pretrained is not None and isinstance(err, RuntimeError):
            raise RuntimeError(
                f"{key}: cannot get the weights of tag {pretrained!r} for {name!r} ({err}); "
                "without network access, give the path of a local checkpoint file instead"
            ) from err
        raise
    return model.to(device), train_preprocess, preprocess


# --------------------------------------------------------------------------------------------------
# Encoding


def encode_pairs(loaded: LoadedClip, images: torch.Tensor, tokens: torch.Tensor) -> tuple[np.ndarray, ...]:
    """(image embeddings, text embeddings, cosine) for aligned batches; float32, L2-normalised in fp32."""
    import torch

    with torch.inference_mode():
        image_emb, text_emb = encode(loaded, images, tokens)
        scores = (image_emb * text_emb).sum(dim=-1)
        return image_emb.cpu().numpy(), text_emb.cpu().numpy(), scores.cpu().numpy()


def encode(
    loaded: LoadedClip, images: torch.Tensor | None, tokens: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """L2-normalised float32 embeddings of preprocessed images and/or tokens (None where not given)."""
    import torch.nn.functional as F

    image_emb = text_emb = None
    with loaded.autocast():
        if images is not None:
            image_emb = loaded.model.encode_image(images.to(loaded.device, non_blocking=True))
        if tokens is not None:
            text_emb = loaded.model.encode_text(tokens.to(loaded.device, non_blocking=True))
    # normalise outside autocast: in fp16 the norm of a wide vector loses digits
    image_emb = F.normalize(image_emb.float(), dim=-1) if image_emb is not None else None
    text_emb = F.normalize(text_emb.float(), dim=-1) if text_emb is not None else None
    return image_emb, text_emb


def embed_images(loaded: LoadedClip, images: Sequence[Image.Image], batch_size: int = 256) -> np.ndarray:
    """L2-normalised float32 (n, dim) embeddings of PIL images (any mode; converted to RGB)."""
    import torch

    parts = [np.zeros((0, loaded.embed_dim), np.float32)]
    for start in range(0, len(images), batch_size):
        batch = torch.stack([loaded.preprocess(im.convert("RGB")) for im in images[start : start + batch_size]])
        with torch.inference_mode():
            parts.append(encode(loaded, batch, None)[0].cpu().numpy())  # type: ignore[union-attr]
    return np.concatenate(parts)


def embed_texts(loaded: LoadedClip, texts: Sequence[str], batch_size: int = 1024) -> np.ndarray:
    """L2-normalised float32 (n, dim) embeddings of texts."""
    import torch

    parts = [np.zeros((0, loaded.embed_dim), np.float32)]
    for start in range(0, len(texts), batch_size):
        tokens = loaded.tokenizer(list(texts[start : start + batch_size]))
        with torch.inference_mode():
            parts.append(encode(loaded, None, tokens)[1].cpu().numpy())  # type: ignore[union-attr]
    return np.concatenate(parts)
