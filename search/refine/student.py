"""The student: a copy of the teacher whose member slices are parametrized as the map says (LSQ fake
quantization for integer options, float16 rounding, exact zeros for pruned slices), and its return to
plain quantized weights (see :mod:`search.refine`)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from search import quant
from search import tensor_train as tt
from search.adapter import ModelAdapter, _is_conv1d
from search.errors import InvalidInputError
from search.refine.config import RefineConfig
from search.space import FULL_PRECISION, Group, Member, PrecisionMap, SearchSpace
from search.ste import half_ste, lsq_fake_quantize, lsq_grad_scale

__all__ = ["member_key"]


def _exact_fake_quantize(
    w: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool, group_size: int | None
) -> torch.Tensor:
    qp = _qparams(step, zero_point, bits, symmetric, group_size, dtype=w.dtype)
    return quant.dequantize(quant.quantize(w, qp), qp, dtype=w.dtype)


def _qparams(
    step: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool, group_size: int | None = None,
    *, dtype: torch.dtype | None = None,
) -> quant.QParams:
    """The exact quantizer of learned step sizes: ``[rows]`` per row, ``[rows, cols / group_size]`` per group,
    the scales rounded as those of a weight of ``dtype`` (:func:`search.quant.round_scale`)."""
    scale = quant.round_scale(step.detach().to(torch.float32), dtype)
    return quant.QParams(scale=scale, zero_point=zero_point.detach().to(torch.int32), bits=bits, symmetric=symmetric,
                         group_size=group_size)


def member_key(group: str, index: int) -> str:
    """The key of member ``index`` of ``group`` in :attr:`RefineResult.qparams` (``group::index``, the
    naming of :mod:`search.export`)."""
    return f"{group}::{index}"


@dataclass
class _Slot:
    """One member slice of a module: what it becomes in the student's forward pass."""

    key: str
    member: Member
    kind: Literal["int", "half", "float", "pruned", "frozen"]
    bits: int = 32
    symmetric: bool = True
    group_size: int | None = None
    step_index: int = -1
    grad_scale: float = 1.0


def _view(w: torch.Tensor, m: Member) -> tuple[slice, slice]:
    if m.axis == "out":
        return slice(m.start, m.stop), slice(None)
    if m.axis == "in":
        return slice(None), slice(m.start, m.stop)
    return slice(None), slice(None)


