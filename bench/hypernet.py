"""The hypernetwork step: our batched heads against the per-position loop.

Setting: the paper's five models at CIFAR-10 sizes (CNN, VGG8, ResNet10/12/18;
77, 88, 114, 171 and 185 chunks of 3072), one client of each. One *client step*
is what the server does per reply: generate ``theta_i``, take the VJP with a
delta, clip the gradient to norm 50 and take one Adam step (lr 2e-4).

- ``batched``: :class:`server_app.hypernet.HyperNetwork` (one ``(n, C, h)``
  tensor per head applied with ``baddbmm``, VJP into a kept buffer, fused Adam).
- ``per-position loop``: the reference formulation, written here: a head is
  ``n`` separate ``nn.Linear(h, C)`` modules applied one by one, autograd for the
  VJP and ``torch.optim.Adam`` with its defaults.

Both start from the same parameters and see the same deltas in the same order,
so they compute the same thing (checked: max abs difference of the generated
vectors after the timed steps). Prints milliseconds per client step for each,
the ratio, the parameter count and bytes, and the optimizer state bytes.

    python -m bench.hypernet [--rounds 3] [--device cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from common.models import build_model, num_chunks, num_trainable
from server_app.hypernet import HyperNetwork

from .common import DEFAULT_OUT, print_table, write_json

MODELS = ("cnn", "vgg8", "resnet10", "resnet12", "resnet18")
CHUNK, EMBED, HIDDEN, LAYERS, LR, CLIP = 3072, 64, 128, 3, 2e-4, 50.0


class LoopHyperNetwork(nn.Module):
    """The reference formulation: one ``nn.Linear`` per chunk position."""

    def __init__(self, source: HyperNetwork) -> None:
        super().__init__()
        self.extractor = source.extractor  # replaced by a copy below
        self.embeddings = nn.ParameterDict()
        self.heads = nn.ModuleDict()
        self.num_params = dict(source.num_params)
        with torch.no_grad():
            self.extractor = nn.Sequential(
                *[
                    nn.Linear(m.in_features, m.out_features)
                    if isinstance(m, nn.Linear)
                    else nn.ReLU()
                    for m in source.extractor
                ]
            )
            self.extractor.load_state_dict(source.extractor.state_dict())
            for name, emb in source.embeddings.items():
                self.embeddings[name] = nn.Parameter(emb.detach().clone())
            for key, head in source.heads.items():
                maps = nn.ModuleList()
                for j in range(head.weight.shape[0]):
                    linear = nn.Linear(HIDDEN, CHUNK)
                    linear.weight.copy_(head.weight[j])
                    linear.bias.copy_(head.bias[j])
                    maps.append(linear)
                self.heads[key] = maps

    def forward(self, name: str) -> torch.Tensor:
        emb = self.embeddings[name]
        features = self.extractor(emb)
        maps = self.heads[str(emb.shape[0])]
        chunks = [maps[j](features[j]) for j in range(emb.shape[0])]
        return torch.cat(chunks)[: self.num_params[name]]


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )


def parameter_bytes(module: nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(
        p.numel() * p.element_size() for p in params
    )


def timed_steps(step, names, deltas, rounds: int, device) -> float:
    """Mean seconds of one client step over ``rounds`` rounds (after a warm-up)."""
    for name in names:  # warm-up: allocations, optimizer state
        step(name, deltas[name])
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(rounds):
        for name in names:
            step(name, deltas[name])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (rounds * len(names))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available()
                        else "cpu")  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(0)
    sizes = {m: num_trainable(build_model(m, 10)) for m in MODELS}
    ours = HyperNetwork(EMBED, HIDDEN, LAYERS, CHUNK).to(device)
    gen = torch.Generator().manual_seed(0)
    for m in MODELS:
        ours.add_client(m, sizes[m], generator=gen)
    deltas = {
        m: torch.randn(sizes[m], generator=gen).mul_(1e-3).to(device) for m in MODELS
    }
    reference = LoopHyperNetwork(ours).to(device)
    names = list(MODELS)

    # Ours: the server's step (see MHPFedHN.hn_step).
    adam = torch.optim.Adam(ours.parameters(), lr=LR, fused=True)

    def ours_step(name, delta):
        adam.zero_grad(set_to_none=True)
        ours.generate(name)  # theta sent to the client
        ours.accumulate_vjp(name, delta)
        params = [p for p in ours.parameters() if p.grad is not None]
        nn.utils.clip_grad_norm_(params, CLIP)
        adam.step()

    ref_adam = torch.optim.Adam(reference.parameters(), lr=LR)

    def reference_step(name, delta):
        ref_adam.zero_grad(set_to_none=True)
        with torch.no_grad():
            reference(name)
        reference(name).backward(delta)
        params = [p for p in reference.parameters() if p.grad is not None]
        nn.utils.clip_grad_norm_(params, CLIP)
        ref_adam.step()

    ours_s = timed_steps(ours_step, names, deltas, args.rounds, device)
    ref_s = timed_steps(reference_step, names, deltas, args.rounds, device)
    with torch.no_grad():
        diff = max(float((ours(n) - reference(n)).abs().max()) for n in names)
    count, nbytes = parameter_bytes(ours)
    ref_count, ref_bytes = parameter_bytes(reference)
    rows = [
        {
            "formulation": "batched (ours)",
            "ms_per_client_step": ours_s * 1e3,
            "parameters": count,
            "parameter_MB": nbytes / 2**20,
            "optimizer_state_MB": optimizer_bytes(adam) / 2**20,
        },
        {
            "formulation": "per-position loop",
            "ms_per_client_step": ref_s * 1e3,
            "parameters": ref_count,
            "parameter_MB": ref_bytes / 2**20,
            "optimizer_state_MB": optimizer_bytes(ref_adam) / 2**20,
        },
    ]
    print(f"\nhypernetwork step, 5 paper models at CIFAR-10 sizes, {device}, "
          f"{args.rounds} rounds x {len(names)} clients")  # fmt: skip
    print("chunks per model: " + ", ".join(
        f"{m} {num_chunks(sizes[m], CHUNK)}" for m in MODELS))  # fmt: skip
    print_table(rows, list(rows[0]))
    ratio = ref_s / ours_s
    print(f"\nspeed-up batched / loop: {ratio:.2f}x; max |theta difference| after "
          f"the timed steps: {diff:.2e}")  # fmt: skip
    payload = {"rows": rows, "speedup": ratio, "max_theta_difference": diff,
               "rounds": args.rounds, "device": str(device)}  # fmt: skip
    write_json(args.out, "hypernet", payload)
    return payload


if __name__ == "__main__":
    main()
