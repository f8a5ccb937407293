"""Tensor-train matrices: TT-SVD, quantized cores, the factorised forward and its modules.

The layout (factor shapes, ranks, what the cost model counts) is :mod:`search.tt_layout`. Here:

* :func:`tt_svd`: the cores of a matrix at a TT rank by the TT-SVD of Oseledets (2011) on
  ``torch.linalg.svd``: the padded ``[M, N]`` matrix is reshaped to the ``d``-way tensor of index
  pairs ``(i_k, j_k)``, and each unfolding is split by a truncated SVD, left factor to the core, the
  rest (``diag(S) @ Vh``) carried on; computed in float64, returned in the weight's dtype. At a rank
  at least the matrix's TT rank the cores reconstruct it exactly (to rounding);
* :func:`quantize_cores`: every core as the matrix ``[r_{k-1} * m_k, n_k * r_k]`` quantized per row
  with :mod:`search.quant` (integer bits, the search's clip rule), rounded through float16 (16 bits)
  or kept (32 bits); :func:`core_qparams` gives the scales an artifact stores;
* :func:`tt_matmul`: ``x @ W^T`` for ``W`` given by its cores, contracting core by core (never
  building ``W``); :func:`tt_rows`: rows of ``W`` (an embedding's lookup); :func:`tt_full`: ``W``;
* :class:`TTLinear` and :class:`TTEmbedding`: modules that stand in for a linear layer (or GPT-2's
  ``Conv1D``) and an embedding, holding the cores (and the bias) and running the factorised forward;
* :func:`option_cores` / :func:`option_weight`: what a tensor-train option makes of a matrix: the
  quantized cores, and the dense matrix they stand for (what sensitivity methods score).

Padding rows and columns are zeros in the padded matrix, so the cores of a matrix reproduce it on
its own rows and columns and the padding never reaches an output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from search import quant
from search.errors import InvalidInputError
from search.tt_layout import TTLayout, layout

__all__ = [
    "StoredCores",
    "TTEmbedding",
    "TTLinear",
    "core_matrix",
    "core_qparams",
    "option_cores",
    "option_weight",
    "quantize_cores",
    "stored_cores",
    "tt_full",
    "tt_matmul",
    "tt_rows",
    "tt_svd",
]


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidInputError(f"a TT rank is a positive integer, got {rank!r}", field="tt_rank")


def tt_svd(w: torch.Tensor, rank: int, lay: TTLayout | None = None) -> list[torch.Tensor]:
    """The TT-matrix cores of the ``[out, in]`` matrix ``w`` at TT rank ``rank`` (module docstring);
    core ``k`` has shape ``[r_{k-1}, m_k, n_k, r_k]`` of ``lay.core_shapes(rank)``."""
    _check_rank(rank)
    if w.ndim != 2:
        raise InvalidInputError("tt_svd needs a 2-d [out, in] matrix", field="weight")
    lay = lay or layout(int(w.shape[0]), int(w.shape[1]))
    if tuple(w.shape) != lay.shape:
        raise InvalidInputError(f"layout of {lay.shape} does not fit a matrix of {tuple(w.shape)}", field="weight")
    big_m, big_n = lay.padded
    d = lay.d
    wp = torch.zeros(big_m, big_n, dtype=torch.float64, device=w.device)
    wp[: w.shape[0], : w.shape[1]] = w.detach().to(torch.float64)
    t = wp.reshape(*lay.out_factors, *lay.in_factors)
    perm = [x for k in range(d) for x in (k, d + k)]
    t = t.permute(*perm).reshape(*(m * n for m, n in zip(lay.out_factors, lay.in_factors, strict=True)))
    ranks = lay.ranks(rank)
    cores = []
    c = t.reshape(1, -1)
    for k in range(d - 1):
        m, n = lay.out_factors[k], lay.in_factors[k]
        c = c.reshape(ranks[k] * m * n, -1)
        u, s, vh = torch.linalg.svd(c, full_matrices=False)
        r = ranks[k + 1]
        u, s, vh = u[:, :r], s[:r], vh[:r]
        if u.shape[1] < r:  # a unfolding of lower rank than the bond allows: pad with zeros
            u = torch.cat([u, u.new_zeros(u.shape[0], r - u.shape[1])], dim=1)
            vh = torch.cat([vh, vh.new_zeros(r - vh.shape[0], vh.shape[1])], dim=0)
            s = torch.cat([s, s.new_zeros(r - s.shape[0])])
        cores.append(u.reshape(ranks[k], m, n, r))
        c = s[:, None] * vh
    cores.append(c.reshape(ranks[d - 1], lay.out_factors[-1], lay.in_factors[-1], 1))
    return [core.to(w.dtype).contiguous() for core in cores]


def core_matrix(core: torch.Tensor) -> torch.Tensor:
    """The ``[r_{k-1} * m_k, n_k * r_k]`` view of a core, the matrix it is quantized as."""
    r0, m, n, r1 = core.shape
    return core.reshape(r0 * m, n * r1)


def core_qparams(
    cores: Sequence[torch.Tensor], bits: int, *, symmetric: bool = True, clip: quant.Clip = "mse"
) -> list[quant.QParams]:
    """The per-row quantization parameters of every core (integer ``bits``)."""
    return [quant.choose_qparams(core_matrix(c), bits, symmetric=symmetric, clip=clip) for c in cores]


def quantize_cores(
    cores: Sequence[torch.Tensor], bits: int, *, symmetric: bool = True, clip: quant.Clip = "mse"
) -> list[torch.Tensor]:
    """Every core as the quantized model holds it (module docstring): integer ``bits`` per row of
    :func:`core_matrix`, 16 rounded through float16, 32 unchanged."""
    if bits == 0:
        raise InvalidInputError("tensor-train cores cannot be pruned", field="bits")
    return [
        quant.fake_quantize(core_matrix(c), bits, symmetric=symmetric, clip=clip).reshape(c.shape)
        if 2 <= bits <= 8
        else quant.fake_quantize(c, bits)
        for c in cores
    ]


def _check_cores(cores: Sequence[torch.Tensor], lay: TTLayout) -> None:
    if len(cores) != lay.d:
        raise InvalidInputError(f"{len(cores)} cores for a layout of {lay.d}", field="cores")
    for k, c in enumerate(cores):
        r0, m, n, r1 = c.shape
        if (m, n) != (lay.out_factors[k], lay.in_factors[k]) or (k == 0 and r0 != 1) or (k == lay.d - 1 and r1 != 1):
            raise InvalidInputError(f"core {k} of shape {tuple(c.shape)} does not fit the layout", field="cores")
        if k and cores[k - 1].shape[3] != r0:
            raise InvalidInputError(f"cores {k - 1} and {k} disagree on their rank", field="cores")


def tt_matmul(x: torch.Tensor, cores: Sequence[torch.Tensor], lay: TTLayout) -> torch.Tensor:
    """``x @ W^T`` for the ``[out, in]`` matrix ``W`` of ``cores``: ``x`` is ``[..., in]``, the result
    ``[..., out]``. Contracts the cores from the last to the first (the MACs of
    :meth:`TTLayout.macs_per_token`); the input is zero-padded to ``N`` and the output cut to ``out``."""
    out_f, in_f = lay.shape
    big_m, big_n = lay.padded
    lead = x.shape[:-1]
    z = x.reshape(-1, x.shape[-1])
    if big_n != in_f:
        z = torch.nn.functional.pad(z, (0, big_n - in_f))
    b = z.shape[0]
    d = lay.d
    before = big_n // lay.in_factors[-1]
    # z: [B, n_1..n_{k-1}, n_k, r_k, m_{k+1}..m_d]
    z = z.reshape(b, before, lay.in_factors[-1], 1, 1)
    for k in range(d - 1, -1, -1):
        core = cores[k]
        z = torch.einsum("bpnrq,smnr->bpsmq", z, core)  # [B, before, r_{k-1}, m_k, after]
        after = z.shape[3] * z.shape[4]
        if k > 0:
            n_prev = lay.in_factors[k - 1]
            z = z.reshape(b, before // n_prev, n_prev, core.shape[0], after)
            before //= n_prev
        else:
            z = z.reshape(b, after)
    y = z[:, :out_f] if big_m != out_f else z
    return y.reshape(*lead, out_f)


def tt_rows(index: torch.Tensor, cores: Sequence[torch.Tensor], lay: TTLayout) -> torch.Tensor:
    """Rows ``W[index]`` of the ``[out, in]`` matrix of ``cores`` (an embedding lookup): the result is
    ``[*index.shape, in]``."""
    in_f = lay.shape[1]
    flat = index.reshape(-1)
    digits = []
    rest = flat
    for m in reversed(lay.out_factors):
        digits.append(rest % m)
        rest = torch.div(rest, m, rounding_mode="floor")
    digits.reverse()
    z = cores[0][0, digits[0]]  # [B, n_1, r_1]
    for k in range(1, lay.d):
        g = cores[k][:, digits[k]]  # [r_{k-1}, B, n_k, r_k]
        z = torch.einsum("bpr,rbnq->bpnq", z, g).reshape(flat.shape[0], -1, g.shape[-1])
    rows = z.reshape(flat.shape[0], -1)[:, :in_f]
    return rows.reshape(*index.shape, in_f)


def tt_full(cores: Sequence[torch.Tensor], lay: TTLayout) -> torch.Tensor:
    """The ``[out, in]`` matrix of ``cores`` (padding cut off)."""
    d = lay.d
    t = cores[0]
    for c in cores[1:]:
        t = torch.tensordot(t, c, dims=([t.ndim - 1], [0]))
    # t: [1, m_1, n_1, m_2, n_2, ..., m_d, n_d, 1]
    t = t.reshape(*(x for m, n in zip(lay.out_factors, lay.in_factors, strict=True) for x in (m, n)))
    perm = [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]
    big_m, big_n = lay.padded
    w = t.permute(*perm).reshape(big_m, big_n)
    return w[: lay.shape[0], : lay.shape[1]]


def option_cores(
    w: torch.Tensor, rank: int, bits: int, *, symmetric: bool = True, clip: quant.Clip = "mse"
) -> list[torch.Tensor]:
    """The cores a tensor-train option ``tt<rank>@<bits>`` makes of the ``[out, in]`` matrix ``w``:
    :func:`tt_svd`, then :func:`quantize_cores`."""
    lay = layout(int(w.shape[0]), int(w.shape[1]))
    return quantize_cores(tt_svd(w, rank, lay), bits, symmetric=symmetric, clip=clip)


def option_weight(
    w: torch.Tensor, rank: int, bits: int, *, symmetric: bool = True, clip: quant.Clip = "mse"
) -> torch.Tensor:
    """The dense ``[out, in]`` matrix a tensor-train option stands for (in ``w``'s dtype)."""
    lay = layout(int(w.shape[0]), int(w.shape[1]))
    return tt_full(option_cores(w, rank, bits, symmetric=symmetric, clip=clip), lay).to(w.dtype)


@dataclass(frozen=True)
class StoredCores:
    """The cores of a tensor-train option as an artifact stores them: ``cores`` as the forward pass
    uses them (dequantized), and for integer ``bits`` the per-row ``qparams`` of each core's
    :func:`core_matrix` (None for 16- and 32-bit cores)."""

    bits: int
    symmetric: bool
    cores: tuple[torch.Tensor, ...]
    qparams: tuple[quant.QParams, ...] | None = None


def stored_cores(
    w: torch.Tensor, rank: int, bits: int, *, symmetric: bool = True, clip: quant.Clip = "mse"
) -> StoredCores:
    """:func:`option_cores` with the quantization parameters an artifact stores (the same cores)."""
    raw = tt_svd(w, rank, layout(int(w.shape[0]), int(w.shape[1])))
    if 2 <= bits <= 8:
        qps = core_qparams(raw, bits, symmetric=symmetric, clip=clip)
        cores = tuple(
            quant.dequantize(quant.quantize(core_matrix(c), qp), qp, dtype=c.dtype).reshape(c.shape)
            for c, qp in zip(raw, qps, strict=True)
        )
        return StoredCores(bits, symmetric, cores, tuple(qps))
    return StoredCores(bits, True, tuple(quantize_cores(raw, bits)), None)


class _TTModule(nn.Module):
    def __init__(self, cores: Sequence[torch.Tensor], lay: TTLayout, *, trainable: bool = False) -> None:
        super().__init__()
        _check_cores(cores, lay)
        self.layout = lay
        self.cores = nn.ParameterList([nn.Parameter(c.detach().clone(), requires_grad=trainable) for c in cores])
        #: replaces the cores as the forward pass sees them (TT-QAT: fake-quantized cores), when set
        self.core_transform: nn.Module | None = None

    def effective_cores(self) -> list[torch.Tensor]:
        cores = list(self.cores)
        return self.core_transform(cores) if self.core_transform is not None else cores

    def weight_matrix(self) -> torch.Tensor:
        """The ``[out, in]`` matrix the cores stand for."""
        return tt_full(self.effective_cores(), self.layout)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` matrix, rebuilt on every read (for code that reads ``.weight``, e.g. a
        tied output head or an export of a refined model); the forward pass never builds it."""
        return self.weight_matrix()


class TTLinear(_TTModule):
    """A linear layer (``y = x @ W^T + b``) whose ``[out, in]`` matrix ``W`` is held as TT-matrix
    cores and applied core by core (:func:`tt_matmul`). Stands for ``nn.Linear`` and GPT-2's
    ``Conv1D`` alike (both are ``[out, in]`` to the adapter)."""

    def __init__(
        self, cores: Sequence[torch.Tensor], lay: TTLayout, bias: torch.Tensor | None = None, *, trainable: bool = False
    ) -> None:
        super().__init__(cores, lay, trainable=trainable)
        self.out_features, self.in_features = lay.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = tt_matmul(x, self.effective_cores(), self.layout)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        ranks = [int(c.shape[3]) for c in self.cores[:-1]]
        return f"in_features={self.in_features}, out_features={self.out_features}, tt_ranks={ranks}"


class TTEmbedding(_TTModule):
    """An embedding whose ``[num_embeddings, embedding_dim]`` table is held as TT-matrix cores; a
    lookup contracts the cores at the row's digits (:func:`tt_rows`)."""

    def __init__(
        self, cores: Sequence[torch.Tensor], lay: TTLayout, *, padding_idx: int | None = None, trainable: bool = False
    ) -> None:
        super().__init__(cores, lay, trainable=trainable)
        self.num_embeddings, self.embedding_dim = lay.shape
        self.padding_idx = padding_idx

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return tt_rows(index, self.effective_cores(), self.layout)

    def extra_repr(self) -> str:
        ranks = [int(c.shape[3]) for c in self.cores[:-1]]
        return f"{self.num_embeddings}, {self.embedding_dim}, tt_ranks={ranks}"


def tt_module_for(
    module: nn.Module, kind: Literal["linear", "conv1d", "embedding"], cores: Sequence[torch.Tensor], lay: TTLayout,
    *, trainable: bool = False,
) -> nn.Module:
    """The TT module standing in for ``module`` (its bias, padding index and device kept)."""
    if kind == "embedding":
        return TTEmbedding(cores, lay, padding_idx=getattr(module, "padding_idx", None), trainable=trainable)
    bias = getattr(module, "bias", None)
    return TTLinear(cores, lay, bias if isinstance(bias, torch.Tensor) else None, trainable=trainable)


def n_core_params(cores: Sequence[torch.Tensor]) -> int:
    return sum(math.prod(c.shape) for c in cores)
