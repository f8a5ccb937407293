"""The shapes of a tensor-train matrix (TT-matrix) factorisation: pure integer arithmetic, no torch.

A matrix ``W`` of ``[out, in]`` is seen as a TT-matrix of ``d`` cores: ``out`` is padded to ``M =
m_1 * ... * m_d`` and ``in`` to ``N = n_1 * ... * n_d`` (zeros), and

    W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] @ G_2[:, i_2, j_2, :] @ ... @ G_d[:, i_d, j_d, :]

with cores ``G_k`` of shape ``[r_{k-1}, m_k, n_k, r_k]`` and ``r_0 = r_d = 1`` (row and column
indices are read most significant factor first). :func:`layout` chooses the factors from the
matrix's dimensions: ``d = 3`` (``d = 2`` when a side has fewer than 8 entries), each side split
into ``d`` near-equal factors of the smallest padded size whose largest factor is at most
``ceil(1.5 * side^(1/d))`` (so that a prime dimension, e.g. a vocabulary of 30,522, is padded a
little rather than split into a large factor), factors sorted ascending.

A TT *rank* ``r`` caps every bond: ``r_k = min(r, bond_max_k)``, where ``bond_max_k =
min(prod_{i<=k} m_i n_i, prod_{i>k} m_i n_i)`` is the rank of the ``k``-th unfolding of a generic
matrix. :func:`full_rank` (the largest ``bond_max_k``) is the rank at which a TT-matrix represents
every matrix exactly; a larger rank means nothing and is refused by the search space.

Storage and work (what :mod:`search.cost` counts):

* :func:`core_params`: ``sum_k r_{k-1} m_k n_k r_k``;
* :func:`core_rows`: every core is quantized as the matrix ``[r_{k-1} * m_k, n_k * r_k]``, one scale
  (and zero point) per row, so a core has ``r_{k-1} * m_k`` scales;
* :func:`macs_per_token`: the multiply-accumulates of the TT forward of one input row, contracting the
  cores from the last to the first: ``sum_k (n_1..n_{k-1}) * n_k * r_k * r_{k-1} * m_k * (m_{k+1}..m_d)``
  (the padded input is read once; padding costs its MACs too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["TTLayout", "factorize", "layout"]


def _balanced(n: int, d: int) -> tuple[int, ...] | None:
    """The factorisation of ``n`` into ``d`` factors (ascending) with the smallest largest factor."""
    if d == 1:
        return (n,)
    best: tuple[int, ...] | None = None
    f = 1
    while f**d <= n:  # the smallest factor is at most n^(1/d)
        if n % f == 0:
            rest = _balanced(n // f, d - 1)
            if rest is not None and rest[0] >= f:
                cand = (f, *rest)
                if best is None or (max(cand), -min(cand)) < (max(best), -min(best)):
                    best = cand
        f += 1
    return best


@lru_cache(maxsize=4096)
def factorize(n: int, d: int) -> tuple[int, ...]:
    """``d`` near-equal factors (ascending) of the smallest ``P >= n`` whose balanced factorisation
    has no factor above ``ceil(1.5 * n^(1/d))``."""
    if n < 1 or d < 1:
        raise ValueError(f"cannot factorise {n} into {d} factors")
    bound = max(2, math.ceil(1.5 * n ** (1.0 / d)))
    p = n
    while True:
        f = _balanced(p, d)
        if f is not None and max(f) <= bound:
            return f
        p += 1


@dataclass(frozen=True)
class TTLayout:
    """The factor shapes of one matrix's TT-matrix: ``out_factors`` (``m_k``) and ``in_factors``
    (``n_k``) of the padded ``[M, N]``, for a matrix of ``shape`` ``(out, in)``."""

    shape: tuple[int, int]
    out_factors: tuple[int, ...]
    in_factors: tuple[int, ...]

    @property
    def d(self) -> int:
        return len(self.out_factors)

    @property
    def padded(self) -> tuple[int, int]:
        return math.prod(self.out_factors), math.prod(self.in_factors)

    def bond_max(self) -> tuple[int, ...]:
        """The largest useful rank of every bond (``d - 1`` entries)."""
        sizes = [m * n for m, n in zip(self.out_factors, self.in_factors, strict=True)]
        return tuple(min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(self.d - 1))

    def full_rank(self) -> int:
        """The rank at which the TT-matrix is exact for every matrix (the largest bond)."""
        return max(self.bond_max(), default=1)

    def ranks(self, rank: int) -> tuple[int, ...]:
        """``(1, r_1, ..., r_{d-1}, 1)`` at TT rank ``rank``."""
        return (1, *(min(rank, b) for b in self.bond_max()), 1)

    def core_shapes(self, rank: int) -> tuple[tuple[int, int, int, int], ...]:
        r = self.ranks(rank)
        return tuple((r[k], self.out_factors[k], self.in_factors[k], r[k + 1]) for k in range(self.d))

    def core_params(self, rank: int) -> int:
        return sum(math.prod(s) for s in self.core_shapes(rank))

    def core_rows(self, rank: int) -> tuple[int, ...]:
        """Rows (scales) of every core's quantization matrix ``[r_{k-1} * m_k, n_k * r_k]``."""
        return tuple(s[0] * s[1] for s in self.core_shapes(rank))

    def macs_per_token(self, rank: int) -> int:
        shapes = self.core_shapes(rank)
        total = 0
        for k, (r0, m, n, r1) in enumerate(shapes):
            before = math.prod(self.in_factors[:k])
            after = math.prod(self.out_factors[k + 1 :])
            total += before * n * r1 * r0 * m * after
        return total

    def to_dict(self) -> dict[str, list[int]]:
        return {"out_factors": list(self.out_factors), "in_factors": list(self.in_factors)}


@lru_cache(maxsize=4096)
def layout(out_features: int, in_features: int) -> TTLayout:
    """The TT-matrix layout of an ``[out_features, in_features]`` matrix (rules in the module docstring)."""
    d = 3 if min(out_features, in_features) >= 8 else 2
    return TTLayout((out_features, in_features), factorize(out_features, d), factorize(in_features, d))
