"""Model zoo for MH-pFedHN: the paper's five client architectures and extras.

Every model takes ``[B, C_in, 32, 32]`` images (``C_in`` = 3 for colour data, 1
for EMNIST), exposes ``features(x)`` (penultimate representation) and ``head``
(final layer) with ``forward(x) == head(features(x))`` -- SqueezeNet excepted,
see below.

The paper's five (``cnn``, ``vgg8``, ``resnet10/12/18``) have every bias switched
on (convolutions included) and end in ``head = nn.Linear(64, num_classes)``;
``features(x) -> [B, 64]``.

Extra models (not used in the paper's heterogeneous setting):

* ``mlp`` -- the paper's novel-client MLP: flatten, 3072->128-ReLU,
  128->64-ReLU, head 64->classes (all with bias); ``features -> [B, 64]``.
* ``squeezenet1_0`` / ``squeezenet1_1`` -- torchvision's definitions unchanged
  (the paper's novel clients), except that the first conv takes ``C_in``.
  Parameter names and order are torchvision's. They have no linear classifier:
  ``classifier`` is Dropout(0.5), Conv2d(512, classes, 1), ReLU, global average
  pool, so ``head`` is that final 1x1 ``Conv2d`` and ``features(x)`` is the
  512-channel feature map ``[B, 512, H, W]`` (1x1 spatially at 32x32), *not* a
  vector; ``forward`` is exactly torchvision's
  ``flatten(classifier(features(x)))``.
* ``mobilenetv2`` -- torchvision MobileNetV2, ``width_mult=0.5``, adapted to
  32x32 (stem conv stride 1, first 24-channel stage stride 1, so 8x downsampling
  to a 4x4 map); ``features -> [B, 1280]`` (includes torchvision's dropout 0.2).
* ``shufflenetv2`` -- torchvision ShuffleNetV2 x0.5 with stem conv stride 1 and
  no initial max pool (8x downsampling to 4x4); ``features -> [B, 1024]``.
* ``vit-tiny`` -- a small ViT: 4x4 patches (64 tokens), dim 192, depth 6, 3 heads,
  MLP ratio 2, pre-norm; ``features`` is the class token after the final
  LayerNorm ``[B, 192]``.

The torchvision-based models use torchvision's conv-without-bias + BatchNorm
layout. torchvision is imported lazily (through :mod:`common.compat`) only when
one of them is built.

The hypernetwork generates the flat vector of all trainable parameters in
``named_parameters()`` order (see :mod:`common.flat`). BatchNorm running
statistics are buffers, not parameters.

Trainable parameter counts (3 input channels; checked by the tests where exact):

=============  =========  =========
model          10         100
=============  =========  =========
cnn              234,006    239,856
vgg8             268,814    274,664
resnet10         347,178    353,028
resnet12         523,242    529,092
resnet18         565,386    571,236
mlp              402,250    408,100
squeezenet1_0    740,554    786,724
squeezenet1_1    727,626    773,796
mobilenetv2      700,490    815,780
shufflenetv2     352,042    444,292
vit-tiny       1,806,538  1,823,908
=============  =========  =========

Run ``python -m common.models --classes 10`` for a table with chunk counts and
hypernetwork head sizes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

ModelFactory = Callable[[int, int], nn.Module]
"""Builds a model from ``(num_classes, in_channels)``."""

MODELS: dict[str, ModelFactory] = {}
"""Registry of model factories by name; extend it with :func:`register_model`."""

FEATURE_DIM = 64
"""Width of the penultimate representation returned by ``features``."""


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator that adds a factory (or model class) to :data:`MODELS`.

    Parameters
    ----------
    name : str
        Registry key; must not be taken already.

    Returns
    -------
    Callable
        A decorator returning the factory unchanged.
    """

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = factory
        return factory

    return decorator


def available_models() -> list[str]:
    """Return the registered model names, in registration order."""
    return list(MODELS)


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Instantiate a registered model.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`.
    num_classes : int
        Output width of the classifier head.
    in_channels : int, default 3
        Input image channels (3 for colour, 1 for grey scale).

    Returns
    -------
    nn.Module
        The model, mapping ``[B, in_channels, 32, 32]`` to ``[B, num_classes]``.

    Raises
    ------
    ValueError
        If ``name`` is not registered; the message lists the allowed names.
    """
    try:
        factory = MODELS[name]
    except KeyError:
        allowed = ", ".join(available_models())
        raise ValueError(f"unknown model {name!r}; allowed: {allowed}") from None
    return factory(num_classes, in_channels)


def num_trainable(model: nn.Module) -> int:
    """Number of trainable scalars ``K`` of ``model`` (``requires_grad`` only)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def num_chunks(num_params: int, chunk_size: int = 3072) -> int:
    """Number of hypernetwork chunks ``n = ceil(num_params / chunk_size)``."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return -(-num_params // chunk_size)


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


def main(argv: Sequence[str] | None = None) -> None:
    """Print trainable parameters, chunk counts and hypernetwork head sizes."""
    parser = argparse.ArgumentParser(
        prog="python -m common.models", description=main.__doc__
    )
    parser.add_argument("--classes", type=int, default=10, help="number of classes")
    parser.add_argument("--in-channels", type=int, default=3, help="input channels")
    parser.add_argument("--chunk-size", type=int, default=3072, help="chunk size C")
    parser.add_argument(
        "--hidden", type=int, default=128, help="extractor output width of the HN"
    )
    args = parser.parse_args(argv)

    names = available_models()
    width = max(len("model"), *(len(name) for name in names))
    header = (
        f"{'model':<{width}} {'trainable':>11} {'chunks':>7} {'HN head params':>15}"
        f" {'HN head MB':>11}"
    )
    print(
        f"classes={args.classes} in_channels={args.in_channels} "
        f"chunk_size={args.chunk_size} hidden={args.hidden}"
    )
    print(header)
    print("-" * len(header))
    per_position = args.hidden * args.chunk_size + args.chunk_size
    heads: dict[int, int] = {}  # chunk count -> head params (shared per count)
    for name in names:
        k = num_trainable(build_model(name, args.classes, args.in_channels))
        n = num_chunks(k, args.chunk_size)
        head = n * per_position
        heads[n] = head
        print(f"{name:<{width}} {k:>11,} {n:>7} {head:>15,} {head * 4 / 1e6:>11,.1f}")
    total = sum(heads.values())
    print(
        f"per-position head: {per_position:,} params (hidden*C + C); MB = 1e6 bytes "
        f"fp32; all {len(heads)} distinct heads together: {total:,} params, "
        f"{total * 4 / 1e6:,.1f} MB"
    )


if __name__ == "__main__":
    main()
