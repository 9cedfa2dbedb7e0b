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
the ratio, the parameter count and bytes, and the optimizer state bytes; then
the same step with the compact heads (``head-type`` ``shared`` and ``low-rank``),
and the hypernetwork size of the paper's federation with and without a
MobileNetV2 client for each head type.

    python -m bench.hypernet [--rounds 3] [--device cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from common.models import build_model, num_chunks, num_trainable
from server_app.hypernet import HEAD_TYPES, HyperNetwork

from .common import DEFAULT_OUT, print_table, write_json

MODELS = ("cnn", "vgg8", "resnet10", "resnet12", "resnet18")
CHUNK, EMBED, HIDDEN, LAYERS, LR, CLIP, RANK = 3072, 64, 128, 3, 2e-4, 50.0, 8


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


def hypernet_step(hn: HyperNetwork):
    """The server's step for one reply (see ``MHPFedHN.hn_step``), and its Adam."""
    adam = torch.optim.Adam(hn.parameters(), lr=LR, fused=True)

    def step(name, delta):
        adam.zero_grad(set_to_none=True)
        hn.generate(name)  # theta sent to the client
        hn.accumulate_vjp(name, delta)
        params = [p for p in hn.parameters() if p.grad is not None]
        nn.utils.clip_grad_norm_(params, CLIP)
        adam.step()

    return step, adam


def build(head_type: str, sizes: dict[str, int], device) -> HyperNetwork:
    hn = HyperNetwork(EMBED, HIDDEN, LAYERS, CHUNK, head_type=head_type,
                      head_rank=RANK).to(device)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for m, k in sizes.items():
        hn.add_client(m, k, generator=gen)
    return hn


def federation_sizes(models: tuple[str, ...]) -> list[dict]:
    """Hypernetwork parameters for one client of each model, per head type
    (built on the meta device: no memory)."""
    sizes = {m: num_trainable(build_model(m, 10)) for m in models}
    rows = []
    for head_type in HEAD_TYPES:
        with torch.device("meta"):
            count = sum(p.numel() for p in build(head_type, sizes, "meta").parameters())
        rows.append({"federation": "+".join(models), "head_type": head_type,
                     "parameters": count, "parameter_MB": count * 4 / 2**20,
                     "adam_state_MB": 2 * count * 4 / 2**20})  # fmt: skip
    return rows


def row(label: str, module: nn.Module, seconds: float, optimizer) -> dict:
    count, nbytes = parameter_bytes(module)
    return {"formulation": label, "ms_per_client_step": seconds * 1e3,
            "parameters": count, "parameter_MB": nbytes / 2**20,
            "optimizer_state_MB": optimizer_bytes(optimizer) / 2**20}  # fmt: skip


def against_loop(sizes, deltas, rounds: int, device) -> tuple[list[dict], float]:
    """Per-position heads: ours against the loop; rows and max |theta diff|."""
    names = list(sizes)
    ours = build("per-position", sizes, device)
    reference = LoopHyperNetwork(ours).to(device)
    ours_step, adam = hypernet_step(ours)
    ref_adam = torch.optim.Adam(reference.parameters(), lr=LR)

    def reference_step(name, delta):
        ref_adam.zero_grad(set_to_none=True)
        with torch.no_grad():
            reference(name)
        reference(name).backward(delta)
        params = [p for p in reference.parameters() if p.grad is not None]
        nn.utils.clip_grad_norm_(params, CLIP)
        ref_adam.step()

    ours_s = timed_steps(ours_step, names, deltas, rounds, device)
    ref_s = timed_steps(reference_step, names, deltas, rounds, device)
    with torch.no_grad():
        diff = max(float((ours(n) - reference(n)).abs().max()) for n in names)
    rows = [
        row("per-position, batched (ours)", ours, ours_s, adam),
        row("per-position, loop (reference)", reference, ref_s, ref_adam),
    ]
    return rows, diff


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
    gen = torch.Generator().manual_seed(1)
    deltas = {
        m: torch.randn(sizes[m], generator=gen).mul_(1e-3).to(device) for m in MODELS
    }
    names = list(MODELS)
    rows, diff = against_loop(sizes, deltas, args.rounds, device)
    ours_s, ref_s = (r["ms_per_client_step"] / 1e3 for r in rows)
    for head_type in HEAD_TYPES[1:]:
        hn = build(head_type, sizes, device)
        step, optimizer = hypernet_step(hn)
        seconds = timed_steps(step, names, deltas, args.rounds, device)
        label = f"{head_type} head" + (
            f" (rank {RANK})" if head_type == "low-rank" else ""
        )
        rows.append(row(label, hn, seconds, optimizer))
    for r in rows:
        r["parameters_vs_paper"] = rows[0]["parameters"] / r["parameters"]
    print(f"\nhypernetwork step, 5 paper models at CIFAR-10 sizes, {device}, "
          f"{args.rounds} rounds x {len(names)} clients")  # fmt: skip
    print("chunks per model: " + ", ".join(
        f"{m} {num_chunks(sizes[m], CHUNK)}" for m in MODELS))  # fmt: skip
    print_table(rows, list(rows[0]))
    ratio = ref_s / ours_s
    print(f"\nspeed-up batched / loop: {ratio:.2f}x; max |theta difference| after "
          f"the timed steps: {diff:.2e}")  # fmt: skip
    federations = federation_sizes(MODELS) + federation_sizes((*MODELS, "mobilenetv2"))
    print("\nhypernetwork size by federation (fp32; Adam keeps two more copies)")
    print_table(federations, list(federations[0]))
    payload = {"rows": rows, "speedup": ratio, "max_theta_difference": diff,
               "federations": federations, "rounds": args.rounds,
               "device": str(device)}  # fmt: skip
    write_json(args.out, "hypernet", payload)
    return payload


if __name__ == "__main__":
    main()
