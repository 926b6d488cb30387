"""Entry point: split a Hugging Face checkpoint into one directory per rank (the work is in weights/split.py).

    python -m tpi_mpi.split --model models/tiny --out shards/tiny-4 --world-size 4 [--ratios .4,.2,.2,.2]
"""

from __future__ import annotations

import argparse
import sys

from tpi_mpi.errors import UserError
from tpi_mpi.weights.split import DTYPES, split
from tpi_mpi.weights.split import __doc__ as SPLIT_DOC


def parse_ratios(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--ratios takes comma-separated numbers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpi_mpi.split", description=(SPLIT_DOC or "").splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory (safetensors)")
    p.add_argument("--out", required=True, help="new directory: OUT/rank_0 .. OUT/rank_{N-1}")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--ratios", default=None, help="share of each rank, e.g. 0.4,0.2,0.2,0.2 (default equal)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="dtype on disk (auto: as source)")
    p.add_argument("--force", action="store_true", help="replace OUT once the new split is complete")
    args = p.parse_args(argv)
    try:
        out = split(args.model, args.out, args.world_size, parse_ratios(args.ratios), args.dtype,
                    args.force, quiet=False)
    except UserError as exc:
        print(f"tpi_mpi.split: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.world_size} rank directories to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