class _QuantWeight(nn.Module):
    """Parametrization of a module's weight: the latent weight with each member slice replaced as its
    option says (LSQ, float16, zeros, frozen). With gradients off it computes the exact quantizer of
    :mod:`search.quant` (what an artifact stores)."""

    def __init__(self, slots: list[_Slot], steps: list[torch.Tensor], zero_points: list[torch.Tensor], conv: bool,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.slots = slots
        self.conv = conv
        self.dtype = dtype  # the weight's: its scales are rounded as quant.round_scale rounds them
        self.steps = nn.ParameterList([nn.Parameter(s) for s in steps])
        for i, z in enumerate(zero_points):
            self.register_buffer(f"zp{i}", z, persistent=False)

    def zero_point(self, i: int) -> torch.Tensor:
        return cast(torch.Tensor, getattr(self, f"zp{i}"))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        wv = weight.t() if self.conv else weight
        out = wv.clone()
        exact = not torch.is_grad_enabled()
        for sl in self.slots:
            idx = _view(wv, sl.member)
            block = wv[idx]
            if sl.kind == "pruned":
                out[idx] = torch.zeros_like(block)
            elif sl.kind == "frozen":
                out[idx] = block.detach()
            elif sl.kind == "half":
                out[idx] = block.to(torch.float16).to(block.dtype) if exact else half_ste(block)
            elif sl.kind == "int":
                step = self.steps[sl.step_index]
                z = self.zero_point(sl.step_index)
                if exact:
                    out[idx] = _exact_fake_quantize(block, step, z, sl.bits, sl.symmetric, sl.group_size)
                else:
                    qmin, qmax = quant.code_range(sl.bits, sl.symmetric)
                    fq = lsq_fake_quantize(block.to(torch.float32), step, z, qmin, qmax, sl.grad_scale,
                                           scale_dtype=block.dtype)
                    out[idx] = fq.to(block.dtype)
        return out.t() if self.conv else out


class _TTQuant(nn.Module):
    """The core transform of a trained TT module (TT-QAT): every core, as the ``[r_{k-1} * m_k, n_k *
    r_k]`` matrix it is quantized as, fake-quantized with LSQ and a learned step size per row
    (integer bits), rounded through float16 straight-through (16) or kept (32); with gradients off, the
    exact quantizer of :mod:`search.quant` (what an artifact stores)."""

    def __init__(self, bits: int, symmetric: bool, steps: list[torch.Tensor], zero_points: list[torch.Tensor],
                 grad_scales: list[float], dtype: torch.dtype) -> None:
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        self.dtype = dtype  # the cores': their scales are rounded as quant.round_scale rounds them
        self.steps = nn.ParameterList([nn.Parameter(s) for s in steps])
        self.grad_scales = grad_scales
        for i, z in enumerate(zero_points):
            self.register_buffer(f"zp{i}", z, persistent=False)

    def zero_point(self, i: int) -> torch.Tensor:
        return cast(torch.Tensor, getattr(self, f"zp{i}"))

    def forward(self, cores: list[torch.Tensor]) -> list[torch.Tensor]:
        exact = not torch.is_grad_enabled()
        out = []
        for k, c in enumerate(cores):
            if self.bits == 32:
                out.append(c)
            elif self.bits == 16:
                out.append(c.to(torch.float16).to(c.dtype) if exact else half_ste(c))
            else:
                mat = tt.core_matrix(c)
                step, z = self.steps[k], self.zero_point(k)
                if exact:
                    fq = _exact_fake_quantize(mat, step, z, self.bits, self.symmetric, None)
                else:
                    qmin, qmax = quant.code_range(self.bits, self.symmetric)
                    fq = lsq_fake_quantize(mat.to(torch.float32), step, z, qmin, qmax, self.grad_scales[k],
                                           scale_dtype=c.dtype).to(c.dtype)
                out.append(fq.reshape(c.shape))
        return out

    def qparams(self) -> tuple[quant.QParams, ...] | None:
        if self.bits >= 16:
            return None
        return tuple(
            _qparams(s, self.zero_point(k), self.bits, self.symmetric, dtype=self.dtype) for k, s in enumerate(self.steps)
        )


class _Mask(nn.Module):
    """Parametrization of a bias: entries of pruned output channels are exactly zero."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask: torch.Tensor
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, bias, torch.zeros_like(bias))


class _ActLSQ:
    """A forward pre-hook quantizing a matrix's input with a learned static step (LSQ on the
    activation scale, as KDLSQ-BERT): ``step`` is the module's parameter ``act_step``, initialised
    on the first batch it sees to LSQ's ``2 * mean|x| / sqrt(qmax)``; 16 bits round through float16."""

    def __init__(self, bits: int) -> None:
        self.bits = bits

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        from search.actquant import quantize_with_step

        x = args[0]
        step = module.act_step
        if self.bits < 16 and float(step.detach()) <= 0:
            q = 2 ** (self.bits - 1) - 1
            with torch.no_grad():
                step.copy_((2 * x.detach().abs().mean() / q**0.5).clamp_min(2.0**-24).reshape(step.shape))
        return (quantize_with_step(x, self.bits, step), *args[1:])


@dataclass
class _Student:
    model: nn.Module
    modules: dict[str, nn.Module]
    #: member key -> (module name, parametrization, slot)
    int_slots: dict[str, tuple[str, _QuantWeight, _Slot]]
    pruned: list[str]
    masked_bias: list[str]
    other: list[nn.Parameter]
    #: module name -> learned activation step (whole-matrix groups with activation bits)
    act_steps: dict[str, nn.Parameter] | None = None
    #: group name -> the TT module standing for its matrix (TT-QAT)
    tt_modules: dict[str, tt.TTLinear | tt.TTEmbedding] = field(default_factory=dict)

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def step_params(self) -> set[int]:
        ids = {id(q.steps[s.step_index]) for _, q, s in self.int_slots.values()}
        ids |= {id(p) for p in (self.act_steps or {}).values()}
        for m in self.tt_modules.values():
            if isinstance(m.core_transform, _TTQuant):
                ids.update(id(p) for p in m.core_transform.steps)
        return ids

    def core_params(self) -> set[int]:
        return {id(p) for m in self.tt_modules.values() for p in m.cores}


