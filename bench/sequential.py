"""The references a ``flwr run`` round is measured against (``bench.round``).

:func:`sequential_loop`: MH-pFedHN rounds as a plain loop of our own code, in this
process, without Flower: the same clients (models, data, seeded initialisation),
the same local SGD (:func:`client_app.training.train_local`) and evaluation
(:func:`client_app.training.evaluate_local`), the same server
(:class:`server_app.strategies.mh_pfedhn.MHPFedHN`: generate ``theta``, VJP, clip,
Adam), one client at a time in a seeded random order, as the authors' script does:
per client ``theta = h(v_i)``, train, one hypernetwork step on its delta; after
the round every client's ``theta`` is generated and evaluated on its test split.
Each model is built once and keeps its BatchNorm statistics between rounds. Torch
runs on its default intra-op threads (all cores), as the authors' script does.

:func:`round_flops`: the convolution and linear FLOPs of one round of the
clients' compute (forward + backward of local training, forward of evaluation),
counted by :class:`torch.utils.flop_counter.FlopCounterMode` on one batch per
model and scaled by each client's examples (these FLOPs are linear in the batch).

:func:`conv_throughput`: what this machine sustains on the same convolutions:
every ``Conv2d`` of the models, at the shapes a batch of 64 gives it, forward
and backward (input gradient where the model needs one, weight and bias
gradients), in a loop for at least ``seconds`` per layer; FLOPs over seconds.
Measured on one intra-op thread with the thread's CPU time (other jobs on the
machine do not inflate it), so ``cores x`` that is the machine's rate if every
core runs the same work (the simulation's case: one ClientApp per core); also on
all cores in one process with wall-clock time (the authors' case).
"""

from __future__ import annotations

import os
import time
import tomllib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .simulation import REPO, machine_busy_seconds

CORES = os.cpu_count() or 1


def app_config() -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the app's ``pyproject.toml``."""
    with (REPO / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


class _Client:
    """One client of the loop: its model (built once), data and seeds."""

    def __init__(self, cfg, pid: int, num: int) -> None:
        from client_app.local import assign_model
        from common.data import client_data_for
        from common.models import build_model

        self.pid, self.name = pid, f"client-{pid}"
        self.model_name = assign_model(pid, num, cfg.model_list)
        self.data = client_data_for(cfg, pid, num)
        seq = np.random.SeedSequence([cfg.seed, pid, 0x1417])
        torch.manual_seed(int(seq.generate_state(1)[0]))
        model = build_model(self.model_name, self.data.num_classes,
                            self.data.in_channels)  # fmt: skip
        self.model = model.to(memory_format=torch.channels_last)

    def generator(self, seed: int, server_round: int) -> torch.Generator:
        seq = np.random.SeedSequence([seed, server_round, self.pid])
        value = int(seq.generate_state(1)[0])
        torch.manual_seed(value)
        return torch.Generator().manual_seed(value)


def sequential_loop(
    run_config: dict[str, Any], clients: int, rounds: int
) -> dict[str, Any]:
    """``rounds`` MH-pFedHN rounds of ``clients`` clients as a plain loop.

    ``run_config`` overrides the app's defaults (dash-case keys). Returns per
    round its seconds split into server (generate ``theta``, hypernetwork steps),
    training and evaluation, per model the training and evaluation seconds, and
    the CPU the rest of the machine used meanwhile.
    """
    from client_app.training import LocalHParams, evaluate_local, train_local
    from common.allocator import keep_freed_memory
    from common.config import load_run_config
    from common.flat import flatten_params, load_flat_
    from common.models import num_trainable
    from server_app.strategies.mh_pfedhn import MHPFedHN

    keep_freed_memory()  # as the ClientApp's processes do
    cfg = load_run_config(app_config() | run_config)
    if cfg.strategy != "mh-pfedhn" or cfg.hn_update != "sequential":
        raise ValueError("the sequential loop is MH-pFedHN's sequential update")
    built = [_Client(cfg, pid, clients) for pid in range(clients)]
    strategy = MHPFedHN.from_config(cfg)
    for client in built:
        strategy.register(client.name, num_trainable(client.model))
    hparams = LocalHParams.from_config(cfg)
    rng = np.random.default_rng(cfg.seed)
    per_round, per_model = [], {}
    for rnd in range(1, rounds + 1):
        busy0, cpu0, t0 = machine_busy_seconds()[0], time.process_time(), time.time()
        start = time.perf_counter()
        server = train = evaluate = 0.0
        for k in rng.permutation(clients):
            client = built[int(k)]
            s = time.perf_counter()
            theta = strategy.theta(client.name)
            server += time.perf_counter() - s
            s = time.perf_counter()
            load_flat_(client.model, theta)
            train_local(
                client.model,
                client.data.train_x,
                client.data.train_y,
                hparams,
                client.generator(cfg.seed, rnd),
            )
            delta = theta - flatten_params(client.model).numpy()
            seconds = time.perf_counter() - s
            train += seconds
            entry = per_model.setdefault(
                client.model_name, {"train_s": [0.0] * rounds, "eval_s": [0.0] * rounds}
            )
            entry["train_s"][rnd - 1] += seconds
            s = time.perf_counter()
            strategy.hn_step([(client.name, torch.from_numpy(delta), 1.0)])
            server += time.perf_counter() - s
        correct = total = 0
        for client in built:
            s = time.perf_counter()
            theta = strategy.theta(client.name, keep=False)
            server += time.perf_counter() - s
            s = time.perf_counter()
            load_flat_(client.model, theta)
            _, right, n = evaluate_local(
                client.model, client.data.test_x, client.data.test_y
            )
            seconds = time.perf_counter() - s
            evaluate += seconds
            per_model[client.model_name]["eval_s"][rnd - 1] += seconds
            correct, total = correct + right, total + n
        elapsed = time.perf_counter() - start
        busy = machine_busy_seconds()[0] - busy0
        ours = time.process_time() - cpu0
        per_round.append(
            {
                "round": rnd,
                "round_s": elapsed,
                "server_s": server,
                "train_s": train,
                "eval_s": evaluate,
                "accuracy": correct / total if total else 0.0,
                "cpu_s": ours,
                "foreign_cpu_share": max(0.0, busy - ours) / (elapsed * CORES),
                "finished_at": t0 + elapsed,
            }
        )
        print(
            f"sequential loop round {rnd}/{rounds}: {elapsed:.2f} s (server "
            f"{server:.2f}, train {train:.2f}, eval {evaluate:.2f})",
            flush=True,
        )
    return {"rounds": per_round, "per_model": per_model,
            "threads": torch.get_num_threads()}  # fmt: skip


# --------------------------------------------------------------------- FLOPs
def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def model_flops(name: str, num_classes: int = 10, in_channels: int = 3,
                batch: int = 64) -> dict[str, float]:  # fmt: skip
    """Convolution and linear FLOPs per example of one training step (forward and
    backward) and of one evaluation forward of model ``name``."""
    from common.models import build_model

    model = build_model(name, num_classes, in_channels).to(
        memory_format=torch.channels_last
    )
    x = torch.randn(batch, in_channels, 32, 32).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, num_classes, (batch,))
    model.train()
    train = _flops(lambda: F.cross_entropy(model(x), y).backward())
    model.eval()
    with torch.no_grad():
        forward = _flops(lambda: model(x))
    return {"train": train / batch, "eval": forward / batch}


