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

from . import paper, zoo  # noqa: F401  (registers the models, the paper's first)
from .registry import (
    FEATURE_DIM,
    MODELS,
    ModelFactory,
    available_models,
    build_model,
    num_chunks,
    num_trainable,
    register_model,
)

__all__ = [
    "FEATURE_DIM",
    "MODELS",
    "ModelFactory",
    "available_models",
    "build_model",
    "num_chunks",
    "num_trainable",
    "register_model",
]