def _check_pmap(pmap: PrecisionMap | Mapping[str, Any], space: SearchSpace) -> PrecisionMap:
    if not isinstance(pmap, PrecisionMap):
        pmap = PrecisionMap.from_dict(pmap)
    unknown = [k for k in pmap if k not in space._index]
    if unknown:
        raise InvalidInputError(f"precision map names unknown groups: {unknown[:3]}", field="precision_map")
    for g, opts in zip(space.groups, space.options, strict=True):
        opt = pmap.get(g.name, FULL_PRECISION)
        if opt not in opts and opt != FULL_PRECISION:
            raise InvalidInputError(f"option {opt.key()} is not allowed for group {g.name}", field="precision_map")
    return pmap


def _build_student(
    teacher: nn.Module, space: SearchSpace, pmap: PrecisionMap, clip: str, config: RefineConfig
) -> _Student:
    model = copy.deepcopy(teacher)
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(config.train_other)
    per_module: dict[str, list[tuple[Group, int, Member]]] = {}
    for g in space.groups:
        for i, m in enumerate(g.members):
            per_module.setdefault(m.module, []).append((g, i, m))
    owners: dict[int, list[str]] = {}
    for mname, mod in modules.items():
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter):
            owners.setdefault(id(w), []).append(mname)
    for name in per_module:
        w = getattr(modules.get(name), "weight", None)
        tied = [o for o in owners.get(id(w), []) if o != name]
        if tied:
            raise InvalidInputError(
                f"{name} shares its weight with {tied[0]} (tied weights): refinement cannot train a tied matrix "
                "under one quantizer only; leave it out of the space",
                field="include_embeddings",
            )
    int_slots: dict[str, tuple[str, _QuantWeight, _Slot]] = {}
    pruned: list[str] = []
    masked_bias: list[str] = []
    tt_modules = _tt_students(model, space, pmap, clip)
    for name, members in per_module.items():
        if any(pmap.get(g.name, FULL_PRECISION).is_tt for g, _, _ in members):
            continue
        module = modules.get(name)
        weight = getattr(module, "weight", None) if module is not None else None
        if module is None or not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise InvalidInputError(f"the model has no weight matrix named {name!r}", field="space")
        conv = _is_conv1d(module)
        wv = weight.detach().t() if conv else weight.detach()
        slots: list[_Slot] = []
        steps: list[torch.Tensor] = []
        zps: list[torch.Tensor] = []
        bias = getattr(module, "bias", None)
        bias_mask = torch.ones(wv.shape[0], dtype=torch.bool, device=wv.device) if isinstance(bias, torch.Tensor) else None
        for g, i, m in members:
            opt = pmap.get(g.name, FULL_PRECISION)
            key = member_key(g.name, i)
            if opt.pruned:
                slots.append(_Slot(key, m, "pruned"))
                pruned.append(key)
                if bias_mask is not None and m.axis in ("out", "all"):
                    bias_mask[m.start : m.stop] = False
            elif opt.is_integer:
                block = wv[_view(wv, m)]
                qp = quant.choose_qparams(
                    block, opt.bits, symmetric=opt.symmetric, clip=clip, group_size=opt.group_size  # type: ignore[arg-type]
                )
                per_scale = block.shape[1] if opt.group_size is None else opt.group_size
                slot = _Slot(
                    key, m, "int", opt.bits, opt.symmetric, opt.group_size, len(steps), lsq_grad_scale(per_scale, qp.qmax)
                )
                steps.append(qp.scale.detach().clone().to(wv.device))
                zps.append(qp.zero_point.detach().clone().to(wv.device))
                slots.append(slot)
            elif config.float_groups == "freeze":
                slots.append(_Slot(key, m, "frozen", opt.bits))
            elif opt.bits == 16:
                slots.append(_Slot(key, m, "half", 16))
            else:
                slots.append(_Slot(key, m, "float", 32))
        qw = _QuantWeight(slots, steps, zps, conv, wv.dtype)
        weight.requires_grad_(True)
        parametrize.register_parametrization(module, "weight", qw, unsafe=True)
        for s in slots:
            if s.kind == "int":
                int_slots[s.key] = (name, qw, s)
        if bias_mask is not None and not bool(bias_mask.all()):
            parametrize.register_parametrization(module, "bias", _Mask(bias_mask), unsafe=True)
            masked_bias.append(name)
    act_steps = _activation_quantizers(model, modules, space, pmap)
    other = [
        p for n, p in model.named_parameters()
        if p.requires_grad and ".parametrizations." not in f".{n}" and not n.endswith("act_step")
    ]
    return _Student(model, modules, int_slots, pruned, masked_bias, other, act_steps, tt_modules)


