"""The one local training loop and the one evaluation loop every trainer uses.

Local training follows PAPER.md: ``epochs`` passes over the client's train split in
a fresh random order, mini-batches of ``batch_size``, SGD with momentum and weight
decay, gradient norm clipped to ``grad_clip``, and a fresh optimizer every round; in
float32, or with ``precision = "bf16"`` each mini-batch's forward pass and loss in
bfloat16 autocast (mixed precision, an option for hardware with bfloat16 units).
Strategies that train several models together (mutual learning) pass them in an
``nn.ModuleDict`` and each model's gradient norm is clipped on its own, as HtFLlib's
one optimizer and one ``clip_grad_norm_`` per model do. Strategies that train
differently (distillation, prototypes, ...) pass their own ``loss_fn``; they never
copy the loop.

Data are in-memory tensors, so batches are index slices of a seeded permutation,
which is much cheaper than a ``DataLoader`` for 32x32 images.
"""

from __future__ import annotations

import functools
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import WARNING
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from flwr.common.logger import log
from torch import nn

if TYPE_CHECKING:
    from common.config import RunConfig

#: ``loss_fn(model, x, y) -> scalar loss`` for one mini-batch.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
#: ``logits_fn(model, x) -> [B, classes]`` class scores (argmax = prediction).
LogitsFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LocalHParams:
    """Local SGD hyperparameters (defaults: PAPER.md)."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 5e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: float = 50.0
    #: ``bf16``: each mini-batch's forward and loss under ``torch.autocast`` in
    #: bfloat16; ``fp32``: plain float32 (the paper).
    precision: str = "fp32"

    @classmethod
    def from_config(cls, cfg: RunConfig) -> LocalHParams:
        return cls(
            epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            lr=cfg.client_lr,
            momentum=cfg.client_momentum,
            weight_decay=cfg.client_weight_decay,
            grad_clip=cfg.client_grad_clip,
            precision=cfg.client_precision,
        )


@dataclass(frozen=True)
class TrainStats:
    """Mean training loss over all mini-batches, examples seen per epoch, seconds."""

    loss: float
    num_examples: int
    seconds: float


def cross_entropy_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Plain cross-entropy of ``model(x)`` against ``y`` (batch mean)."""
    return F.cross_entropy(model(x), y)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """MH-pFedHNGD's personal loss (batch means)::

        alpha * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) )
            + (1 - alpha) * CE(z_s, y)

    with ``z_s`` the student's (personal model's) and ``z_t`` the teacher's
    (global model's) logits; the KL is summed over classes and averaged over the
    batch, and ``T^2`` keeps its gradient scale independent of ``T``.
    """
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student_logits, targets)


def clip_groups(
    model: nn.Module, params: list[nn.Parameter]
) -> list[list[nn.Parameter]]:
    """The parameter groups whose gradient norms are clipped separately.

    One group (all of ``params``) for a single model; for an ``nn.ModuleDict`` one
    group per entry (its parameters among ``params``), so that clipping ``||g_m||``
    of one model to ``grad_clip`` never rescales another model's gradient. Empty
    groups are dropped.
    """
    if not isinstance(model, nn.ModuleDict):
        return [params]
    chosen = {id(p) for p in params}
    groups = [
        [p for p in module.parameters() if id(p) in chosen] for module in model.values()
    ]
    return [g for g in groups if g]


