"""Packed modules: a quantized model that keeps its integer codes in memory and dequantizes them on
every forward pass, what ``bitscout.apply`` puts in a model by default.

What a packed module holds
==========================

A :class:`PackedWeight` stands for one weight matrix (a parameter of the model) as the member slices
of the space that cover it, each stored as the native artifact stores it (:mod:`search.export.artifact`):

==============  ===================================================================================
member option   buffers of the member (``m<i>_...``)
==============  ===================================================================================
2..8 bits       ``codes``: uint8, the member's integer codes packed at their width
                (:func:`search.quant.pack`, row-major over the member slice in the ``[out, in]``
                layout, two's complement when symmetric); ``scale``: float16 ``[rows]`` per row or
                ``[rows, cols / N]`` with group-wise scales of ``N`` columns (float32 only for a scale
                that is not a float16 value, which the search's quantizer never produces);
                ``zero_point``: uint8 of the scales' shape, asymmetric grids only
16              ``weight``: the slice in float16
32              ``weight``: the slice in the model's dtype
0 (pruned)      nothing: the slice is zeros (and the bias rows that follow it were zeroed)
==============  ===================================================================================

Members of one matrix may take different options (heads and FFN blocks at ``group`` granularity):
each keeps its own slice. :meth:`PackedWeight.materialize` rebuilds the matrix, in the parameter's
own layout (GPT-2's ``Conv1D`` keeps ``[in, out]``), as ``dequantize(unpack(codes), scale,
zero_point)`` per integer member, the very functions :func:`search.quant.fake_quantize` ends with, so
it equals, bit for bit, the weight :meth:`ModelAdapter.quantized` writes, and a forward pass through
the packed model is bit-identical to the search's fake-quantized model. The matrix is built at the
original weight's address offset from a 64-byte boundary (:func:`address_offset`): CPU BLAS kernels
round a one-row product (token-by-token decoding, a classifier on one pooled row) differently on
differently aligned weights, and a checkpoint mapped by ``from_pretrained`` places weights off the
64-byte boundaries torch allocates on.

The modules in the model
========================

The weight's holders are replaced by :class:`PackedLinear`, :class:`PackedConv1D` or
:class:`PackedEmbedding`, whose ``forward`` is the original module's with the materialized matrix
(``F.linear``, ``torch.addmm``, ``F.embedding``; a packed table whose rows start on a byte dequantizes
only the rows looked up, the same values), and whose ``weight`` attribute materializes it on
read (for code that reads ``.weight``; it is a new tensor every time, never a parameter). Every module
holding the same weight (tied input and output embeddings) gets a holder of the one
:class:`PackedWeight`, so tied weights stay tied and are stored once. Biases stay parameters (pruned
rows zeroed). Forward hooks registered on the original module move to its replacement.

A module is packed when it is a plain ``nn.Linear``, ``nn.Embedding`` (without ``max_norm``) or
transformers' ``Conv1D`` (its class's own forward, not patched on the instance), every holder of its
weight is too, and the space's members cover its whole matrix; otherwise its members are written in
float as :meth:`ModelAdapter.apply` does (:func:`apply_packed` says which). Tensor-train groups keep
their TT modules.

A model loaded by ``from_pretrained`` holds its weights in a private memory mapping of the checkpoint
file: the float matrices packed away stay resident in it as long as any other tensor of the model lives
there, so the tensors the model keeps in float (embeddings, norms, biases) are then copied into memory
(:func:`release_mapping`) and the mapping goes.

Memory and time: a packed matrix takes the bytes :func:`search.cost.weight_bytes` counts; a forward
pass dequantizes each matrix into a temporary of its float size, one matrix at a time (figures in
``docs/methods/export.md``). Casting the model (``.half()``, ``.to(torch.bfloat16)``) changes the dtype
the matrix is handed out in; the stored codes, scales and float slices keep theirs. Packed modules
hold no trainable weight: fine-tune or save with ``transformers`` a materialized model
(``bitscout.apply(..., materialize=True)``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from search import quant
from search.adapter import ModelAdapter, _is_conv1d
from search.errors import InvalidInputError
from search.export.common import _fully_covered, _member_view, _members_by_module
from search.space import FULL_PRECISION, BitOption, Member, PrecisionMap, SearchSpace

log = logging.getLogger(__name__)

__all__ = [
    "PackedConv1D",
    "PackedEmbedding",
    "PackedLinear",
    "PackedWeight",
    "address_offset",
    "apply_packed",
    "empty_at",
    "holder_kind",
    "holders_of",
    "install",
    "maps_a_file",
    "model_bytes",
    "new_packed_weight",
    "packable",
    "packed_bytes",
    "refuse_packed",
    "release_mapping",
    "store_codes",
]

HolderKind = Literal["linear", "conv1d", "embedding"]


#: Bytes every allocation of torch's CPU allocator is aligned to.
_ALIGNMENT = 64


def address_offset(t: torch.Tensor) -> int:
    """Elements between ``t``'s data and the last 64-byte boundary before it. CPU BLAS kernels take
    alignment-dependent paths (a one-row product, as in token-by-token decoding, rounds differently
    on a weight 8 bytes off a cache line), so a tensor that stands in for ``t`` sits at the same offset."""
    size = t.element_size()
    at = t.data_ptr() % _ALIGNMENT
    return at // size if at % size == 0 else 0


def empty_at(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, offset: int) -> torch.Tensor:
    """A new contiguous tensor ``offset`` elements past a 64-byte boundary (see :func:`address_offset`)."""
    if offset == 0 or device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    n = 1
    for d in shape:
        n *= int(d)
    return torch.empty(n + offset, dtype=dtype, device=device)[offset:].view(shape)


def store_codes(codes: torch.Tensor, qp: quant.QParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What an integer member is stored as, on the CPU: its codes packed at ``qp.bits``, its scales
    as float16 (float32 when a scale is not a float16 value) and, for an asymmetric grid, its zero
    points as uint8 (None when symmetric). The one rule for the artifact and the packed modules."""
    packed = quant.pack(codes, qp.bits).cpu()
    scale = qp.scale.detach().cpu()
    half = scale.to(torch.float16)
    stored_scale = half if torch.equal(half.to(torch.float32), scale) else scale.clone()
    zero_point = None if qp.symmetric else qp.zero_point.to(torch.uint8).cpu()
    return packed, stored_scale, zero_point


