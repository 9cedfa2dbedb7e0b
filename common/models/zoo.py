"""Models beyond the paper's five: the novel-client ``mlp`` and ``squeezenet1_0/1_1``,
and ``mobilenetv2``, ``shufflenetv2``, ``vit-tiny`` adapted to 32x32 inputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .registry import FEATURE_DIM, register_model


@register_model("mlp")
class MLP(nn.Module):
    """The paper's novel-client MLP: flatten, C_in*1024->128-ReLU, 128->64-ReLU.

    Head 64->classes; all layers with bias (408,100 parameters for 3 channels
    and 100 classes).
    """

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * 32 * 32, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, FEATURE_DIM),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Map ``[B, C_in, 32, 32]`` images to ``[B, 64]`` features."""
        return self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[B, C_in, 32, 32]`` images to ``[B, num_classes]`` logits."""
        return self.head(self.features(x))


def _torchvision_models() -> Any:
    """Return ``torchvision.models``, imported through :mod:`common.compat`."""
    from common.compat import import_torchvision

    return import_torchvision().models


def _replace_conv(
    conv: nn.Conv2d, in_channels: int | None = None, stride: int | None = None
) -> nn.Conv2d:
    """A fresh copy of ``conv``'s configuration with new input channels/stride.

    The new layer has PyTorch's default initialisation; callers re-initialise it
    where torchvision uses a custom scheme.
    """
    return nn.Conv2d(
        conv.in_channels if in_channels is None else in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride if stride is None else stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )


class SqueezeNet(nn.Module):
    """torchvision's SqueezeNet with ``C_in`` input channels.

    The submodules ``features`` and ``classifier`` are torchvision's own, so
    parameter names and order match ``torchvision.models.squeezenet1_x``.
    ``classifier`` is Dropout(0.5), Conv2d(512, classes, 1), ReLU, global average
    pool: there is no linear head. ``head`` is therefore the final 1x1 ``Conv2d``
    and ``features(x)`` the penultimate 512-channel map ``[B, 512, H, W]`` (not a
    vector; 1x1 spatially for 32x32 inputs). ``forward`` is exactly
    torchvision's, ``flatten(classifier(features(x)), 1)``, which is *not*
    ``head(features(x))`` (dropout, ReLU and pooling follow the head).

    Parameters
    ----------
    version : {"1_0", "1_1"}
        SqueezeNet version.
    num_classes : int
        Output width of the classifier.
    in_channels : int, default 3
        Input image channels; the first conv is rebuilt (same configuration,
        torchvision's Kaiming-uniform init) when it is not 3.
    """

    def __init__(self, version: str, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        tvm = _torchvision_models()
        net = getattr(tvm, f"squeezenet{version}")(num_classes=num_classes)
        if in_channels != 3:
            conv = _replace_conv(net.features[0], in_channels=in_channels)
            nn.init.kaiming_uniform_(conv.weight)
            nn.init.constant_(conv.bias, 0)
            net.features[0] = conv
        self.features = net.features
        self.classifier = net.classifier

    @property
    def head(self) -> nn.Conv2d:
        """The final 1x1 convolution ``Conv2d(512, num_classes, 1)``."""
        return self.classifier[1]

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[B, C_in, 32, 32]`` images to ``[B, num_classes]`` logits."""
        return torch.flatten(self.classifier(self.features(x)), 1)


@register_model("squeezenet1_0")
def squeezenet1_0(num_classes: int, in_channels: int = 3) -> SqueezeNet:
    """torchvision SqueezeNet 1.0 (786,724 parameters for 100 classes)."""
    return SqueezeNet("1_0", num_classes, in_channels)


@register_model("squeezenet1_1")
def squeezenet1_1(num_classes: int, in_channels: int = 3) -> SqueezeNet:
    """torchvision SqueezeNet 1.1 (773,796 parameters for 100 classes)."""
    return SqueezeNet("1_1", num_classes, in_channels)


class _Backbone(nn.Module):
    """Generic ``features = pool(flatten(body(x)))``, ``forward = head(features)``.

    Parameters
    ----------
    body : nn.Module
        Maps images to a ``[B, F, H, W]`` map.
    head : nn.Linear
        Classifier ``F -> num_classes``.
    dropout : float, default 0.0
        Dropout applied to the pooled features (part of ``features``).
    """

    def __init__(self, body: nn.Module, head: nn.Linear, dropout: float = 0.0) -> None:
        super().__init__()
        self.body = body
        self.dropout = nn.Dropout(dropout)
        self.head = head

    def features(self, x: Tensor) -> Tensor:
        """Map ``[B, C_in, 32, 32]`` images to ``[B, F]`` pooled features."""
        return self.dropout(self.body(x).mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[B, C_in, 32, 32]`` images to ``[B, num_classes]`` logits."""
        return self.head(self.features(x))


MOBILENETV2_WIDTH = 0.5
"""``width_mult`` of the ``mobilenetv2`` model."""

# torchvision's MobileNetV2 stages (t, c, n, s) with the first 24-channel stage at
# stride 1 (CIFAR adaptation): with the stride-1 stem, 32x32 -> 4x4.
_MOBILENETV2_CIFAR_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int, in_channels: int = 3) -> _Backbone:
    """torchvision MobileNetV2 (width 0.5) adapted to 32x32 inputs.

    The stem conv has stride 1 (not 2) and takes ``C_in`` channels, and the first
    24-channel stage has stride 1 (not 2), so the network downsamples 8x to a 4x4
    map of 1280 channels (torchvision keeps ``last_channel`` at 1280 for
    ``width_mult < 1``). Then global average pool, torchvision's dropout 0.2 and
    ``head = Linear(1280, num_classes)``. Layers and initialisation are
    torchvision's (convs without bias, followed by BatchNorm).
    """
    tvm = _torchvision_models()
    net = tvm.MobileNetV2(
        num_classes=num_classes,
        width_mult=MOBILENETV2_WIDTH,
        inverted_residual_setting=_MOBILENETV2_CIFAR_SETTING,
    )
    conv = _replace_conv(net.features[0][0], in_channels=in_channels, stride=1)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out")
    net.features[0][0] = conv
    dropout, linear = net.classifier
    return _Backbone(net.features, linear, dropout=dropout.p)


@register_model("shufflenetv2")
def shufflenetv2(num_classes: int, in_channels: int = 3) -> _Backbone:
    """torchvision ShuffleNetV2 x0.5 adapted to 32x32 inputs.

    The stem conv has stride 1 (not 2) and takes ``C_in`` channels and the
    initial 3x3 max pool is removed, so stages 2-4 downsample 32x32 -> 4x4. Then
    torchvision's conv5 (1x1 -> 1024), global average pool and
    ``head = Linear(1024, num_classes)``. Parameter order is torchvision's.
    """
    tvm = _torchvision_models()
    net = tvm.shufflenet_v2_x0_5(num_classes=num_classes)
    net.conv1[0] = _replace_conv(net.conv1[0], in_channels=in_channels, stride=1)
    body = nn.Sequential(net.conv1, net.stage2, net.stage3, net.stage4, net.conv5)
    return _Backbone(body, net.fc)


class ViT(nn.Module):
    """Small pre-norm vision transformer for 32x32 images.

    Patch embedding ``Conv2d(C_in, dim, patch, stride=patch)`` (64 tokens for
    patch 4), learnable class token and position embedding, ``depth`` standard
    ``nn.TransformerEncoderLayer`` blocks (pre-norm, GELU), final LayerNorm;
    ``features(x)`` is the class token after that norm (``[B, dim]``) and
    ``head = Linear(dim, num_classes)``.

    Parameters
    ----------
    num_classes : int
        Output width of the head.
    in_channels : int, default 3
        Input image channels.
    dim, depth, heads : int
        Embedding width, number of blocks, attention heads (``dim % heads == 0``).
    mlp_ratio : float
        Hidden width of each block's MLP relative to ``dim``.
    patch : int
        Patch side; must divide 32.
    dropout : float
        Dropout inside the blocks.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        *,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 2.0,
        patch: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if 32 % patch:
            raise ValueError(f"patch must divide 32, got {patch}")
        num_patches = (32 // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(
            *(
                nn.TransformerEncoderLayer(
                    dim,
                    heads,
                    dim_feedforward=int(dim * mlp_ratio),
                    dropout=dropout,
                    activation="gelu",
                    batch_first=True,
                    norm_first=True,
                )
                for _ in range(depth)
            )
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def features(self, x: Tensor) -> Tensor:
        """Map ``[B, C_in, 32, 32]`` images to ``[B, dim]`` class-token features."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, dim]
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        return self.norm(self.blocks(tokens)[:, 0])

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[B, C_in, 32, 32]`` images to ``[B, num_classes]`` logits."""
        return self.head(self.features(x))


@register_model("vit-tiny")
def vit_tiny(num_classes: int, in_channels: int = 3) -> ViT:
    """ViT with patch 4, dim 192, depth 6, 3 heads, MLP ratio 2, dropout 0.1."""
    return ViT(num_classes, in_channels)