def has_bf16_units(device: torch.device) -> bool | None:
    """Whether ``device`` has bfloat16 arithmetic units; ``None`` where unknown.

    An x86 CPU has them with AVX512-BF16 or AMX; without them oneDNN emulates
    bfloat16, and a training step is several times slower than in float32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu" and platform.machine().lower() in {"x86_64", "amd64"}:
        return bool(
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        )
    return None


def mixed_precision(device_type: str, precision: str) -> torch.autocast:
    """The context of one mini-batch's forward pass and loss for run-config
    ``client-precision``: bfloat16 autocast for ``bf16`` (convolutions and matrix
    products in bfloat16, reductions such as the loss in float32), a disabled one
    (plain float32) for ``fp32``."""
    return torch.autocast(
        device_type, dtype=torch.bfloat16, enabled=precision == "bf16"
    )


@functools.cache
def warn_if_bf16_is_emulated(device: torch.device) -> None:
    """Log once per process and device when ``client-precision = "bf16"`` runs
    where bfloat16 has no hardware support."""
    if has_bf16_units(device) is False:
        log(
            WARNING,
            "client-precision = 'bf16' on %s without bfloat16 units (no "
            "AVX512-BF16 or AMX on a CPU): local training is emulated and several "
            "times slower than 'fp32'",
            device,
        )


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    hparams: LocalHParams,
    generator: torch.Generator,
    loss_fn: LossFn = cross_entropy_loss,
    params: list[nn.Parameter] | None = None,
) -> TrainStats:
    """Train ``model`` in place on ``(x, y)``; return loss and timing.

    Parameters
    ----------
    model : nn.Module
        Model on the same device as ``x`` and ``y``; left in train mode.
    x, y : torch.Tensor
        Inputs ``(N, C, H, W)`` and integer labels ``(N,)``.
    hparams : LocalHParams
        Epochs, batch size, SGD settings and the arithmetic (``precision``).
    generator : torch.Generator
        CPU generator that draws the batch order (seeded by the caller).
    loss_fn : LossFn
        Loss of one mini-batch; cross-entropy by default. A strategy that trains
        two models together (mutual learning) passes an ``nn.ModuleDict`` of both
        and a loss that sums theirs; each model's gradient is clipped on its own
        (:func:`clip_groups`).
    params : list of nn.Parameter, optional
        The parameters to optimise; default all trainable ones of ``model``.
    """
    start = time.perf_counter()
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    groups = clip_groups(model, params)
    optimizer = torch.optim.SGD(
        params,
        lr=hparams.lr,
        momentum=hparams.momentum,
        weight_decay=hparams.weight_decay,
    )
    # The parameters, their gradients and the optimizer stay float32 under
    # mixed precision, so the update is float32.
    if hparams.precision == "bf16":
        warn_if_bf16_is_emulated(x.device)
    autocast = mixed_precision(x.device.type, hparams.precision)
    model.train()
    n = x.shape[0]
    total, batches = 0.0, 0
    for _ in range(hparams.epochs):
        order = torch.randperm(n, generator=generator).to(x.device)
        for i in range(0, n, hparams.batch_size):
            idx = order[i : i + hparams.batch_size]
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_fn(model, x[idx], y[idx])
            loss.backward()
            for group in groups:
                nn.utils.clip_grad_norm_(group, hparams.grad_clip)
            optimizer.step()
            total += loss.item()
            batches += 1
    return TrainStats(total / max(batches, 1), n, time.perf_counter() - start)


@torch.no_grad()
def evaluate_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 512,
    logits_fn: LogitsFn | None = None,
) -> tuple[float, int, int]:
    """Return ``(mean cross-entropy, correct, n)`` of ``model`` on ``(x, y)``.

    ``logits_fn`` replaces ``model(x)`` as the class scores (e.g. negative
    distances to class prototypes); the prediction is their argmax.
    """
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size]
        logits = model(xb) if logits_fn is None else logits_fn(model, xb)
        target = y[i : i + batch_size]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == target).sum())
    n = int(x.shape[0])
    return (loss_sum / n if n else 0.0), correct, n


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, x: torch.Tensor, batch_size: int = 256
) -> bool:
    """Recompute every BatchNorm layer's running statistics for ``model``'s weights.

    Each ``_BatchNorm`` layer's statistics are reset and its momentum set to
    ``None`` (a cumulative average) for one forward pass in train mode over ``x``
    without gradients, so for batches ``b = 1 .. B`` of the layer's input
    ``a_b``

        running_mean = (1 / B) sum_b mean(a_b),
        running_var  = (1 / B) sum_b var_unbiased(a_b),

    the statistics of these weights' own activations (AdaBN-style recalibration),
    instead of those accumulated while the weights changed during training. The
    momenta are restored afterwards; the model is left in eval mode. Returns whether
    the model has a BatchNorm layer (otherwise nothing is run).
    """
    layers = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if not layers:
        return False
    momenta = [m.momentum for m in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    model.train()
    for i in range(0, x.shape[0], batch_size):
        model(x[i : i + batch_size])
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    model.eval()
    return True