@dataclass(frozen=True)
class _Segment:
    """One member slice of a packed weight: where it lies in the ``[out, in]`` view and how it is held."""

    axis: str
    start: int
    stop: int | None
    rows: int
    cols: int
    kind: Literal["int", "float", "zero"]
    bits: int = 32
    symmetric: bool = True
    group_size: int | None = None


class PackedWeight(nn.Module):
    """One weight matrix held as packed member slices (layout in the module docstring).

    ``shape`` is the parameter's shape, ``transposed`` whether its ``[out, in]`` view is its transpose
    (GPT-2's ``Conv1D``), ``dtype`` the dtype the members are dequantized in (the model's, as the
    search computed them). Members are added with :meth:`add_integer`, :meth:`add_float` and
    :meth:`add_zero`; :meth:`materialize` rebuilds the matrix.
    """

    def __init__(self, shape: tuple[int, int], *, transposed: bool, dtype: torch.dtype, device: torch.device,
                 offset: int = 0) -> None:
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        self.transposed = bool(transposed)
        self.source_dtype = dtype
        #: where the matrix is built past a 64-byte boundary: the original weight's offset
        self.offset = int(offset)
        self.segments: list[_Segment] = []
        # a zero-size buffer that follows the model's casts: the dtype the matrix is handed out in
        self.register_buffer("_dtype", torch.empty(0, dtype=dtype, device=device), persistent=False)

    # ----------------------------------------------------------------------------- building
    def _oi(self) -> tuple[int, int]:
        return (self.shape[1], self.shape[0]) if self.transposed else self.shape

    def _add(self, m: Member, kind: Literal["int", "float", "zero"], opt: BitOption | None,
             tensors: Mapping[str, torch.Tensor]) -> None:
        if tuple(m.shape) != self._oi():
            raise InvalidInputError(f"member of {m.module} has shape {m.shape}, the matrix {self._oi()}", field="space")
        i = len(self.segments)
        device = self._dtype.device
        for what, t in tensors.items():
            self.register_buffer(f"m{i}_{what}", t.detach().to(device))
        self.segments.append(
            _Segment(
                m.axis, m.start, m.stop, m.out_channels, m.in_features, kind,
                bits=opt.bits if opt is not None else 32,
                symmetric=opt.symmetric if opt is not None else True,
                group_size=opt.group_size if opt is not None else None,
            )
        )

    def add_integer(self, m: Member, opt: BitOption, codes: torch.Tensor, scale: torch.Tensor,
                    zero_point: torch.Tensor | None) -> None:
        """Member ``m`` at the integer ``opt``: packed ``codes``, ``scale`` and (asymmetric) ``zero_point``
        as :func:`store_codes` gives them."""
        tensors = {"codes": codes, "scale": scale}
        if not opt.symmetric:
            if zero_point is None:
                raise InvalidInputError(f"an asymmetric member of {m.module} needs its zero points", field="zero_point")
            tensors["zero_point"] = zero_point
        self._add(m, "int", opt, tensors)

    def add_float(self, m: Member, weight: torch.Tensor) -> None:
        """Member ``m`` kept as the float slice ``weight`` (float16 for a 16-bit option)."""
        self._add(m, "float", None, {"weight": weight.contiguous()})

    def add_zero(self, m: Member) -> None:
        """Member ``m`` pruned: zeros."""
        self._add(m, "zero", None, {})

    # ----------------------------------------------------------------------------- reading
    def _buffer(self, i: int, what: str) -> torch.Tensor:
        return self._buffers[f"m{i}_{what}"]  # type: ignore[return-value]

    def _value(self, i: int) -> torch.Tensor:
        """Member ``i`` as the fake-quantized model holds it, ``[rows, cols]`` in the source dtype."""
        s = self.segments[i]
        if s.kind == "float":
            return self._buffer(i, "weight").to(self.source_dtype)
        if s.kind == "zero":
            return torch.zeros(s.rows, s.cols, dtype=self.source_dtype, device=self._dtype.device)
        codes = quant.unpack(self._buffer(i, "codes"), s.bits, s.rows * s.cols, signed=s.symmetric).view(s.rows, s.cols)
        scale = self._buffer(i, "scale").to(torch.float32)
        if s.symmetric:
            zero_point = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
        else:
            zero_point = self._buffer(i, "zero_point").to(torch.int32)
        qp = quant.QParams(scale, zero_point, s.bits, s.symmetric, s.group_size)
        return quant.dequantize(codes, qp, dtype=self.source_dtype)

    def materialize(self) -> torch.Tensor:
        """The matrix in the parameter's layout and the model's current dtype: a new tensor, equal to
        the weight of the search's fake-quantized model."""
        one = self.segments[0] if len(self.segments) == 1 else None
        if one is not None and one.axis == "all" and not self.transposed and one.kind == "int" and not self.offset:
            w = self._value(0)
        else:
            w = empty_at(self.shape, self.source_dtype, self._dtype.device, self.offset)
            view = w.t() if self.transposed else w
            for i, s in enumerate(self.segments):
                target = _member_view(view, Member("", self._oi(), s.axis, s.start, s.stop))  # type: ignore[arg-type]
                if s.kind == "zero":
                    target.zero_()
                else:
                    target.copy_(self._value(i))
        if w.dtype == self._dtype.dtype:
            return w
        return empty_at(self.shape, self._dtype.dtype, w.device, self.offset).copy_(w)

    def can_gather(self) -> bool:
        """Whether :meth:`rows` can read single rows: one whole-matrix member, not transposed, each row's
        codes starting on a byte."""
        s = self.segments[0] if len(self.segments) == 1 else None
        return (
            s is not None and s.axis == "all" and not self.transposed
            and (s.kind != "int" or (s.cols * s.bits) % 8 == 0)
        )

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """``materialize()[index]`` for a flat index of rows (an embedding lookup), dequantizing those rows
        only (see :meth:`can_gather`): the same values, element by element."""
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.shape[0]):
            raise IndexError("index out of range in self")
        s = self.segments[0]
        if s.kind == "zero":
            w = torch.zeros(index.numel(), s.cols, dtype=self.source_dtype, device=self._dtype.device)
        elif s.kind == "float":
            w = self._buffer(0, "weight")[index].to(self.source_dtype)
        else:
            packed = self._buffer(0, "codes")[: s.rows * s.cols * s.bits // 8].view(s.rows, -1)[index].reshape(-1)
            codes = quant.unpack(packed, s.bits, index.numel() * s.cols, signed=s.symmetric).view(-1, s.cols)
            scale = self._buffer(0, "scale")[index].to(torch.float32)
            if s.symmetric:
                zero_point = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
            else:
                zero_point = self._buffer(0, "zero_point")[index].to(torch.int32)
            qp = quant.QParams(scale, zero_point, s.bits, s.symmetric, s.group_size)
            w = quant.dequantize(codes, qp, dtype=self.source_dtype)
        return w if w.dtype == self._dtype.dtype else w.to(self._dtype.dtype)

    def stored_bytes(self) -> int:
        """Bytes of the stored codes, scales, zero points and float slices."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values() if b is not None)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> PackedWeight:
        # a cast moves the stored tensors but keeps their dtypes (float16 scales stay float16); the
        # zero-size dtype buffer takes the cast, and with it the dtype materialize hands out
        kept = {k: v for k, v in self._buffers.items() if v is not None and k != "_dtype"}
        super()._apply(fn, recurse)
        for k, old in kept.items():
            new = self._buffers[k]
            if new is not None and new.dtype != old.dtype:
                self._buffers[k] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        kinds = sorted({(s.kind, s.bits, s.symmetric, s.group_size) for s in self.segments})
        opts = ", ".join("0" if k == "zero" else str(BitOption(b, sym, g).key()) if k == "int" else "float"
                         for k, b, sym, g in kinds)
        return f"shape={list(self.shape)}, members={len(self.segments)}, options=[{opts}]"


class _Holder(nn.Module):
    """A module that runs the original module's forward on a :class:`PackedWeight`."""

    def __init__(self, packed: PackedWeight) -> None:
        super().__init__()
        self.packed = packed

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized matrix in the original parameter's layout, rebuilt on every read."""
        return self.packed.materialize()


class PackedLinear(_Holder):
    """``nn.Linear`` over a packed weight: ``F.linear(x, W, bias)``."""

    def __init__(self, packed: PackedWeight, bias: nn.Parameter | None) -> None:
        super().__init__(packed)
        self.out_features, self.in_features = packed.shape
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.packed.materialize(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedConv1D(_Holder):
    """transformers' ``Conv1D`` (GPT-2) over a packed weight, stored ``[in, out]`` as the original:
    ``addmm(bias, x, W)``."""

    def __init__(self, packed: PackedWeight, bias: nn.Parameter | None) -> None:
        super().__init__(packed)
        self.nx, self.nf = packed.shape
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.packed.materialize())
        return x.view(size_out)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"


class PackedEmbedding(_Holder):
    """``nn.Embedding`` over a packed table: ``F.embedding(ids, W, padding_idx, ...)``."""

    def __init__(self, packed: PackedWeight, original: nn.Embedding) -> None:
        super().__init__(packed)
        self.num_embeddings, self.embedding_dim = packed.shape
        self.padding_idx = original.padding_idx
        self.norm_type = original.norm_type
        self.scale_grad_by_freq = original.scale_grad_by_freq
        self.sparse = original.sparse

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.packed.can_gather():  # the rows looked up, dequantized alone: the same values
            return self.packed.rows(ids.reshape(-1)).view(*ids.shape, self.embedding_dim)
        return F.embedding(
            ids, self.packed.materialize(), self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, self.sparse
        )

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}" + (
            f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        )


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def holder_kind(module: nn.Module) -> HolderKind | None:
    """Which packed module can stand for ``module`` (None: none can, its weights stay float): a plain
    ``nn.Linear``, ``nn.Embedding`` without ``max_norm`` or transformers' ``Conv1D``, running its
    class's own forward."""
    if "forward" in module.__dict__:  # a forward patched on the instance (e.g. an offloading hook)
        return None
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "linear"
    if isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward and module.max_norm is None:
        return "embedding"
    if _is_conv1d(module):
        from transformers.pytorch_utils import Conv1D

        if isinstance(module, Conv1D) and type(module).forward is Conv1D.forward:
            return "conv1d"
    return None


