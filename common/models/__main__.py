"""``python -m common.models``: the zoo's sizes as the hypernetwork sees them."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .registry import available_models, build_model, num_chunks, num_trainable


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
