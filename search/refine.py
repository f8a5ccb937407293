"""Refinement of a chosen precision map: knowledge distillation with learned step sizes (KDLSQ).

Post-training quantization (:mod:`search.quant`) loses accuracy quickly below 4 bits. :func:`refine`
recovers it for one precision map, as KDLSQ-BERT (Jin et al. 2021) does: a *student* copy of the
model is fine-tuned with LSQ fake quantization (Esser et al. 2020, "Learned Step Size Quantization")
while the unchanged full-precision model, the *teacher*, distils into it.

What is trained
===============

=======================  ===========================================================================
group option             what the student's member slice is during training
=======================  ===========================================================================
2..8 bits (integer)      ``lsq_fake_quantize(latent, step, zero_point)``: a learned step size per
                         row of the member slice (the ``[out, in]`` layout, as :mod:`search.quant`
                         quantizes it), initialised from :func:`search.quant.choose_qparams` (so step
                         0 *is* the post-training point), gradient scaled by
                         ``g = 1 / sqrt(n_weights_per_row * Q_p)``, rounding straight-through; the
                         zero point of an asymmetric option stays the post-training one
0 (pruned)               exactly zero: the slice (and the biases of its output channels) is masked in
                         the forward pass, so neither its value nor any gradient reaches it
16 bits                  trained through a float16 round (straight-through) unless
                         ``RefineConfig.float_groups == "freeze"``
32 bits                  trained as is unless ``float_groups == "freeze"``
not in the space         (norms, biases, embeddings and heads outside the space) trained at
                         ``lr_weights`` when ``train_other``; they stay in full precision, so the
                         costs of the map do not change
=======================  ===========================================================================

Step sizes are kept positive (clamped to ``[SCALE_EPS, SCALE_MAX]``) and rounded to float16 values in
the forward pass (straight-through), so the student trains on the very grid an artifact stores.

The loss
========

``kd_logits * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` on the task output (per real
token for causal LMs; ``1 - cosine`` of the pooled outputs for embedding models), ``+ kd_hidden *`` the
mean over matching layers of the hidden-state MSE (``output_hidden_states=True``, real tokens only),
``+ kd_attention *`` the mean over layers of the attention-map MSE (``output_attentions=True``, real
query/key pairs only; this needs eager attention: both models are switched to it for the run and
switched back, and when a model cannot be switched or returns no attention maps the term is skipped
and a note says so), ``+ task *`` the task's own loss (cross-entropy) when the batches have labels
(next-token cross-entropy for causal LMs).

Determinism and checkpoints
===========================

Everything random is a function of ``(seed, step)``: step ``k`` reads the micro-batches
``k * accumulate ... (k + 1) * accumulate - 1`` of an endless stream made of one seeded permutation
of the training batches per epoch, and seeds the dropout RNG from ``(seed, k)`` (inside
:func:`torch.random.fork_rng`, so the caller's RNG is untouched). A checkpoint (every
``checkpoint_every`` steps, into ``checkpoint_dir/step-NNNNNNNN/``) holds the trainable tensors, the
optimizer state, the RNG state and the best-so-far state (``tensors.safetensors``, never a pickle) and
everything else as JSON (``state.json``, written last: a folder without it is incomplete and
ignored). :func:`refine` with a ``checkpoint_dir`` resumes from the latest complete checkpoint there and
ends bit-identical to an uninterrupted run (same device, same thread count). A checkpoint of another
map, model or configuration is refused (``checkpoint_dir``).

Early stopping evaluates the student every ``eval_every`` steps on the validation batches (the
evaluation batches unless others are given), keeps the best state by the search metric (ties broken by
the KL to the teacher where known), and stops after ``patience`` evaluations without improvement.
Selecting on the batches the result is reported on favours the refined point slightly; pass separate
``validation_batches`` for an unbiased figure.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from search import quant
from search.adapter import _is_conv1d
from search.data import TokenizedBatch
from search.errors import CanceledError, InvalidInputError
from search.result import ParetoPoint
from search.space import FULL_PRECISION, Group, Member, PrecisionMap, SearchSpace
from search.tasks import (
    DEFAULT_METRIC,
    Reference,
    Task,
    check_task,
    evaluate,
    has_task_loss,
    higher_is_better,
    reference_outputs,
    scored_tokens,
    task_loss,
)

__all__ = [
    "CHECKPOINT_STATE",
    "CHECKPOINT_TENSORS",
    "RefineConfig",
    "RefineParts",
    "RefineResult",
    "lsq_fake_quantize",
    "lsq_grad_scale",
    "member_key",
    "refine",
]

ProgressFn = Callable[[str, float, str], None]
StopFn = Callable[[], bool]

CHECKPOINT_TENSORS = "tensors.safetensors"
CHECKPOINT_STATE = "state.json"
#: Version of the checkpoint layout.
CHECKPOINT_VERSION = 1
#: Complete checkpoints kept in a checkpoint folder (older ones are deleted).
CHECKPOINTS_KEPT = 2


# ------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class RefineConfig:
    """How to refine (see the module docstring).

    ``steps``: optimizer steps at most; ``accumulate``: micro-batches (training batches) per step;
    ``lr_weights`` / ``lr_scales``: AdamW learning rates of the weights and of the step sizes,
    ``schedule``: ``"constant"`` or ``"linear"`` decay to 0 at ``steps``; ``weight_decay`` of the
    weights; ``grad_clip``: max global gradient norm (None: no clipping); ``temperature`` of the output
    KL; loss weights ``kd_logits``, ``kd_hidden``, ``kd_attention``, ``task``; ``eval_every`` steps
    between evaluations; ``patience`` evaluations without improvement before stopping (None: never);
    ``checkpoint_every`` steps between checkpoints (used only with a ``checkpoint_dir``); ``seed``;
    ``dropout``: train with the model's dropout (False: the student runs in eval mode);
    ``float_groups``: ``"train"`` or ``"freeze"`` the 16/32-bit groups; ``train_other``: train the
    parameters outside the space (norms, biases, ...).
    """

    steps: int = 200
    lr_weights: float = 2e-5
    lr_scales: float = 1e-4
    schedule: Literal["constant", "linear"] = "linear"
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    temperature: float = 2.0
    kd_logits: float = 1.0
    kd_hidden: float = 1.0
    kd_attention: float = 1.0
    task: float = 1.0
    accumulate: int = 1
    eval_every: int = 25
    patience: int | None = 4
    checkpoint_every: int = 50
    seed: int = 0
    dropout: bool = True
    float_groups: Literal["train", "freeze"] = "train"
    train_other: bool = True

    def __post_init__(self) -> None:
        def positive_int(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {v!r}", field=name)

        def number(name: str, *, positive: bool, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise InvalidInputError(f"{name} must be a finite number, got {v!r}", field=name)
            if (positive and v <= 0) or v < 0:
                kind = "positive" if positive else "non-negative"
                raise InvalidInputError(f"{name} must be {kind}, got {v!r}", field=name)

        for name in ("steps", "accumulate", "eval_every", "checkpoint_every"):
            positive_int(name)
        positive_int("patience", allow_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidInputError(f"seed must be a non-negative integer, got {self.seed!r}", field="seed")
        for name in ("lr_weights", "lr_scales", "temperature"):
            number(name, positive=True)
        number("grad_clip", positive=True, allow_none=True)
        for name in ("weight_decay", "kd_logits", "kd_hidden", "kd_attention", "task"):
            number(name, positive=False)
        if self.kd_logits + self.kd_hidden + self.kd_attention + self.task <= 0:
            raise InvalidInputError("at least one loss weight must be positive", field="kd_logits")
        if self.schedule not in ("constant", "linear"):
            raise InvalidInputError(f"schedule must be 'constant' or 'linear', got {self.schedule!r}", field="schedule")
        if self.float_groups not in ("train", "freeze"):
            raise InvalidInputError(
                f"float_groups must be 'train' or 'freeze', got {self.float_groups!r}", field="float_groups"
            )
        for name in ("dropout", "train_other"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be true or false", field=name)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RefineConfig:
        data = dict(data or {})
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise InvalidInputError(f"unknown refine option(s): {', '.join(sorted(unknown))}", field="refine")
        return cls(**data)


@dataclass
class RefineParts:
    """What :func:`refine` needs when there is no :class:`~search.pipeline.Search`: the full-precision
    model (the teacher; never changed), its space, the task, the evaluation batches (the refined
    point's metrics), the calibration batches (the default training batches), the metric (the task's
    default when None) and the clip rule of the post-training quantizer."""

    model: nn.Module
    space: SearchSpace
    task: str
    evaluation: Sequence[TokenizedBatch]
    calibration: Sequence[TokenizedBatch] = ()
    metric: str | None = None
    clip: str = "mse"
    device: str | torch.device = "cpu"
    reference: Reference | None = None


def _parts_of(obj: Any) -> RefineParts:
    if isinstance(obj, RefineParts):
        return obj
    needed = ("model", "space", "task", "evaluation", "calibration")
    if all(hasattr(obj, n) for n in needed):  # a search.pipeline.Search
        options = getattr(obj, "options", None)
        ref = obj.reference() if callable(getattr(obj, "reference", None)) else None
        return RefineParts(
            model=obj.model,
            space=obj.space,
            task=obj.task,
            evaluation=obj.evaluation,
            calibration=obj.calibration,
            metric=getattr(obj, "metric", None),
            clip=getattr(options, "clip", "mse"),
            device=getattr(obj, "device", "cpu"),
            reference=ref,
        )
    raise InvalidInputError("refine needs a Search or RefineParts", field="search")


# ------------------------------------------------------------------------------- LSQ primitives
def lsq_grad_scale(n_per_row: int, qmax: int) -> float:
    """The LSQ gradient scale of a step size: ``1 / sqrt(n_weights_per_row * Q_p)``, ``Q_p`` the
    largest positive code (``2^(b-1) - 1`` symmetric, ``2^b - 1`` asymmetric)."""
    return 1.0 / math.sqrt(max(1, n_per_row) * max(1, qmax))


def _scaled_grad(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``g`` in the backward pass."""
    return (x - x * g).detach() + x * g


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` (half to even) forward, identity backward."""
    return (x.round() - x).detach() + x


def lsq_fake_quantize(
    w: torch.Tensor,
    step: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_scale: float,
    *,
    half_scales: bool = True,
) -> torch.Tensor:
    """Differentiable per-row fake quantization with a learned step size (LSQ).

    Forward: ``(clamp(round(w / s) + z, qmin, qmax) - z) * s`` per row of ``w`` (``s = step`` clamped to
    ``[SCALE_EPS, SCALE_MAX]`` and, with ``half_scales``, rounded to float16), the formula of
    :func:`search.quant.quantize` / :func:`search.quant.dequantize` up to the last ulp.
    Backward (the LSQ estimator): ``dw_hat/dw`` is 1 where the code is not clamped and 0 where it is;
    ``dw_hat/ds`` is ``round(w/s) - w/s`` where not clamped and ``qmin - z`` / ``qmax - z`` where
    clamped, multiplied by ``grad_scale``; float16 rounding of ``s`` is straight-through.
    """
    s = step.clamp(quant.SCALE_EPS, quant.SCALE_MAX)
    if half_scales:
        s = s + (s.to(torch.float16).to(s.dtype) - s).detach()
    s = _scaled_grad(s, grad_scale)[:, None]
    z = zero_point.to(s.dtype)[:, None]
    q = (_round_ste(w / s) + z).clamp(qmin, qmax)
    return (q - z) * s


def _exact_fake_quantize(w: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    qp = _qparams(step, zero_point, bits, symmetric)
    return quant.dequantize(quant.quantize(w, qp), qp, dtype=w.dtype)


def _qparams(step: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool) -> quant.QParams:
    scale = step.detach().to(torch.float32).clamp(quant.SCALE_EPS, quant.SCALE_MAX).to(torch.float16).to(torch.float32)
    return quant.QParams(scale=scale, zero_point=zero_point.detach().to(torch.int32), bits=bits, symmetric=symmetric)


def member_key(group: str, index: int) -> str:
    """The key of member ``index`` of ``group`` in :attr:`RefineResult.qparams` (``group::index``, the
    naming of :mod:`search.export`)."""
    return f"{group}::{index}"


# ------------------------------------------------------------------------------ parametrizations
@dataclass
class _Slot:
    """One member slice of a module: what it becomes in the student's forward pass."""

    key: str
    member: Member
    kind: Literal["int", "half", "float", "pruned", "frozen"]
    bits: int = 32
    symmetric: bool = True
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

    def __init__(self, slots: list[_Slot], steps: list[torch.Tensor], zero_points: list[torch.Tensor], conv: bool) -> None:
        super().__init__()
        self.slots = slots
        self.conv = conv
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
                h = block.to(torch.float16).to(block.dtype)
                out[idx] = h if exact else block + (h - block).detach()
            elif sl.kind == "int":
                step = self.steps[sl.step_index]
                z = self.zero_point(sl.step_index)
                if exact:
                    out[idx] = _exact_fake_quantize(block, step, z, sl.bits, sl.symmetric)
                else:
                    qmin, qmax = quant.code_range(sl.bits, sl.symmetric)
                    fq = lsq_fake_quantize(block.to(torch.float32), step, z, qmin, qmax, sl.grad_scale)
                    out[idx] = fq.to(block.dtype)
        return out.t() if self.conv else out


class _Mask(nn.Module):
    """Parametrization of a bias: entries of pruned output channels are exactly zero."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask: torch.Tensor
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, bias, torch.zeros_like(bias))


@dataclass
class _Student:
    model: nn.Module
    modules: dict[str, nn.Module]
    #: member key -> (module name, parametrization, slot)
    int_slots: dict[str, tuple[str, _QuantWeight, _Slot]]
    pruned: list[str]
    masked_bias: list[str]
    other: list[nn.Parameter]

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def step_params(self) -> set[int]:
        return {id(q.steps[s.step_index]) for _, q, s in self.int_slots.values()}


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
    for name, members in per_module.items():
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
                qp = quant.choose_qparams(block, opt.bits, symmetric=opt.symmetric, clip=clip)  # type: ignore[arg-type]
                slot = _Slot(
                    key, m, "int", opt.bits, opt.symmetric, len(steps), lsq_grad_scale(block.shape[1], qp.qmax)
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
        qw = _QuantWeight(slots, steps, zps, conv)
        weight.requires_grad_(True)
        parametrize.register_parametrization(module, "weight", qw, unsafe=True)
        for s in slots:
            if s.kind == "int":
                int_slots[s.key] = (name, qw, s)
        if bias_mask is not None and not bool(bias_mask.all()):
            parametrize.register_parametrization(module, "bias", _Mask(bias_mask), unsafe=True)
            masked_bias.append(name)
    other = [
        p for n, p in model.named_parameters() if p.requires_grad and ".parametrizations." not in f".{n}"
    ]
    return _Student(model, modules, int_slots, pruned, masked_bias, other)


@torch.no_grad()
def _finalize(student: _Student) -> None:
    """Replace every parametrization with the exact quantized weights it stands for."""
    for name, module in student.modules.items():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name in list(cast(nn.ModuleDict, module.parametrizations)):
            final = getattr(module, tensor_name).detach().clone()
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
            getattr(module, tensor_name).copy_(final)
        del name


# ------------------------------------------------------------------------------------- losses
def _forward(model: nn.Module, batch: TokenizedBatch, *, hidden: bool, attentions: bool) -> Any:
    kwargs: dict[str, Any] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if hidden:
        kwargs["output_hidden_states"] = True
    if attentions:
        kwargs["output_attentions"] = True
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "use_cache"):
        kwargs["use_cache"] = False
    return model(**kwargs)


def _task_output(out: Any, batch: TokenizedBatch, task: Task) -> torch.Tensor:
    if task == "embeddings":
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
        return cast(torch.Tensor, ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).float())
    logits = out.logits if hasattr(out, "logits") else out[0]
    return cast(torch.Tensor, logits.float())


def _output_kd(s: torch.Tensor, t: torch.Tensor, batch: TokenizedBatch, task: Task, temperature: float) -> torch.Tensor:
    if task == "embeddings":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    if task == "regression":  # the squared error to the teacher's output (no distribution to soften)
        return (s - t).square().sum(-1).mean()
    logp_t = F.log_softmax(t / temperature, dim=-1)
    logp_s = F.log_softmax(s / temperature, dim=-1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1) * temperature**2
    if task in ("causal_lm", "token_classification"):
        mask = scored_tokens(batch, task).to(kl.dtype)
        return (kl * mask).sum() / mask.sum().clamp_min(1.0)
    return kl.mean()


def _task_loss(s: torch.Tensor, batch: TokenizedBatch, task: Task) -> torch.Tensor | None:
    """The mean supervised loss of the batch (:func:`search.tasks.task_loss`), None without one."""
    if not has_task_loss(task, [batch]):
        return None
    total, count = task_loss(s, batch, task)
    return total / count.clamp_min(1.0)


def _hidden_mse(hs: Sequence[torch.Tensor], ht: Sequence[torch.Tensor], batch: TokenizedBatch) -> torch.Tensor:
    mask = batch.attention_mask.unsqueeze(-1).float()
    total = hs[0].new_zeros((), dtype=torch.float32)
    for a, b in zip(hs, ht, strict=True):
        d = (a.float() - b.float()).square() * mask
        total = total + d.sum() / (mask.sum() * a.shape[-1]).clamp_min(1.0)
    return total / max(1, len(hs))


def _attention_mse(as_: Sequence[torch.Tensor], at: Sequence[torch.Tensor], batch: TokenizedBatch) -> torch.Tensor:
    m = batch.attention_mask.float()
    pair = (m[:, :, None] * m[:, None, :])[:, None]  # [B, 1, T, T]
    total = as_[0].new_zeros((), dtype=torch.float32)
    for a, b in zip(as_, at, strict=True):
        d = (a.float() - b.float()).square() * pair
        total = total + d.sum() / (pair.sum() * a.shape[1]).clamp_min(1.0)
    return total / max(1, len(as_))


# ------------------------------------------------------------------------------------- result
@dataclass
class RefineResult:
    """What :func:`refine` produced.

    ``metrics``: the refined point's metrics on the evaluation batches; ``initial_metrics``: the
    post-training point's metrics on the validation batches (step 0); ``steps``: steps run;
    ``best_step``: the step whose state was kept (0: refinement never beat the post-training point);
    ``qparams``: the learned per-row step sizes (float16 values) and zero points of every integer
    member slice, keyed :func:`member_key`; ``state_dict``: the refined student's state dict with the
    quantized-then-dequantized weights the metrics were measured with; ``model``: the refined student
    itself (those weights loaded); ``history``: one entry per evaluation; ``notes``: what was skipped
    and why.
    """

    precision_map: PrecisionMap
    metric: str
    higher_is_better: bool
    metrics: dict[str, float]
    initial_metrics: dict[str, float]
    steps: int
    best_step: int
    stopped_early: bool
    qparams: dict[str, quant.QParams]
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    model: nn.Module = field(repr=False)
    history: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    resumed_from: int | None = None
    seconds: float = 0.0
    config: RefineConfig = field(default_factory=RefineConfig)

    @property
    def scales(self) -> dict[str, torch.Tensor]:
        """The learned step sizes (float32 holding float16 values) per member slice."""
        return {k: qp.scale for k, qp in self.qparams.items()}

    def point(self, origin: ParetoPoint) -> ParetoPoint:
        """The refined point of ``origin``: same map and costs, the refined metrics, ``refined=True``."""
        if origin.precision_map != self.precision_map:
            raise InvalidInputError("the point's precision map is not the refined one", field="precision_map")
        return replace(origin, metrics=dict(self.metrics), refined=True, label="refined")

    def info(self) -> dict[str, Any]:
        """JSON-serialisable summary (for a job's events or an artifact's metadata)."""
        return {
            "metric": self.metric,
            "metrics": dict(self.metrics),
            "initial_metrics": dict(self.initial_metrics),
            "steps": self.steps,
            "best_step": self.best_step,
            "stopped_early": self.stopped_early,
            "resumed_from": self.resumed_from,
            "seconds": self.seconds,
            "notes": list(self.notes),
            "config": self.config.to_dict(),
        }


# ------------------------------------------------------------------------------------ helpers
def _step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))


def _batch_index(seed: int, micro: int, n: int) -> int:
    """Index of the ``micro``-th micro-batch of the endless seeded stream over ``n`` batches."""
    epoch, pos = divmod(micro, n)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return int(perm[pos])


def _selection_key(metrics: Mapping[str, float], metric: str, hib: bool) -> tuple[float, float]:
    primary = metrics.get(metric, float("nan"))
    primary = primary if hib else -primary
    kl = metrics.get("kl")
    secondary = -kl if kl is not None else 0.0
    if not math.isfinite(primary):
        primary = -math.inf
    if not math.isfinite(secondary):
        secondary = -math.inf
    return (primary, secondary)


@torch.no_grad()
def _evaluate_student(model: nn.Module, batches: Sequence[TokenizedBatch], task: Task, ref: Reference) -> dict[str, float]:
    was = model.training
    model.eval()
    try:
        return evaluate(model, batches, task, reference=ref)
    finally:
        model.train(was)


class _AttentionMode:
    """Switch models to eager attention for the run and back afterwards (as the Hessian method does)."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        self.models = list(models)
        self.saved: list[tuple[nn.Module, str | None]] = []
        self.ok = True

    def __enter__(self) -> _AttentionMode:
        for m in self.models:
            cfg = getattr(m, "config", None)
            original = getattr(cfg, "_attn_implementation", None)
            if original == "eager":
                continue
            setter = getattr(m, "set_attn_implementation", None)
            if original is not None and callable(setter):
                try:
                    setter("eager")
                    self.saved.append((m, original))
                except (ValueError, NotImplementedError, AttributeError, ImportError):
                    pass
            if getattr(cfg, "_attn_implementation", None) != "eager":
                self.ok = False
        return self

    def __exit__(self, *exc: object) -> None:
        for m, original in reversed(self.saved):
            cfg = getattr(m, "config", None)
            if original is not None and getattr(cfg, "_attn_implementation", None) != original:
                m.set_attn_implementation(original)  # type: ignore[operator]


def _fingerprint(pmap: PrecisionMap, config: RefineConfig, trainable: Mapping[str, torch.Tensor], n_train: int) -> str:
    ignore = {"steps", "eval_every", "checkpoint_every", "patience"}
    payload = {
        "pmap": pmap.to_dict(),
        "config": {k: v for k, v in config.to_dict().items() if k not in ignore},
        "params": {k: list(v.shape) for k, v in trainable.items()},
        "train_batches": n_train,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# -------------------------------------------------------------------------------- checkpoints
def _latest_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.glob("step-*") if (p / CHECKPOINT_STATE).is_file() and (p / CHECKPOINT_TENSORS).is_file())
    return done[-1] if done else None


def _save_checkpoint(
    folder: Path,
    step: int,
    trainable: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    best_state: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for n, p in trainable.items():
        tensors[f"param::{n}"] = p.detach().cpu().contiguous().clone()
    for n, t in best_state.items():
        tensors[f"best::{n}"] = t.detach().cpu().contiguous().clone()
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt::{idx}::{k}"] = v.detach().cpu().contiguous().clone()
    tensors["rng::cpu"] = torch.get_rng_state().clone()
    meta = dict(state)
    meta.update(
        {
            "version": CHECKPOINT_VERSION,
            "step": step,
            "optimizer_groups": opt["param_groups"],
            "optimizer_scalars": {
                str(idx): {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)} for idx, st in opt["state"].items()
            },
        }
    )
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(tensors, str(tmp / CHECKPOINT_TENSORS))
    (tmp / CHECKPOINT_STATE).write_text(json.dumps(meta, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    done = sorted(p for p in folder.glob("step-*") if (p / CHECKPOINT_STATE).is_file())
    for old in done[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / CHECKPOINT_STATE).read_text())
        tensors = load_file(str(path / CHECKPOINT_TENSORS))
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"unreadable refinement checkpoint {str(path)!r}: {exc}", field="checkpoint_dir") from exc
    if meta.get("version") != CHECKPOINT_VERSION:
        raise InvalidInputError(
            f"checkpoint {str(path)!r} has layout version {meta.get('version')!r}, expected {CHECKPOINT_VERSION}",
            field="checkpoint_dir",
        )
    return tensors, meta


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith("opt::"):
            _, idx, k = key.split("::", 2)
            state.setdefault(int(idx), {})[k] = t
    for idx, scalars in (meta.get("optimizer_scalars") or {}).items():
        state.setdefault(int(idx), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_groups"]})


# ---------------------------------------------------------------------------------------- refine
def refine(
    search_or_parts: Any,
    pmap: PrecisionMap | Mapping[str, Any],
    *,
    config: RefineConfig | None = None,
    train_batches: Sequence[TokenizedBatch] | None = None,
    validation_batches: Sequence[TokenizedBatch] | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    checkpoint_dir: str | Path | None = None,
) -> RefineResult:
    """Fine-tune a quantized student of the search's model under ``pmap`` (see the module docstring).

    ``search_or_parts``: a :class:`~search.pipeline.Search` or :class:`RefineParts`; its model is the
    teacher and is never changed. ``train_batches`` default to the calibration batches;
    ``validation_batches`` (early stopping) to the evaluation batches, on which the result's metrics
    are always measured. ``on_progress("refine", fraction, message)`` is called after every step;
    ``should_stop()`` is checked between steps and raises :class:`CanceledError`. With
    ``checkpoint_dir``, checkpoints are written there and a run resumes from the latest one found.
    The map, the costs and the teacher are unchanged; pruned slices stay exactly zero.
    """
    t_start = time.perf_counter()
    config = config if config is not None else RefineConfig()
    if not isinstance(config, RefineConfig):
        raise InvalidInputError("config must be a RefineConfig", field="config")
    parts = _parts_of(search_or_parts)
    task = check_task(parts.task)
    space = parts.space
    pmap = _check_pmap(pmap, space)
    device = torch.device(parts.device)
    metric = parts.metric or DEFAULT_METRIC[task]
    hib = higher_is_better(metric)
    train = list(train_batches) if train_batches is not None else list(parts.calibration)
    if not train:
        raise InvalidInputError("no training batches for refinement", field="train_batches")
    if not parts.evaluation:
        raise InvalidInputError("no evaluation batches", field="evaluation_size")
    train = [b.to(device) for b in train]
    evaluation = [b.to(device) for b in parts.evaluation]
    validation = [b.to(device) for b in validation_batches] if validation_batches is not None else evaluation
    report = on_progress or (lambda stage, frac, msg: None)
    teacher = parts.model
    notes: list[str] = []
    if not any(pmap.get(g.name, FULL_PRECISION).bits != 32 for g in space.groups):
        notes.append("the map is full precision: only the weights were fine-tuned")

    ref_eval = parts.reference if parts.reference is not None else reference_outputs(teacher, evaluation, task)
    ref_val = ref_eval if validation_batches is None else reference_outputs(teacher, validation, task)

    student = _build_student(teacher, space, pmap, parts.clip, config)
    model = student.model.to(device)
    trainable = student.trainable()
    step_ids = student.step_params()
    weights = [p for p in trainable.values() if id(p) not in step_ids]
    scales = [p for p in trainable.values() if id(p) in step_ids]
    groups: list[dict[str, Any]] = []
    if weights:
        groups.append({"params": weights, "lr": config.lr_weights, "weight_decay": config.weight_decay})
    if scales:
        groups.append({"params": scales, "lr": config.lr_scales, "weight_decay": 0.0})
    if not groups:
        raise InvalidInputError("nothing to train: every parameter is frozen", field="float_groups")
    base_lrs = [g["lr"] for g in groups]
    optimizer = torch.optim.AdamW(groups, lr=config.lr_weights)
    fingerprint = _fingerprint(pmap, config, trainable, len(train))

    want_hidden = config.kd_hidden > 0
    want_attn = config.kd_attention > 0
    teacher_modes = [(m, m.training) for m in teacher.modules()]
    ckpt_folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    devices = [device.index or 0] if device.type == "cuda" else []

    with _AttentionMode([teacher, model] if want_attn else []) as attn_mode, torch.random.fork_rng(devices=devices):
        if want_attn and not attn_mode.ok:
            want_attn = False
            notes.append("attention-map distillation skipped: the model cannot use eager attention")
        teacher.eval()
        step = 0
        best_key: tuple[float, float] | None = None
        best_step = 0
        best_state: dict[str, torch.Tensor] = {}
        stale = 0
        finished = False
        history: list[dict[str, Any]] = []
        initial: dict[str, float] = {}
        resumed_from: int | None = None

        latest = _latest_checkpoint(ckpt_folder) if ckpt_folder is not None else None
        if latest is not None:
            tensors, meta = _load_checkpoint(latest)
            if meta.get("fingerprint") != fingerprint:
                raise InvalidInputError(
                    f"checkpoint {str(latest)!r} belongs to another map, model or configuration", field="checkpoint_dir"
                )
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(tensors[f"param::{n}"].to(p.device))
            best_state = {k[len("best::") :]: v.to(device) for k, v in tensors.items() if k.startswith("best::")}
            _restore_optimizer(optimizer, tensors, meta)
            torch.set_rng_state(tensors["rng::cpu"])
            step = int(meta["step"])
            best_key = (float(meta["best_key"][0]), float(meta["best_key"][1])) if meta.get("best_key") else None
            best_step = int(meta["best_step"])
            stale = int(meta["stale"])
            finished = bool(meta["finished"])
            history = list(meta["history"])
            initial = dict(meta["initial_metrics"])
            want_attn = bool(meta["attention"])
            notes = list(meta["notes"])
            resumed_from = step
        else:
            initial = _evaluate_student(model, validation, task, ref_val)
            best_key = _selection_key(initial, metric, hib)
            best_state = {n: p.detach().clone() for n, p in trainable.items()}
            history.append({"step": 0, "metrics": dict(initial)})

        def checkpoint() -> None:
            if ckpt_folder is None:
                return
            _save_checkpoint(
                ckpt_folder,
                step,
                trainable,
                optimizer,
                best_state,
                {
                    "fingerprint": fingerprint,
                    "best_key": list(best_key) if best_key is not None else None,
                    "best_step": best_step,
                    "stale": stale,
                    "finished": finished,
                    "history": history,
                    "initial_metrics": initial,
                    "attention": want_attn,
                    "notes": notes,
                },
            )

        model.train(config.dropout)
        n_train = len(train)
        try:
            while step < config.steps and not finished:
                if should_stop is not None and should_stop():
                    raise CanceledError("refinement canceled")
                torch.manual_seed(_step_seed(config.seed, step))
                frac = step / config.steps if config.schedule == "linear" else 0.0
                for g, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                    g["lr"] = lr * (1.0 - frac)
                optimizer.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for a in range(config.accumulate):
                    batch = train[_batch_index(config.seed, step * config.accumulate + a, n_train)]
                    loss = _loss(model, teacher, batch, task, config, want_hidden, want_attn)
                    (loss / config.accumulate).backward()  # type: ignore[no-untyped-call]
                    loss_sum += float(loss.detach())
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.grad_clip)
                optimizer.step()
                step += 1
                message = f"step {step}/{config.steps}, loss {loss_sum / config.accumulate:.4g}"
                if step % config.eval_every == 0 or step == config.steps:
                    metrics = _evaluate_student(model, validation, task, ref_val)
                    key = _selection_key(metrics, metric, hib)
                    history.append({"step": step, "metrics": dict(metrics), "loss": loss_sum / config.accumulate})
                    if best_key is None or key > best_key:
                        best_key, best_step, stale = key, step, 0
                        best_state = {n: p.detach().clone() for n, p in trainable.items()}
                    else:
                        stale += 1
                        if config.patience is not None and stale >= config.patience:
                            finished = True
                    message += f", {metric} {metrics.get(metric, float('nan')):.4g} (best at step {best_step})"
                if step % config.checkpoint_every == 0 or finished:
                    checkpoint()
                report("refine", step / config.steps, message)
        finally:
            for m, t in teacher_modes:
                m.training = t

        stopped_early = finished and step < config.steps
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(best_state[n])
        qparams = {key: _qparams(q.steps[s.step_index], q.zero_point(s.step_index), s.bits, s.symmetric) for key, (_, q, s) in student.int_slots.items()}
        qparams = {k: quant.QParams(v.scale.cpu(), v.zero_point.cpu(), v.bits, v.symmetric) for k, v in qparams.items()}
        _finalize(student)
        model.eval()
        metrics = _evaluate_student(model, evaluation, task, ref_eval)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    report("refine", 1.0, f"refined: {metric} {metrics.get(metric, float('nan')):.4g} (best step {best_step})")
    return RefineResult(
        precision_map=pmap,
        metric=metric,
        higher_is_better=hib,
        metrics=metrics,
        initial_metrics=initial,
        steps=step,
        best_step=best_step,
        stopped_early=stopped_early,
        qparams=qparams,
        state_dict=state,
        model=model,
        history=history,
        notes=notes,
        resumed_from=resumed_from,
        seconds=time.perf_counter() - t_start,
        config=config,
    )


def _loss(
    student: nn.Module,
    teacher: nn.Module,
    batch: TokenizedBatch,
    task: Task,
    config: RefineConfig,
    hidden: bool,
    attentions: bool,
) -> torch.Tensor:
    with torch.no_grad():
        t_out = _forward(teacher, batch, hidden=hidden, attentions=attentions)
    s_out = _forward(student, batch, hidden=hidden, attentions=attentions)
    s_main, t_main = _task_output(s_out, batch, task), _task_output(t_out, batch, task)
    loss = s_main.new_zeros(())
    if config.kd_logits > 0:
        loss = loss + config.kd_logits * _output_kd(s_main, t_main, batch, task, config.temperature)
    if hidden:
        hs, ht = getattr(s_out, "hidden_states", None), getattr(t_out, "hidden_states", None)
        if hs is not None and ht is not None and len(hs) == len(ht):
            loss = loss + config.kd_hidden * _hidden_mse(hs, ht, batch)
    if attentions:
        as_, at = getattr(s_out, "attentions", None), getattr(t_out, "attentions", None)
        if as_ and at and len(as_) == len(at) and all(isinstance(a, torch.Tensor) for a in as_):
            loss = loss + config.kd_attention * _attention_mse(as_, at, batch)
    if config.task > 0:
        tl = _task_loss(s_main, batch, task)
        if tl is not None:
            loss = loss + config.task * tl
    return loss