def holders_of(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """Every module holding each weight parameter (a tied weight has several), by the parameter's id."""
    out: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        w = module._parameters.get("weight")
        if w is not None:
            out.setdefault(id(w), []).append((name, module))
    return out


def _make_holder(kind: HolderKind, packed: PackedWeight, original: nn.Module) -> nn.Module:
    bias = getattr(original, "bias", None)
    if kind == "linear":
        return PackedLinear(packed, bias)
    if kind == "conv1d":
        return PackedConv1D(packed, bias)
    return PackedEmbedding(packed, original)  # type: ignore[arg-type]


def install(model: nn.Module, packed: PackedWeight, holders: Iterable[tuple[str, nn.Module]]) -> None:
    """Put a holder of ``packed`` wherever one of ``holders`` is (one new module per original module
    object), with the original's forward hooks and training flag."""
    made: dict[int, nn.Module] = {}
    for name, original in holders:
        new = made.get(id(original))
        if new is None:
            new = _make_holder(holder_kind(original), packed, original)  # type: ignore[arg-type]
            for attr in _HOOK_DICTS:
                hooks = getattr(original, attr, None)
                if hooks:
                    setattr(new, attr, hooks)
            new.train(original.training)
            made[id(original)] = new
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)


def packable(model_holders: Mapping[int, list[tuple[str, nn.Module]]], module: nn.Module,
              members: list[Member]) -> list[tuple[str, nn.Module]] | None:
    """The holders to replace when ``module``'s weight can be packed, else None."""
    w = module._parameters.get("weight")
    if w is None or w.ndim != 2 or w.device.type == "meta":
        return None
    holders = model_holders.get(id(w), [])
    if not holders or any(holder_kind(m) is None for _, m in holders):
        return None
    oi = (int(w.shape[1]), int(w.shape[0])) if _is_conv1d(module) else (int(w.shape[0]), int(w.shape[1]))
    if not _fully_covered(oi, members):
        return None
    return holders


