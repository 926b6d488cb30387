"""Alpha-beta(-gamma) cost model of our allreduce algorithms, used by `comm.algo=auto`.

A message of m bytes between two ranks costs alpha + m * beta; summing m bytes of partials costs
m * gamma. Messages that different ranks send at the same time overlap (their alphas do not add up),
but the bytes one rank sends or receives go through its own link one after another. Under that model:

    star   2 alpha + 2 (N-1) m beta + (N-1) m gamma      rank 0's link carries every partial and every sum
    ring   2 (N-1) alpha + 2 (N-1)/N m beta + (N-1)/N m gamma
    mesh   alpha + (N-1) m beta + (N-1) m gamma          one round; each rank sends and gets N-1 buffers
    tree   s (alpha + m beta + m gamma)                  recursive doubling, s = log2 N rounds,
                                                         plus 2 when N is not a power of two

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


def choose(n: int, nbytes: int, link: LinkModel,
           candidates: tuple[str, ...] = CANDIDATES) -> tuple[str, dict[str, float]]:
    """The candidate with the lowest predicted time (ties: the earlier one), and every prediction."""
    predictions = {algo: predict(algo, n, nbytes, link) for algo in candidates}
    best = min(candidates, key=lambda algo: predictions[algo])
    return best, predictions
