"""Bytes per client per round under each ``transfer`` encoding.

Setting: the paper's five models at CIFAR-10 sizes (CNN, VGG8, ResNet10/12/18),
and MH-pFedHNGD's global model (``global-model``, default the CNN), whose
``global-theta`` / ``global-delta`` travel on top of each client's own vectors.
For every model and encoding, a real ``theta`` and ``delta`` of the model's
length are encoded with :mod:`common.transfer` exactly as the apps do, put in an
``arrays`` :class:`~flwr.app.ArrayRecord`, and counted with
:func:`server_app.engine.costs.payload_bytes` (what the per-round
``bytes_down`` / ``bytes_up`` metrics count: array data including Flower's
per-array header). Down is a train message (an evaluation message carries the
same ``theta``), up a train reply.

    python -m bench.comm [--fractions 0.1 0.01] [--global-model cnn] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from common import protocol as P
from common.models import build_model, num_trainable
from common.transfer import encode_dense, encode_update
from server_app.engine.costs import payload_bytes

from .common import DEFAULT_OUT, print_table, write_json

MODELS = ("cnn", "vgg8", "resnet10", "resnet12", "resnet18")


def record_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of ``arrays`` as one message's ``arrays`` record."""
    record = ArrayRecord({key: Array(value) for key, value in arrays.items()})
    return payload_bytes(RecordDict({P.ARRAYS: record}))


def message_bytes(
    size: int, mode: str, fraction: float, theta_key: str, delta_key: str
) -> tuple[int, int]:
    """(down, up) bytes of one vector of ``size`` values and its update."""
    rng = np.random.default_rng(size)
    theta = rng.normal(0.0, 0.05, size).astype(np.float32)
    delta = rng.normal(0.0, 1e-3, size).astype(np.float32)
    down = record_bytes({theta_key: encode_dense(theta, mode)})
    up = record_bytes(encode_update(delta, delta_key, mode, fraction))
    return down, up


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.01],
                        help="topk-fraction values to report")  # fmt: skip
    parser.add_argument("--global-model", default="cnn")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    encodings = [("fp32", 1.0), ("fp16", 1.0)]
    encodings += [("topk", f) for f in args.fractions]
    entries = [(m, P.THETA, P.DELTA) for m in MODELS]
    entries.append((f"global {args.global_model}", P.GLOBAL_THETA, P.GLOBAL_DELTA))
    rows = []
    for label, theta_key, delta_key in entries:
        model = label.removeprefix("global ")
        size = num_trainable(build_model(model, 10))
        base_down, base_up = message_bytes(size, "fp32", 1.0, theta_key, delta_key)
        for mode, fraction in encodings:
            down, up = message_bytes(size, mode, fraction, theta_key, delta_key)
            rows.append(
                {
                    "model": label,
                    "params": size,
                    "transfer": mode if mode != "topk" else f"topk {fraction:g}",
                    "down_MB": down / 1e6,
                    "up_MB": up / 1e6,
                    "down_vs_fp32": down / base_down,
                    "up_vs_fp32": up / base_up,
                    "down_bytes": down,
                    "up_bytes": up,
                }
            )
    print("\nbytes per client per round (one train message down, its reply up); "
          "'global' = MH-pFedHNGD's extra global theta/delta")  # fmt: skip
    columns = ["model", "params", "transfer", "down_MB", "up_MB",
               "down_vs_fp32", "up_vs_fp32"]  # fmt: skip
    print_table(rows, columns)
    payload = {"rows": rows, "fractions": args.fractions,
               "global_model": args.global_model}  # fmt: skip
    write_json(args.out, "comm", payload)
    return payload


if __name__ == "__main__":
    main()