def _activation_quantizers(
    model: nn.Module, modules: dict[str, nn.Module], space: SearchSpace, pmap: PrecisionMap
) -> dict[str, nn.Parameter]:
    """Activation quantization of the student: a learned step (:class:`_ActLSQ`) on the input of
    every whole-matrix group with activation bits; groups that are slices of a matrix (``group``
    granularity) keep the search's per-token scales (:mod:`search.actquant`), not learned."""
    from search.actquant import quantize_activations_of

    steps: dict[str, nn.Parameter] = {}
    sliced: dict[str, Any] = {}
    for g in space.groups:
        opt = pmap.get(g.name, FULL_PRECISION)
        if opt.act_bits is None or opt.pruned:
            continue
        if len(g.members) == 1 and g.members[0].axis == "all":
            name = g.members[0].module
            module = modules[name]
            ref = next(module.parameters())
            step = nn.Parameter(torch.zeros(1, device=ref.device, dtype=torch.float32))
            module.register_parameter("act_step", step)
            module.register_forward_pre_hook(_ActLSQ(opt.act_bits))
            steps[name] = step
        else:
            sliced[g.name] = opt
    if sliced:
        quantize_activations_of(modules, space, PrecisionMap(sliced))
    return steps


def _tt_students(
    model: nn.Module, space: SearchSpace, pmap: PrecisionMap, clip: str
) -> dict[str, tt.TTLinear | tt.TTEmbedding]:
    """Every tensor-train group's matrix replaced by a TT module whose cores (the TT-SVD of the
    weights, unquantized: the latent cores) are trained through :class:`_TTQuant`, its step sizes
    initialised from :func:`search.tensor_train.core_qparams`: at step 0 the module is the search's."""
    groups = [g for g in space.groups if pmap.get(g.name, FULL_PRECISION).is_tt]
    if not groups:
        return {}
    adapter = ModelAdapter(model)
    out: dict[str, tt.TTLinear | tt.TTEmbedding] = {}
    for g in groups:
        opt = pmap[g.name]
        name = g.members[0].module
        w = adapter.weight(name).detach()
        lay = tt.layout(int(w.shape[0]), int(w.shape[1]))
        raw = tt.tt_svd(w, int(opt.tt_rank), lay)  # type: ignore[arg-type]
        steps: list[torch.Tensor] = []
        zps: list[torch.Tensor] = []
        scales: list[float] = []
        if opt.bits < 16:
            for c, qp in zip(raw, tt.core_qparams(raw, opt.bits, symmetric=opt.symmetric, clip=clip), strict=True):  # type: ignore[arg-type]
                steps.append(qp.scale.detach().clone())
                zps.append(qp.zero_point.detach().clone())
                scales.append(lsq_grad_scale(int(c.shape[2] * c.shape[3]), qp.qmax))
        module = adapter.tt_module(g, opt, clip, cores=raw)
        for p in module.parameters():
            p.requires_grad_(True)
        module.core_transform = _TTQuant(opt.bits, opt.symmetric, steps, zps, scales, raw[0].dtype).to(w.device)
        adapter.swap_module(name, module)
        out[g.name] = module  # type: ignore[assignment]
    return out


@torch.no_grad()
def _finalize(student: _Student) -> dict[str, tt.StoredCores]:
    """Replace every parametrization with the exact quantized weights it stands for, and every TT
    module's core transform with the exact quantized cores; returns those cores by group."""
    cores: dict[str, tt.StoredCores] = {}
    for gname, m in student.tt_modules.items():
        qt = cast(_TTQuant, m.core_transform)
        exact = m.effective_cores()
        qps = qt.qparams()
        cores[gname] = tt.StoredCores(qt.bits, qt.symmetric if qps is not None else True,
                                      tuple(c.detach().clone() for c in exact), qps)
        for p, c in zip(m.cores, exact, strict=True):
            p.copy_(c)
        m.core_transform = None
    for name, module in student.modules.items():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name in list(cast(nn.ModuleDict, module.parametrizations)):
            final = getattr(module, tensor_name).detach().clone()
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
            getattr(module, tensor_name).copy_(final)
        del name
    return cores

