"""What the clients' memory layout and allocator settings buy per training step.

Usage::

    python -m bench.step --models cnn,vgg8,resnet10,resnet12,resnet18

For each model, one step of :func:`client_app.training.train_local` (batch 64, one
thread, random 32x32 inputs) in three settings, each in a fresh process:

- ``NCHW``: model and batches in PyTorch's default layout, glibc's default
  allocator policy;
- ``channels-last``: model and batches channels-last (NHWC in memory), the layout
  the app stores its data and models in (``common.data.to_tensor``), which
  oneDNN's CPU convolutions work in;
- ``+ keep freed``: the app's setting, channels-last and
  :func:`common.allocator.keep_freed_memory`;
- ``+ bf16``: the app's setting with run-config ``client-precision = "bf16"``
  (the forward pass and loss in bfloat16 autocast).

The settings alternate ``--reps`` times so that a host whose speed drifts slows
all alike. Prints the fastest milliseconds per step of each, the minor page faults
per step, the ratios to ``NCHW``, and ``bf16 / app`` (``+ bf16`` over ``+ keep
freed``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from .common import DEFAULT_OUT, write_json

SETTINGS = {
    "NCHW": {"channels_last": False, "keep_freed": False, "precision": "fp32"},
    "channels-last": {"channels_last": True, "keep_freed": False, "precision": "fp32"},
    "+ keep freed": {"channels_last": True, "keep_freed": True, "precision": "fp32"},
    "+ bf16": {"channels_last": True, "keep_freed": True, "precision": "bf16"},
}

CHILD = """
import json, resource, sys, time
setting = json.loads(sys.argv[1])
if setting["keep_freed"]:
    from common.allocator import keep_freed_memory
    assert keep_freed_memory(), "glibc's mallopt is not available here"
import torch
from client_app.training import LocalHParams, train_local
from common.models import build_model
torch.set_num_threads(1)
torch.manual_seed(0)
model = build_model(setting["model"], 10)
x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
if setting["channels_last"]:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
hparams = LocalHParams(precision=setting["precision"])
generator = torch.Generator().manual_seed(0)
train_local(model, x, y, hparams, generator)  # warm-up: oneDNN primitives
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
start = time.perf_counter()
for _ in range(setting["steps"]):
    train_local(model, x, y, hparams, generator)
seconds = time.perf_counter() - start
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({"ms": seconds / setting["steps"] * 1000,
                  "faults": faults / setting["steps"]}))
"""


def measure(model: str, setting: dict, steps: int) -> dict[str, float]:
    """One fresh process's milliseconds and minor page faults per step."""
    arg = json.dumps(setting | {"model": model, "steps": steps})
    # The allocator is the measured variable: no inherited glibc settings.
    # OMP_WAIT_POLICY comes from this package's import (common.openmp).
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, arg], capture_output=True, text=True,
        check=True, env=env,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,vgg8,resnet10,resnet12,resnet18")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    names = list(SETTINGS)
    print("| model | " + " | ".join(f"{n} ms / step" for n in names)
          + " | " + " | ".join(f"{n} faults / step" for n in names)
          + " | channels-last / NCHW | app / NCHW | bf16 / app |")  # fmt: skip
    print("|---" * (2 * len(names) + 4) + "|")
    results = {}
    for model in args.models.split(","):
        best = {n: {"ms": float("inf"), "faults": 0.0} for n in names}
        for _ in range(args.reps):
            for name, setting in SETTINGS.items():
                got = measure(model, setting, args.steps)
                if got["ms"] < best[name]["ms"]:
                    best[name] = got
        base = best["NCHW"]["ms"]
        results[model] = best
        print(
            f"| {model} | "
            + " | ".join(f"{best[n]['ms']:.1f}" for n in names)
            + " | "
            + " | ".join(f"{best[n]['faults']:.0f}" for n in names)
            + f" | {best['channels-last']['ms'] / base:.3f}"
            + f" | {best['+ keep freed']['ms'] / base:.3f}"
            + f" | {best['+ bf16']['ms'] / best['+ keep freed']['ms']:.3f} |",
            flush=True,
        )
    write_json(
        args.out, "step", {"reps": args.reps, "steps": args.steps, "models": results}
    )


if __name__ == "__main__":
    main()
