"""Alpha-beta(-gamma) cost model of our allreduce algorithms, used by `comm.algo=auto`.

A message of m bytes between two ranks costs alpha + m * beta; summing m bytes of partials costs
m * gamma. Messages that different ranks send at the same time overlap (their alphas do not add up),
but the bytes one rank sends or receives go through its own link one after another. Under that model:

    star   2 alpha + 2 (N-1) m beta + (N-1) m gamma      rank 0's link carries every partial and every sum
    ring   2 (N-1) alpha + 2 (N-1)/N m beta + (N-1)/N m gamma
    mesh   alpha + (N-1) m beta + (N-1) m gamma          one round; each rank sends and gets N-1 buffers
    tree   s (alpha + m beta + m gamma)                  recursive doubling, s = log2 N rounds,
                                                         plus 2 when N is not a power of two

With a wire format other than fp32 (`comm.dtype`), m is the bytes on the wire (wire.py: fp16 and bf16 half of
fp32's, int8 1.125 per value), the sums still cost gamma per float32 byte, and each algorithm encodes and decodes
the buffer some number of times on its critical path (`codec_passes`), at the wire's measured seconds per value.
`choose_wire` picks the algorithm and the wire together (comm.dtype=auto: the user allowed lossy wires).

No MPI here, so that the model can be unit-tested with made-up links. MPI_Allreduce is not a candidate:
its algorithm is the library's choice, which this model cannot know.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CANDIDATES = ("star", "ring", "mesh", "tree")


@dataclass(frozen=True)
class LinkModel:
    alpha: float  # seconds per message
    beta: float  # seconds per byte on one rank's link
    gamma: float = 0.0  # seconds per byte added


@dataclass(frozen=True)
class WireCost:
    """A wire format as the model sees it: bytes per value on the wire, seconds per value to encode and to
    decode (measured at start-up by allreduce.probe_codecs; 0 for fp32, which goes as it is)."""

    bytes_per_value: float
    encode_s: float = 0.0
    decode_s: float = 0.0


FP32_WIRE = WireCost(4.0)


def tree_rounds(n: int) -> int:
    if n <= 1:
        return 0
    p2 = 1 << (n.bit_length() - 1)
    return int(math.log2(p2)) + (0 if p2 == n else 2)


def predict(algo: str, n: int, nbytes: int, link: LinkModel) -> float:
    """Predicted seconds of one allreduce of `nbytes` (on the wire) over `n` ranks."""
    if n <= 1 or nbytes == 0:
        return 0.0
    a, b, g, m = link.alpha, link.beta, link.gamma, nbytes
    if algo == "star":
        return 2 * a + 2 * (n - 1) * m * b + (n - 1) * m * g
    if algo == "ring":
        return 2 * (n - 1) * a + 2 * (n - 1) / n * m * b + (n - 1) / n * m * g
    if algo == "mesh":
        return a + (n - 1) * m * b + (n - 1) * m * g
    if algo == "tree":
        return tree_rounds(n) * (a + m * b + m * g)
    raise ValueError(f"no cost model for allreduce algorithm {algo!r}")


def codec_passes(algo: str, n: int) -> tuple[float, float]:
    """Whole-buffer encodes and decodes on the critical path of one allreduce (allreduce.py):
    star   the worker's partial and rank 0's sum encoded; rank 0 decodes N-1 partials, the worker the sum
    ring   each reduce-scatter step encodes and decodes 1/N, the owner encodes its 1/N, the all-gather
           decodes N-1 chunks (and forwards bytes as they are)
    mesh   the own partial encoded (and decoded, to keep what the others see), N-1 partials decoded
    tree   each round encodes the running sum, decodes it back and decodes the partner's"""
    if n <= 1:
        return 0.0, 0.0
    if algo == "star":
        return 2.0, float(n)
    if algo == "ring":
        return 1.0, 2 * (n - 1) / n
    if algo == "mesh":
        return 1.0, float(n)
    if algo == "tree":
        return float(tree_rounds(n)), 2.0 * tree_rounds(n)
    raise ValueError(f"no cost model for allreduce algorithm {algo!r}")


def predict_wire(algo: str, n: int, values: int, link: LinkModel, wire: WireCost = FP32_WIRE) -> float:
    """Predicted seconds of one allreduce of `values` float32 values sent as `wire`: the messages at the
    wire's bytes, the sums at float32 bytes, plus encoding and decoding."""
    if n <= 1 or values == 0:
        return 0.0
    messages = predict(algo, n, math.ceil(values * wire.bytes_per_value), LinkModel(link.alpha, link.beta))
    sums = predict(algo, n, 4 * values, LinkModel(0.0, 0.0, link.gamma))
    encodes, decodes = codec_passes(algo, n)
    return messages + sums + values * (encodes * wire.encode_s + decodes * wire.decode_s)


def choose_wire(n: int, values: int, link: LinkModel, wires: dict[str, WireCost],
                candidates: tuple[str, ...] = CANDIDATES) -> tuple[tuple[str, str], dict[tuple[str, str], float]]:
    """The (algorithm, wire) with the lowest predicted time (ties: the earlier algorithm, then the earlier
    wire), and every prediction."""
    predictions = {(a, w): predict_wire(a, n, values, link, cost) for a in candidates for w, cost in wires.items()}
    best = min(predictions, key=lambda k: predictions[k])
    return best, predictions


def choose(n: int, nbytes: int, link: LinkModel,
           candidates: tuple[str, ...] = CANDIDATES) -> tuple[str, dict[str, float]]:
    """The candidate with the lowest predicted time (ties: the earlier one), and every prediction."""
    predictions = {algo: predict(algo, n, nbytes, link) for algo in candidates}
    best = min(candidates, key=lambda algo: predictions[algo])
    return best, predictions
