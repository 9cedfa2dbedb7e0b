"""The paper's five client models: ``cnn``, ``vgg8``, ``resnet10/12/18``.

Every bias on (convolutions included); ``features(x) -> [B, 64]`` and
``head = nn.Linear(64, num_classes)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .registry import FEATURE_DIM, register_model


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, with bias."""
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1)


@register_model("cnn")
class CNN(nn.Module):
    """Small LeNet-style CNN (also the MH-pFedHNGD global model).

    conv3x3(C_in->16)-ReLU-pool2, conv3x3(16->32)-ReLU-pool2,
    fc 2048->108-ReLU, fc 108->64-ReLU, head 64->classes.
    """

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv3x3(in_channels, 16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            _conv3x3(16, 32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(
            nn.Linear(32 * 8 * 8, 108),
            nn.ReLU(inplace=True),
            nn.Linear(108, FEATURE_DIM),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Map ``[B, C_in, 32, 32]`` images to ``[B, 64]`` features."""
        return self.fc(torch.flatten(self.conv(x), 1))

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[B, C_in, 32, 32]`` images to ``[B, num_classes]`` logits."""
        return self.head(self.features(x))


@register_model("vgg8")
class VGG8(nn.Module):
    """VGG-style net: six 3x3 convs (16,16 | 32,32 | 64,64, pool after each pair).

    Then fc 1024->180-ReLU-dropout, fc 180->64-ReLU-dropout, head 64->classes.
    The dropout layers (p = 0.5) belong to ``features``; they are identity in
    ``eval()`` mode.
    """

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for width in (16, 32, 64):
            for _ in range(2):
                layers += [_conv3x3(c_in, width), nn.ReLU(inplace=True)]
                c_in = width
            layers.append(nn.MaxPool2d(2))
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Sequential(
            nn.Linear(64 * 4 * 4, 180),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(180, FEATURE_DIM),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Map ``[B, C_in, 32, 32]`` images to ``[B, 64]`` features."""
        return self.fc(torch.flatten(self.conv(x), 1))

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[B, C_in, 32, 32]`` images to ``[B, num_classes]`` logits."""
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """Residual block conv3x3-BN-ReLU-conv3x3-BN (+ shortcut), then ReLU.

    A downsampling block uses stride 2 in its first conv and a 1x1 stride-2 conv
    (with bias, no BN) as shortcut; otherwise the shortcut is the identity
    (``c_in`` must then equal ``c_out``).
    """

    def __init__(self, c_in: int, c_out: int, downsample: bool = False) -> None:
        super().__init__()
        if not downsample and c_in != c_out:
            raise ValueError(f"identity shortcut needs c_in == c_out ({c_in}, {c_out})")
        stride = 2 if downsample else 1
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = (
            nn.Conv2d(c_in, c_out, kernel_size=1, stride=2)
            if downsample
            else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[B, c_in, H, W]`` to ``[B, c_out, H', W']`` (H' = H/2 if down)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet of basic blocks for 32x32 inputs.

    Stem conv3x3(C_in->16)-BN-ReLU, the blocks, global 8x8 average pool,
    head 64->classes.

    Parameters
    ----------
    widths : sequence of (int, int)
        ``(c_in, c_out)`` of each block, in order; must end at 64 channels.
    downsample_at : sequence of int
        0-based indices of the downsampling blocks (two of them for 32 -> 8).
    num_classes : int
        Output width of the head.
    in_channels : int, default 3
        Input image channels.
    """

    def __init__(
        self,
        widths: Sequence[tuple[int, int]],
        downsample_at: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            _conv3x3(in_channels, 16), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        )
        self.blocks = nn.Sequential(
            *(
                BasicBlock(c_in, c_out, downsample=i in downsample_at)
                for i, (c_in, c_out) in enumerate(widths)
            )
        )
        self.pool = nn.AvgPool2d(8)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Map ``[B, C_in, 32, 32]`` images to ``[B, 64]`` pooled features."""
        return torch.flatten(self.pool(self.blocks(self.stem(x))), 1)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[B, C_in, 32, 32]`` images to ``[B, num_classes]`` logits."""
        return self.head(self.features(x))


def _widths(*groups: tuple[int, int, int]) -> list[tuple[int, int]]:
    """Expand ``(c_in, c_out, repeat)`` groups into a list of block widths."""
    return [(c_in, c_out) for c_in, c_out, n in groups for _ in range(n)]


@register_model("resnet10")
def resnet10(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet10: 16-16 x3, 16-32, 32-32 x2, 32-64, 64-64 x3; down at 3, 6."""
    widths = _widths((16, 16, 3), (16, 32, 1), (32, 32, 2), (32, 64, 1), (64, 64, 3))
    return ResNet(widths, (3, 6), num_classes, in_channels)


@register_model("resnet12")
def resnet12(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet12: 16-16, 16-32, 32-32 x4, 32-64, 64-64 x5; down at 1, 6."""
    widths = _widths((16, 16, 1), (16, 32, 1), (32, 32, 4), (32, 64, 1), (64, 64, 5))
    return ResNet(widths, (1, 6), num_classes, in_channels)


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet18: 16-16 x6, 16-32, 32-32 x5, 32-64, 64-64 x5; down at 6, 12."""
    widths = _widths((16, 16, 6), (16, 32, 1), (32, 32, 5), (32, 64, 1), (64, 64, 5))
    return ResNet(widths, (6, 12), num_classes, in_channels)