def new_packed_weight(module: nn.Module, dtype: torch.dtype | None = None) -> PackedWeight:
    """An empty :class:`PackedWeight` for ``module``'s weight (``dtype``: the members' dtype, by default the
    weight's)."""
    w = module._parameters["weight"]
    assert w is not None  # noqa: S101 - checked by packable
    return PackedWeight(tuple(w.shape), transposed=_is_conv1d(module), dtype=dtype or w.dtype, device=w.device,  # type: ignore[arg-type]
                        offset=address_offset(w))


@torch.no_grad()
def apply_packed(adapter: ModelAdapter, space: SearchSpace, pmap: PrecisionMap, *, clip: str = "mse") -> list[str]:
    """The model of ``adapter`` under ``pmap`` as :meth:`ModelAdapter.apply` makes it, with packed
    modules (module docstring) in place of every matrix the map quantizes and that can hold them.
    Returns the names of the matrices written in float instead (the caller may log them)."""
    unknown = [k for k in pmap if k not in space._index]
    if unknown:
        raise InvalidInputError(f"precision map names unknown groups: {unknown[:3]}", field="precision_map")
    model = adapter.model
    holders = holders_of(model)
    in_float: list[str] = []
    mapped = False
    for name, members in _members_by_module(space).items():
        opts = [pmap.get(g.name, FULL_PRECISION) for g, _, _ in members]
        if all(o.unchanged for o in opts):
            continue
        if any(o.is_tt for o in opts):  # a tensor-train group is its whole matrix
            g = members[0][0]
            adapter.swap_module(name, adapter.tt_module(g, opts[0], clip))
            continue
        module = adapter.module(name)
        hold = packable(holders, module, [m for _, _, m in members])
        if hold is None:
            in_float.append(name)
            for (_, _, m), opt in zip(members, opts, strict=True):
                if not opt.unchanged:
                    adapter.write_member(m, opt, clip)
            continue
        packed = new_packed_weight(module)
        for (_, _, m), opt in zip(members, opts, strict=True):
            block = adapter.member_slice(m).detach()
            if opt.is_integer:
                qp = quant.choose_qparams(
                    block, opt.bits, symmetric=opt.symmetric, clip=clip, group_size=opt.group_size  # type: ignore[arg-type]
                )
                packed.add_integer(m, opt, *store_codes(quant.quantize(block, qp), qp))
            elif opt.pruned:
                packed.add_zero(m)
                adapter.prune_bias(m)
            elif opt.bits == 16:
                packed.add_float(m, block.half())
            else:
                packed.add_float(m, block.clone())
        mapped = mapped or maps_a_file(module)
        install(model, packed, hold)  # the float weight goes with the original module
    if mapped:
        release_mapping(model)
    if in_float:
        log.info("written in float (no packed module fits them): %s", in_float)
    return in_float


