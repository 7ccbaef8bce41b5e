"""Small plain convolutional image towers for the demo's CLIP models, registered with timm so that an open_clip
model config names them (`"vision_cfg": {"timm_model_name": "curate_convnet_24_48_64", "timm_pool": "max",
"timm_proj": "linear"}`).

Each stage is a 3x3 convolution, batch norm and ReLU, with a 2x2 max-pool between stages; open_clip's timm
adapter adds the global pool and the projection. It is the plain CNN that, trained supervised on a few hundred
demo images, tells the demo's shapes apart (README, "What the demo shows"), with batch norm added.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models import register_model
from torch import nn


class ConvNet(nn.Module):
    """The timm model interface open_clip's TimmModel uses: `num_features`, `default_cfg`, `reset_classifier`
    and a forward that returns pooled features once the classifier is reset to 0 classes."""

    def __init__(self, channels: Sequence[int], num_classes: int = 0, global_pool: str = "max", **_: Any) -> None:
        # **_: timm's create_model passes pretrained_cfg and pretrained_cfg_overlay, which have no use here
        super().__init__()
        layers: list[nn.Module] = []
        previous = 3
        for i, width in enumerate(channels):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers += [
                nn.Conv2d(previous, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.num_features = previous
        self.default_cfg: dict[str, Any] = {"pool_size": None}
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head: nn.Module = nn.Linear(previous, num_classes) if num_classes else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.global_pool(self.forward_features(x)))


def _reject_pretrained(pretrained: bool, name: str) -> None:
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights; load a checkpoint with open_clip's pretrained= instead")


@register_model
def curate_convnet_24_48_64(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    _reject_pretrained(pretrained, "curate_convnet_24_48_64")
    return ConvNet((24, 48, 64), **kwargs)


@register_model
def curate_convnet_32_64_64(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    _reject_pretrained(pretrained, "curate_convnet_32_64_64")
    return ConvNet((32, 64, 64), **kwargs)
