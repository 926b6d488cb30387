"""Entry point: split a Hugging Face checkpoint into one directory per rank (the work is in weights/split.py).

    python -m tpi_mpi.split --model models/tiny --out shards/tiny-4 --world-size 4 [--ratios .4,.2,.2,.2]
        [--quant int8|int4 [--group-size 32|64|128]]
"""

from __future__ import annotations

import argparse
import sys

from tpi_mpi.errors import UserError, main_guard
from tpi_mpi.weights.formats import DEFAULT_GROUP_SIZE, FORMATS, GROUP_SIZES, MODEL_KERNELS, make_spec
from tpi_mpi.weights.split import DTYPES, split
from tpi_mpi.weights.split import __doc__ as SPLIT_DOC


def parse_ratios(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--ratios takes comma-separated numbers, got {text!r}") from None


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpi_mpi.split", description=(SPLIT_DOC or "").splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory (safetensors)")
    p.add_argument("--out", required=True, help="new directory: OUT/rank_0 .. OUT/rank_{N-1}")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--ratios", default=None, help="share of each rank, e.g. 0.4,0.2,0.2,0.2 (default equal)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="dtype on disk (auto: as source)")
    p.add_argument("--quant", default="none", metavar="{" + ",".join(FORMATS) + "}",
                   help="linear weights (q/k/v/o, gate/up/down, lm_head rows): none = float as --dtype; int8 = one "
                        "scale per output channel; int4 = a scale and zero per group of --group-size input columns. "
                        "Norms, biases and the embedding stay float (docs/quantization.md)")
    p.add_argument("--group-size", type=int, default=None,
                   help=f"int4 only: input columns per group, one of {', '.join(map(str, GROUP_SIZES))} "
                        f"(default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--kernel", default="auto", metavar="{" + ",".join(MODEL_KERNELS) + "}",
                   help="int4 only, the kernel its layout is for: auto = the AVX2 kernel's rows layout where that "
                        "kernel builds here (x86-64 with AVX2 and a C compiler), else torch's; native = the rows "
                        "layout or an error; torch = torch's layout (which depends on the CPU's vector width)")
    p.add_argument("--force", action="store_true", help="replace OUT once the new split is complete")
    args = p.parse_args(argv)
    try:
        out = split(args.model, args.out, args.world_size, parse_ratios(args.ratios), args.dtype,
                    args.force, quiet=False, quant_format=args.quant, group_size=args.group_size, kernel=args.kernel)
    except UserError as exc:
        print(f"tpi_mpi: error: {exc}", file=sys.stderr)  # the one error line every entry point prints
        return 2
    spec = make_spec(args.quant, args.group_size)
    print(f"wrote {args.world_size} rank directories to {out} (weights: "
          f"{spec.label if spec.quantized else args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
