"""One local training step per model in NCHW and in channels-last, interleaved.

Usage::

    python -m bench.layout --models cnn,vgg8,resnet10,resnet12,resnet18

For each model: one step of :func:`client_app.training.train_local` (batch 64,
one thread, random 32x32 inputs) in each layout, alternating ``--reps`` times so
that a host whose speed drifts slows both alike; prints the fastest
milliseconds per step of each layout and their ratio (channels-last / NCHW).
"""

from __future__ import annotations

import argparse
import time

import torch

from client_app.training import LocalHParams, train_local
from common.models import build_model


def step_ms(name: str, channels_last: bool, steps: int = 5) -> float:
    """Milliseconds per step of ``steps`` single-batch training calls."""
    torch.manual_seed(0)
    model = build_model(name, 10)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    hparams = LocalHParams(channels_last=channels_last)
    generator = torch.Generator().manual_seed(0)
    train_local(model, x, y, hparams, generator)  # warm-up: oneDNN primitives
    start = time.perf_counter()
    for _ in range(steps):
        train_local(model, x, y, hparams, generator)
    return (time.perf_counter() - start) / steps * 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,vgg8,resnet10,resnet12,resnet18")
    parser.add_argument("--reps", type=int, default=6)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| model | NCHW ms / step | channels-last ms / step | ratio |")
    print("|---|---|---|---|")
    for name in args.models.split(","):
        best = {False: float("inf"), True: float("inf")}
        for _ in range(args.reps):
            for layout in best:
                best[layout] = min(best[layout], step_ms(name, layout))
        ratio = best[True] / best[False]
        print(f"| {name} | {best[False]:.1f} | {best[True]:.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