def maps_a_file(module: nn.Module) -> bool:
    """Whether ``module``'s weight lives in a memory-mapped file (``from_pretrained`` maps safetensors
    checkpoints): a storage torch did not allocate (not resizable)."""
    w = module._parameters.get("weight")
    return w is not None and w.device.type == "cpu" and not w.untyped_storage().resizable()


def release_mapping(model: nn.Module) -> int:
    """Copy into memory every parameter and buffer of ``model`` that lives in a memory-mapped file, so
    that the mapping (which also holds the float matrices just packed away, resident once read) is
    released when nothing else holds it. Returns the bytes copied (the float tensors the model keeps)."""
    copied = 0
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type == "cpu" and not t.untyped_storage().resizable():
            if t.is_contiguous():  # at the same offset from a cache line: the same kernels, the same bits
                t.data = empty_at(tuple(t.shape), t.dtype, t.device, address_offset(t)).copy_(t.data)
            else:
                t.data = t.data.clone()
            copied += t.numel() * t.element_size()
    return copied


def refuse_packed(model: nn.Module) -> None:
    """Refuse a model that already holds packed modules: a map applies to the original weights."""
    if any(isinstance(m, PackedWeight) for m in model.modules()):
        raise InvalidInputError(
            "the model already holds packed modules (a map or an artifact was applied to it): apply to the "
            "original model",
            field="model",
        )


def packed_bytes(model: nn.Module) -> int:
    """Bytes of every packed weight in ``model`` (each once)."""
    seen: dict[int, PackedWeight] = {}
    for m in model.modules():
        if isinstance(m, PackedWeight):
            seen[id(m)] = m
    return sum(p.stored_bytes() for p in seen.values())


def model_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers, each tensor once (tied ones too)."""
    seen: dict[int, torch.Tensor] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen.setdefault(id(t), t)
    return sum(t.numel() * t.element_size() for t in seen.values())