def round_flops(run_config: dict[str, Any], clients: int) -> dict[str, Any]:
    """FLOPs of one round of the clients' compute: every client trains
    ``local-epochs`` over its train split and evaluates its test split once."""
    from client_app.local import assign_model
    from common.config import load_run_config
    from common.data import client_data_for

    cfg = load_run_config(app_config() | run_config)
    per_model: dict[str, dict[str, float]] = {}
    cache: dict[str, dict[str, float]] = {}
    for pid in range(clients):
        name = assign_model(pid, clients, cfg.model_list)
        data = client_data_for(cfg, pid, clients)
        if name not in cache:
            cache[name] = model_flops(name, data.num_classes, data.in_channels)
        entry = per_model.setdefault(name, {"train": 0.0, "eval": 0.0})
        entry["train"] += cache[name]["train"] * data.num_train * cfg.local_epochs
        entry["eval"] += cache[name]["eval"] * data.num_test
    total = sum(e["train"] + e["eval"] for e in per_model.values())
    return {"per_model": per_model, "per_example": cache, "total": total}


def _conv_layers(names: list[str], batch: int) -> list[tuple[nn.Conv2d, tuple, bool]]:
    """Every Conv2d of the models with its input shape; whether the model needs
    its input gradient (not for the first layer, which sees the images)."""
    from common.models import build_model

    found = []
    for name in dict.fromkeys(names):
        model = build_model(name, 10)
        shapes: list[tuple[nn.Conv2d, tuple]] = []
        hooks = [
            m.register_forward_hook(
                lambda mod, inp, out, shapes=shapes: shapes.append(
                    (mod, tuple(inp[0].shape))
                )
            )
            for m in model.modules()
            if isinstance(m, nn.Conv2d)
        ]
        with torch.no_grad():
            model(torch.zeros(batch, 3, 32, 32))
        for hook in hooks:
            hook.remove()
        found += [(conv, shape, shape[1] != 3) for conv, shape in shapes]
    return found


def _distinct(layers):
    """Layers of the same configuration and input shape once, with their count."""
    counts: dict[tuple, list] = {}
    for conv, shape, input_grad in layers:
        key = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
               conv.padding, conv.bias is not None, shape, input_grad)  # fmt: skip
        counts.setdefault(key, [conv, shape, input_grad, 0])[3] += 1
    return [tuple(v) for v in counts.values()]


def conv_throughput(
    names: list[str],
    threads: int = 1,
    seconds: float = 0.3,
    batch: int = 64,
    precision: str = "fp32",
) -> dict[str, float]:
    """GFLOP/s of forward + backward over every convolution of ``names``.

    With ``threads = 1`` the time is this thread's CPU time (robust to other
    jobs); otherwise wall-clock on ``threads`` intra-op threads. ``precision``
    is run-config ``client-precision``: ``bf16`` runs the forward pass under
    :func:`client_app.training.mixed_precision`, as local training does.
    """
    from client_app.training import mixed_precision

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter
    flops = spent = 0.0
    try:
        for conv, shape, input_grad, count in _distinct(_conv_layers(names, batch)):
            conv = conv.to(memory_format=torch.channels_last)
            x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
            x.requires_grad_(input_grad)

            def step(conv=conv, x=x):
                with mixed_precision("cpu", precision):
                    out = conv(x)
                out.backward(torch.ones_like(out))

            per_step = _flops(step)
            step()  # warm-up (oneDNN primitive creation)
            n, start = 0, clock()
            while clock() - start < seconds or n < 3:
                step()
                n += 1
            # each distinct layer stands for ``count`` layers of the models
            spent += (clock() - start) * count
            flops += per_step * n * count
    finally:
        torch.set_num_threads(before)
    return {"gflops": flops / spent / 1e9, "threads": threads, "precision": precision}
