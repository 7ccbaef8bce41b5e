"""The CLIP factory: names and config files, tags and local checkpoints, devices, train mode, and that a
pretrained tag whose weights are not cached is a fast ConfigError with no network traffic."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from curate import clip
from curate.clip import ClipSpec, load_clip, resolve_device, resolve_model, resolve_model_name
from curate.config import ConfigError, EmbedConfig
from curate.stages import embed
from curate.stages.validate.train import TrainRecipe

MICRO, TINY = "curate-micro", "curate-tiny"
FAKE_REPO = "curate-tests/micro-weights"


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every socket connection attempted during the test (each one refused)."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError("tests make no network connections")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield attempts


@pytest.fixture
def hf_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty Hugging Face cache of this test's own."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def micro_state(seed: int) -> dict[str, torch.Tensor]:
    clip.register_model_configs()
    torch.manual_seed(seed)
    return open_clip.create_model(MICRO).state_dict()


def put_in_hf_cache(cache: Path, repo_id: str, filename: str, state: dict[str, torch.Tensor]) -> None:
    """The layout huggingface_hub's downloads leave: refs/main names a snapshot holding the file."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    torch.save(state, repo / "snapshots" / commit / filename)


def assert_same_weights(model: Any, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


def test_a_tag_whose_weights_are_not_cached_is_a_fast_config_error(hf_cache: Path, connections: list[Any]):
    cfg = EmbedConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        embed.resolve_model(cfg)  # what the embed stage's preflight calls
    elapsed = time.perf_counter() - started

    message = str(caught.value)
    assert message.startswith(
        "embed.pretrained: weights of tag 'laion2b_s34b_b79k' for model 'ViT-B-32' are not in the local cache ("
    )
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message and str(hf_cache) in message
    assert message.endswith("give a local checkpoint file, or download them first") and "\n" not in message
    assert elapsed < 2, elapsed
    assert connections == []


def test_a_cached_tag_loads_with_the_hub_offline(
    monkeypatch: pytest.MonkeyPatch, hf_cache: Path, connections: list[Any]
):
    tag_cfg = {"url": "", "hf_hub": f"{FAKE_REPO}/", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, MICRO, {"cachedtag": tag_cfg})
    state = micro_state(seed=7)
    put_in_hf_cache(hf_cache, FAKE_REPO, "open_clip_pytorch_model.bin", state)

    spec = ClipSpec(MICRO, "cachedtag", device="cpu", section="embed")
    assert resolve_model(spec) == (MICRO, "cachedtag")
    started = time.perf_counter()
    loaded = load_clip(spec)

    assert time.perf_counter() - started < 10
    assert_same_weights(loaded.model, state)
    assert loaded.pixel_steps is not None and loaded.pixel_steps.mean == (0.5, 0.5, 0.5)  # the tag's preprocess
    assert connections == [] and not huggingface_hub.constants.HF_HUB_OFFLINE  # offline only while loading


def test_a_local_checkpoint_file_loads_in_eval_or_train_mode(tmp_path: Path):
    clip.register_model_configs()
    torch.manual_seed(3)
    state = open_clip.create_model(TINY).state_dict()
    path = tmp_path / "tiny.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)

    loaded = load_clip(ClipSpec(TINY, str(path), device="cpu"))
    trainable = load_clip(ClipSpec(TINY, str(path), device="cpu"), train=True)

    assert_same_weights(loaded.model, state)
    assert not loaded.model.training and trainable.model.training
    assert loaded.device == torch.device("cpu") and loaded.model_name == TINY and loaded.embed_dim == 128
    assert isinstance(loaded.train_preprocess.transforms[0], RandomResizedCrop)
    assert not isinstance(loaded.preprocess.transforms[0], RandomResizedCrop)
    assert loaded.tokenizer(["a red square"]).shape[0] == 1


def test_a_checkpoint_of_another_model_is_a_config_error(tmp_path: Path):
    path = tmp_path / "micro.pt"
    torch.save(micro_state(seed=0), path)
    with pytest.raises(ConfigError, match=r"^validate\.pretrained: checkpoint .* does not fit model 'curate-tiny'"):
        load_clip(ClipSpec(TINY, str(path), device="cpu", section="validate"))


def test_a_model_config_json_path_is_registered_under_its_stem(tmp_path: Path):
    config = json.loads((clip.MODEL_CONFIG_DIR / f"{MICRO}.json").read_text())
    config["embed_dim"] = 24
    path = tmp_path / "clip-test-json.json"
    path.write_text(json.dumps(config))

    loaded = load_clip(ClipSpec(str(path), device="cpu"), train=True)

    assert resolve_model_name(str(path)) == loaded.model_name == "clip-test-json"
    assert loaded.embed_dim == 24 and loaded.model.text_projection.shape[1] == 24


def test_an_unknown_model_gets_a_did_you_mean():
    with pytest.raises(ConfigError, match=r"^validate\.model: unknown open_clip model 'curate-tiyn' \(did you mean "):
        resolve_model_name("curate-tiyn", section="validate")
    with pytest.raises(ConfigError, match="did you mean 'ViT-B-32'"):
        resolve_model(ClipSpec("ViT-B/23"))


def test_cuda_n_is_parsed_and_checked_against_the_devices_torch_sees(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda") and resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"^embed\.device is 'cuda:2' but torch sees 2 CUDA device\(s\)"):
        resolve_device("cuda:2", section="embed")
    assert TrainRecipe(device="cuda:1").clip_spec == ClipSpec("curate-tiny", device="cuda:1", section="validate")


@pytest.mark.parametrize(
    ("device", "precision", "message"),
    [
        ("cuda:x", "fp32", "unknown device 'cuda:x'; give auto, cpu, cuda or cuda:N"),
        ("cpu:0", "fp32", "unknown device 'cpu:0'"),
        ("cuda:0", "fp32", "device is 'cuda:0' but torch sees no CUDA device on this machine"),
        ("cpu", "fp16", "precision 'fp16' needs a CUDA device"),
        ("cpu", "fp8", "unknown precision 'fp8'"),
    ],
)
def test_bad_devices_and_precisions_are_config_errors(
    monkeypatch: pytest.MonkeyPatch, device: str, precision: str, message: str
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as caught:
        resolve_device(device, precision)
    assert message in str(caught.value)


def test_importing_the_factory_loads_neither_torch_nor_open_clip():
    code = "import sys, curate.clip; print(sorted({'torch', 'open_clip'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_random_weights_are_warned_of_except_when_training(caplog: pytest.LogCaptureFixture, tmp_path: Path):
    clip.register_model_configs()
    with caplog.at_level("WARNING", logger="curate.clip"):
        load_clip(ClipSpec(MICRO, None, device="cpu", section="embed"))
    assert [r.getMessage() for r in caplog.records if r.name == "curate.clip"] == [
        f"embed: model {MICRO} has random weights (embed.pretrained is not set): its scores mean nothing"
    ]
    caplog.clear()
    path = tmp_path / "micro.pt"
    torch.save(open_clip.create_model(MICRO).state_dict(), path)
    with caplog.at_level("WARNING", logger="curate.clip"):
        load_clip(ClipSpec(MICRO, None, device="cpu"), train=True)  # a trainer starts from random weights
        load_clip(ClipSpec(MICRO, str(path), device="cpu", section="embed"))
    assert [r for r in caplog.records if r.name == "curate.clip"] == []


@pytest.mark.parametrize(
    ("name", "side", "channels"), [("curate-cnn-64", 64, [24, 48, 64]), ("curate-cnn-32", 32, [32, 64, 64])]
)
def test_the_demo_conv_models_are_open_clip_models_over_a_timm_conv_tower(name: str, side: int, channels: list[int]):
    """README, "The demo world": a 3-layer conv image tower registered with timm and named by the open_clip config
    through its timm adapter, global max-pool, linear projection; a 1-layer text transformer."""
    from open_clip.timm_model import TimmModel

    from curate.convnet import ConvNet

    loaded = load_clip(ClipSpec(name, None, device="cpu"), train=True)
    visual = loaded.model.visual
    assert isinstance(visual, TimmModel) and isinstance(visual.trunk, ConvNet)
    convolutions = [m for m in visual.trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convolutions] == channels
    assert visual.trunk.global_pool.pool_type == "max"
    assert isinstance(visual.head.proj, torch.nn.Linear) and visual.head.proj.out_features == loaded.embed_dim
    assert len(loaded.model.transformer.resblocks) == 1
    image = loaded.preprocess(Image.new("RGB", (224, 224), "red"))
    assert image.shape == (3, side, side)
    features = loaded.model.encode_image(image[None])
    assert features.shape == (1, loaded.embed_dim)
