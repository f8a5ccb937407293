"""The native packed artifact (format ``bitscout.quant``): :func:`export_artifact` writes it,
:func:`load_artifact` rebuilds it onto a model bit for bit, :func:`artifact_info` reads its metadata,
:func:`read_quantization` its codes and scales (what the other formats are written from for a point
that exists only as an artifact: :func:`search.export.formats.export_stored`).

Artifact layout
===============

``export_artifact(model, space, pmap, out_dir)`` writes into ``out_dir``:

* ``model.quant.safetensors``: one safetensors file (never a pickle) holding

  ==========================================  ====================================================
  tensor                                      what
  ==========================================  ====================================================
  ``quant::<group>::<i>::codes``              uint8: the integer codes of member ``i`` of the group
                                              (an integer option), packed at their bit-width by
                                              :func:`search.quant.pack` (row-major over the member
                                              slice in the ``[out, in]`` layout; two's complement
                                              when symmetric, unsigned when asymmetric)
  ``quant::<group>::<i>::scale``              float16 ``[rows]``: the per-row scales, or
                                              ``[rows, cols / N]`` for an option with group-wise
                                              scales of ``N`` columns (``4g128``: entry ``[r, j]``
                                              scales columns ``j*N .. (j+1)*N - 1`` of row ``r`` of
                                              the member slice); float32 only if a scale is not a
                                              float16 value, which the search's quantizer never
                                              produces: see below
  ``quant::<group>::<i>::zero_point``         uint8, the shape of the scales, asymmetric options only
  ``quant::<group>::<i>::weight``             the member slice as float16 (16-bit groups) or in the
                                              model's dtype (32-bit groups)
  ``quant::<group>::0::tt<k>::codes``         a tensor-train group: core ``k`` of its TT-matrix
  ``quant::<group>::0::tt<k>::scale``         (``[r_{k-1}, m_k, n_k, r_k]``, :mod:`search.tt_layout`)
  ``quant::<group>::0::tt<k>::zero_point``    as the ``[r_{k-1} * m_k, n_k * r_k]`` matrix it is
  ``quant::<group>::0::tt<k>::core``          quantized as: packed codes, float16 scales per row
                                              and zero points (integer cores), or the core itself
                                              (``core``: float16 for 16-bit cores, the model's
                                              dtype for 32-bit ones)
  (nothing)                                   pruned groups: their weights are zeros
  ``<state-dict name>``                       every other parameter and buffer, in its own dtype:
                                              the state dict minus the weights the groups cover
                                              (biases of pruned groups are stored zeroed)
  ==========================================  ====================================================

  and, as string metadata: ``format`` (``bitscout.quant``), ``format_version``, ``precision_map``
  and ``space`` (JSON: :meth:`PrecisionMap.to_dict`, :func:`search.space.space_to_dict`), ``clip``,
  ``dtypes`` (each covered weight's dtype), ``aliases`` (tied state-dict names stored once),
  ``info`` (the caller's ``metadata``), ``activations`` (only for a map with activation widths
  whose inputs have frozen scales: the learned steps of a refined point and the static ranges of a
  search with static scales, :mod:`search.export.activations`; absent: every quantized input rounds
  per token) and ``digest`` (SHA-256 of the other entries, so an edited header is refused with a
  clear message);
* ``precision_map.json``: the map alone, group name → ``{"bits", "symmetric"}`` (and ``"group_size"``
  for group-wise scales). Group names are the
  module name (``layer`` groups) or ``<parent module>/<head|ffn><index>`` (sub-layer groups);
* ``config.json`` (from ``model.config``) and the tokenizer files of ``model_dir`` when given.

Exactness
=========

:func:`load_artifact` rebuilds every covered weight from the file alone: integer members as
``dequantize(unpack(codes), scale, zero_point)``, the very formula of
:func:`search.quant.fake_quantize`, so the loaded model is *bit-identical* to the model the search
evaluated (``ModelAdapter.quantized(pmap, space)``) and reports exactly the same metrics. The search's
quantizer rounds every scale to a float16 value before choosing codes (:mod:`search.quant`), so the
float16 scales in the file are exact and the packed weights take exactly the bytes
:func:`search.cost.weight_bytes` counts: ``ceil(n * bits / 8)`` per member slice, 2 bytes a row for
the scale and 1 more for an asymmetric zero point (per group of ``N`` columns of a row with group-wise
scales). ``export_artifact(..., verify=True)`` also checks
every stored member against the model quantized by :meth:`ModelAdapter.quantized` before writing.

Activation widths (``4a8``): :func:`load_artifact` also installs the hooks that round each
quantized group's matrix inputs as the search (or the refinement) did
(:func:`search.export.activations.install_activation_hooks`): per token, by the stored static range,
or by the learned step, so a W/A point measures the search's metrics too.

Tensor-train groups keep their cores: :func:`load_artifact` rebuilds them exactly as stored and puts a
:class:`search.tensor_train.TTLinear` (or ``TTEmbedding``) with the module's bias in the module's place,
the very module the search evaluated, so the factorised forward is bit-identical too; the file holds the
bytes :func:`search.cost.tt_core_bytes` counts. Other formats have no TT layers: torchao refuses the
group, ``bitscout.apply`` of a map builds the TT module itself.

Size: the file's tensors take exactly :class:`search.cost.CostModel`'s ``size_bytes`` plus 4 bytes
for every bias entry of a pruned group (the file keeps whole bias vectors, zeroed rows included,
where the cost model counts those entries as removed), and the file adds its JSON header (names and
metadata, about a kilobyte per group; measured sizes in ``docs/methods/export.md``).

Quantization is deterministic, but floating-point sums may differ between devices: export on the
device type the search ran on (CPU by default) for bit-exactness. Loading onto a model of another
dtype casts the weights (a warning says the outputs are no longer bit-identical).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search import quant
from search import tensor_train as tt
from search.actquant import StaticScales
from search.adapter import ModelAdapter
from search.errors import InvalidInputError, SearchError
from search.export.activations import ACT_STEP, ActivationSteps, activation_steps_of, install_activation_hooks
from search.export.common import (
    _as_pmap,
    _as_space,
    _check_fits,
    _fully_covered,
    _member_view,
    _members_by_module,
    _state_entries,
    _state_name,
    _weight,
    _weight_view,
    _write_model_files,
)
from search.export.packed import (
    PackedWeight,
    holders_of,
    install,
    maps_a_file,
    new_packed_weight,
    packable,
    refuse_packed,
    release_mapping,
    store_codes,
)
from search.space import FULL_PRECISION, Member, PrecisionMap, SearchSpace, space_from_dict, space_to_dict

log = logging.getLogger(__name__)

__all__ = [
    "ARTIFACT_FILE",
    "ArtifactInfo",
    "FORMAT",
    "FORMAT_VERSION",
    "PRECISION_MAP_FILE",
    "QuantizedPoint",
    "StoredQuantization",
    "artifact_info",
    "export_artifact",
    "load_artifact",
    "quantize_point",
    "read_quantization",
]

FORMAT = "bitscout.quant"
#: Version of the artifact layout this module writes and reads.
FORMAT_VERSION = 1
ARTIFACT_FILE = "model.quant.safetensors"
PRECISION_MAP_FILE = "precision_map.json"
_Q = "quant::"
#: Metadata entries the digest covers (everything but the digest itself).
_SIGNED = ("format", "format_version", "precision_map", "space", "clip", "dtypes", "aliases", "info")
#: signed too when present (an artifact without frozen activation scales has no such entry)
_SIGNED_IF_PRESENT = ("activations",)


def _artifact_error(message: str) -> InvalidInputError:
    return InvalidInputError(message, field="artifact")


def _qkey(group: str, i: int, what: str) -> str:
    return f"{_Q}{group}::{i}::{what}"


def _digest(meta: Mapping[str, str]) -> str:
    keys = _SIGNED + tuple(k for k in _SIGNED_IF_PRESENT if k in meta)
    canonical = json.dumps({k: meta.get(k) for k in keys}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------- export
@dataclass
class QuantizedPoint:
    """A map quantized once from a model's original weights, for every checkpoint format to write
    (:func:`quantize_point`): the native artifact packs ``codes``, the compressed-tensors writer repacks
    them in its own layout, the dense writer keeps ``expected``.

    ``codes`` / ``qparams``: every integer member's codes (``[rows, cols]``, int8 when symmetric, uint8
    when asymmetric, on the CPU) and scales, keyed ``(group, member index)``; ``expected``: the member as
    the search evaluates it (the model's dtype and device); ``cores``: every tensor-train group's cores
    as its forward uses them; ``tensors``: the artifact's ``quant::`` entries of the tensor-train cores.
    :meth:`applied` puts the point into the model for the time of a ``with`` block.
    """

    adapter: ModelAdapter
    space: SearchSpace
    pmap: PrecisionMap
    clip: str
    modules: dict[str, nn.Module]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    expected: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    codes: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    qparams: dict[tuple[str, int], quant.QParams] = field(default_factory=dict)
    cores: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)

    def option(self, group: str) -> Any:
        return self.pmap.get(group, FULL_PRECISION)

    @contextmanager
    def applied(self, *, tt_dense: bool = False) -> Iterator[nn.Module]:
        """The model as the search evaluated it, restored on exit: integer members written from
        ``expected``, the other groups by the adapter itself (pruned groups and their biases zeroed,
        16-bit groups rounded). Tensor-train groups keep their module's weights, or with ``tt_dense``
        take the dense matrix of their cores (:func:`search.tensor_train.tt_full`)."""
        adapter = self.adapter
        written = [
            g for g in self.space.groups
            if not self.option(g.name).unchanged and (tt_dense or not self.option(g.name).is_tt)
        ]
        saved = adapter.snapshot(list(dict.fromkeys(n for g in written for n in g.modules)))
        try:
            with torch.no_grad():
                for g in written:
                    opt = self.option(g.name)
                    if opt.is_integer:
                        for i, m in enumerate(g.members):
                            adapter.member_slice(m).copy_(self.expected[(g.name, i)])
                    elif opt.is_tt:
                        view = adapter.member_slice(g.members[0])
                        lay = tt.layout(*g.members[0].shape)
                        view.copy_(tt.tt_full([c.to(view.device) for c in self.cores[g.name]], lay).to(view.dtype))
                    else:
                        adapter._write_group(g, opt, self.clip)
            yield adapter.model
        finally:
            adapter.restore(saved)


def quantize_point(
    model: nn.Module,
    space: SearchSpace | Mapping[str, Any],
    pmap: PrecisionMap | Mapping[str, Any],
    *,
    clip: str = "mse",
    qparams: Mapping[str, quant.QParams] | None = None,
    tt_cores: Mapping[str, tt.StoredCores] | None = None,
) -> QuantizedPoint:
    """Quantize ``pmap`` over ``space`` from ``model``'s original weights exactly as
    :func:`search.quant.fake_quantize` does (``qparams`` and ``tt_cores`` as in :func:`export_artifact`);
    ``model`` is left as it was. Raises :class:`InvalidInputError` when the map or the space does not fit
    the model (fields ``precision_map``, ``qparams``, ``clip``, ``space``, ``tt_cores``)."""
    space = _as_space(space)
    pmap = _as_pmap(pmap)
    unknown = [k for k in pmap if k not in space._index]
    if unknown:
        raise InvalidInputError(f"the precision map names groups not in the space: {unknown[:3]}", field="precision_map")
    overrides = _check_qparams(qparams, space, pmap)
    if clip not in ("mse", "minmax"):
        raise InvalidInputError(f"clip must be 'mse' or 'minmax', got {clip!r}", field="clip")
    modules = _check_fits(model, space, field="space")
    point = QuantizedPoint(ModelAdapter(model), space, pmap, clip, modules)
    adapter = point.adapter
    with torch.no_grad():
        for g in space.groups:
            opt = pmap.get(g.name, FULL_PRECISION)
            if opt.is_tt:
                given = (tt_cores or {}).get(g.name)
                module = modules[g.members[0].module]
                if given is None and isinstance(module, tt.TTLinear | tt.TTEmbedding):
                    raise InvalidInputError(
                        f"{g.name} is a TT module in the model: pass its cores (RefineResult.tt_cores)", field="tt_cores"
                    )
                w = adapter.member_slice(g.members[0]).detach() if given is None else torch.empty(g.members[0].shape)
                _store_cores(point, g.name, w, opt, clip, given)
                continue
            if not opt.is_integer:
                continue
            for i, m in enumerate(g.members):
                block = adapter.member_slice(m).detach()
                qp = overrides.get(_member_key(g.name, i)) or quant.choose_qparams(
                    block, opt.bits, symmetric=opt.symmetric, clip=clip, group_size=opt.group_size  # type: ignore[arg-type]
                )
                if qp.scale.device != block.device:
                    qp = quant.QParams(qp.scale.to(block.device), qp.zero_point.to(block.device), qp.bits, qp.symmetric,
                                       qp.group_size)
                codes = quant.quantize(block, qp)
                point.codes[(g.name, i)] = codes.cpu()
                point.qparams[(g.name, i)] = qp
                point.expected[(g.name, i)] = quant.dequantize(codes, qp, dtype=block.dtype)
    return point


def export_artifact(
    model: nn.Module,
    space: SearchSpace | Mapping[str, Any],
    pmap: PrecisionMap | Mapping[str, Any],
    out_dir: str | Path,
    *,
    clip: str = "mse",
    metadata: Mapping[str, Any] | None = None,
    model_dir: str | Path | None = None,
    verify: bool = False,
    qparams: Mapping[str, quant.QParams] | None = None,
    tt_cores: Mapping[str, tt.StoredCores] | None = None,
    act_static: StaticScales | None = None,
) -> Path:
    """Write the artifact of ``pmap`` over ``space`` for ``model`` into ``out_dir`` (layout in the
    module docstring) and return the path of ``model.quant.safetensors``.

    ``model`` holds the *original* (unquantized) weights, as the search had them; it is left as it was.
    ``clip`` must be the clip rule the search used. ``metadata`` (JSON-serialisable: metrics, cost,
    task...) is stored in the file's ``info``. ``model_dir`` names the model's directory, whose
    tokenizer files are copied. Groups missing from the map are stored in full precision.
    ``verify`` quantizes the model a second time with :meth:`ModelAdapter.quantized` and checks every
    stored member against it (twice the time; the exporter uses the very primitives
    :func:`search.quant.fake_quantize` uses, so this guards against the two drifting apart).
    ``qparams`` overrides the scales (and zero points) of integer members, keyed ``"<group>::<i>"``
    (the learned step sizes of :func:`search.refine.refine`, whose ``RefineResult.model`` is then the
    ``model``): those members are quantized with the given parameters instead of the post-training ones;
    each must match its member's rows, bits and symmetry and hold float16 scales. ``verify`` checks
    against the post-training quantizer, so it cannot be combined with ``qparams``.
    ``tt_cores`` gives the cores of tensor-train groups by group name (the trained cores of
    :func:`search.refine.refine`, ``RefineResult.tt_cores``) in place of the TT-SVD of the weights.
    Activation widths (``4a8``): the learned activation steps of a refined student (its modules'
    ``act_step`` parameters, not stored as parameters) and the search's static ranges ``act_static``
    (``Search.act_static``, a search with ``act_scales="static"``) go into the ``activations``
    metadata (:mod:`search.export.activations`); without either the reload rounds per token, as the
    search's default did.
    Raises :class:`InvalidInputError` when the map or the space does not fit the model.
    """
    if qparams and verify:
        raise InvalidInputError("verify checks the post-training quantizer: it cannot be used with qparams", field="verify")
    try:
        info_json = json.dumps(dict(metadata or {}), sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"metadata must be JSON-serialisable: {exc}", field="metadata") from exc
    if model_dir is not None and not Path(model_dir).is_dir():
        raise InvalidInputError(f"model directory {str(model_dir)!r} does not exist", field="model")
    point = quantize_point(model, space, pmap, clip=clip, qparams=qparams, tt_cores=tt_cores)
    space, pmap, modules = point.space, point.pmap, point.modules
    by_module = _members_by_module(space)
    covered = {
        name: _fully_covered(tuple(_weight_view(modules[name]).shape), [m for _, _, m in mem])  # type: ignore[arg-type]
        for name, mem in by_module.items()
    }
    adapter = point.adapter
    stored = point.tensors
    dtypes: dict[str, str] = {}
    for (group, i), codes in point.codes.items():
        qp = point.qparams[(group, i)]
        packed, scale, zero_point = store_codes(codes, qp)
        stored[_qkey(group, i, "codes")] = packed
        stored[_qkey(group, i, "scale")] = scale
        if zero_point is not None:
            stored[_qkey(group, i, "zero_point")] = zero_point

    # Everything else from the model as the search evaluated it, the model restored afterwards.
    with point.applied():
        for g in space.groups:
            opt = pmap.get(g.name, FULL_PRECISION)
            if opt.is_integer or opt.pruned or opt.is_tt:
                continue
            for i, m in enumerate(g.members):
                view = adapter.member_slice(m).detach()
                if opt.bits == 16:
                    half = view.to(torch.float16)
                    keep = half if torch.equal(half.to(view.dtype), view) else view
                else:
                    keep = view
                stored[_qkey(g.name, i, "weight")] = keep.contiguous().cpu().clone()
        # Tied tensors are stored once; ``aliases`` names the others (rebuilt from their canonical name).
        state, aliases = _state_entries(model)
        tt_held = {name for name in by_module if isinstance(modules[name], tt.TTLinear | tt.TTEmbedding)}
        drop = {_state_name(state, _weight(modules[name])) for name in by_module if covered[name] and name not in tt_held}
        drop |= {k for k in state for name in tt_held if k.startswith(f"{name}.cores.")}
        drop |= {k for k in state if k.rsplit(".", 1)[-1] == ACT_STEP}  # stored as activations metadata
        for name in by_module:
            dtypes[name] = str(_weight(modules[name]).dtype).removeprefix("torch.")
        for name, t in state.items():
            if name in drop:
                continue
            if name.startswith(_Q):
                raise InvalidInputError(f"state-dict name {name!r} clashes with the artifact's names", field="model")
            stored[name] = t.detach().contiguous().cpu().clone()
    if verify:
        _verify_against_adapter(adapter, space, pmap, clip, point)

    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "precision_map": json.dumps(pmap.to_dict(), sort_keys=True),
        "space": json.dumps(space_to_dict(space), sort_keys=True),
        "clip": clip,
        "dtypes": json.dumps(dtypes, sort_keys=True),
        "aliases": json.dumps(aliases, sort_keys=True),
        "info": info_json,
    }
    acts = activation_steps_of(model, act_static)
    if acts and any(o.act_bits is not None for o in pmap.values()):
        meta["activations"] = json.dumps(acts.to_dict(), sort_keys=True)
    meta["digest"] = _digest(meta)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / ARTIFACT_FILE
    from safetensors.torch import save_file

    tmp = out / f".{ARTIFACT_FILE}.{os.getpid()}.tmp"
    try:
        save_file(stored, tmp, metadata=meta)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    (out / PRECISION_MAP_FILE).write_text(json.dumps(pmap.to_dict(), indent=2) + "\n")
    shutil.copymode(out / PRECISION_MAP_FILE, target)  # safetensors creates files owner-only
    _write_model_files(model, model_dir, out)
    return target


def _store_cores(
    stored: QuantizedPoint, group: str, w: torch.Tensor, opt: Any, clip: str, given: tt.StoredCores | None
) -> None:
    """The cores of a tensor-train group into ``stored``: codes and scales of integer cores, or the
    cores as such."""
    if given is None:
        given = tt.stored_cores(w, int(opt.tt_rank), opt.bits, symmetric=opt.symmetric, clip=clip)  # type: ignore[arg-type]
    elif given.bits != opt.bits or given.symmetric != opt.symmetric or len(given.cores) != tt.layout(*w.shape).d:
        raise InvalidInputError(f"the cores given for {group!r} do not match its option {opt.key()}", field="tt_cores")
    stored.cores[group] = tuple(c.detach() for c in given.cores)
    for k, core in enumerate(given.cores):
        if given.qparams is not None:
            qp = given.qparams[k]
            codes = quant.quantize(tt.core_matrix(core), qp)
            stored.tensors[_qkey(group, 0, f"tt{k}::codes")] = quant.pack(codes, opt.bits).cpu()
            stored.tensors[_qkey(group, 0, f"tt{k}::scale")] = qp.scale.detach().cpu().to(torch.float16)
            if not opt.symmetric:
                stored.tensors[_qkey(group, 0, f"tt{k}::zero_point")] = qp.zero_point.to(torch.uint8).cpu()
        else:
            keep = core.detach().to(torch.float16) if opt.bits == 16 else core.detach()
            stored.tensors[_qkey(group, 0, f"tt{k}::core")] = keep.contiguous().cpu().clone()


def _load_cores(
    tensors: Mapping[str, torch.Tensor], group: str, shape: tuple[int, int], opt: Any, dtype: torch.dtype, used: set[str]
) -> tt.StoredCores:
    """The cores of a tensor-train group from the file, as the search's quantizer made them (with the
    per-row parameters of integer cores)."""
    lay = tt.layout(*shape)
    cores = []
    qps = []
    for k, cshape in enumerate(lay.core_shapes(int(opt.tt_rank))):
        rows, cols = cshape[0] * cshape[1], cshape[2] * cshape[3]
        if opt.bits >= 16:
            ck = _qkey(group, 0, f"tt{k}::core")
            allowed = (torch.float16, dtype) if opt.bits == 16 else (dtype,)
            cores.append(_expect(tensors, ck, allowed, cshape).to(dtype))
            used.add(ck)
            continue
        ck, sk, zk = (_qkey(group, 0, f"tt{k}::{x}") for x in ("codes", "scale", "zero_point"))
        packed = _expect(tensors, ck, (torch.uint8,), (math.ceil(rows * cols * opt.bits / 8),))
        scale = _expect(tensors, sk, (torch.float16,), (rows,)).to(torch.float32)
        used.update((ck, sk))
        if opt.symmetric:
            zp = torch.zeros(rows, dtype=torch.int32)
        else:
            zp = _expect(tensors, zk, (torch.uint8,), (rows,)).to(torch.int32)
            used.add(zk)
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise _artifact_error(f"tensor {sk!r} holds scales that are not positive and finite")
        codes = quant.unpack(packed, opt.bits, rows * cols, signed=opt.symmetric).view(rows, cols)
        qp = quant.QParams(scale=scale, zero_point=zp, bits=opt.bits, symmetric=opt.symmetric)
        qps.append(qp)
        cores.append(quant.dequantize(codes, qp, dtype=dtype).reshape(cshape))
    symmetric = bool(opt.symmetric) if qps else True
    return tt.StoredCores(int(opt.bits), symmetric, tuple(cores), tuple(qps) if qps else None)


def _stored_integer(
    tensors: Mapping[str, torch.Tensor], group: str, i: int, m: Member, opt: Any, used: set[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, quant.QParams]:
    """Integer member ``i`` of ``group`` as the file holds it, checked (dtypes, shapes, positive finite
    scales): the packed codes, the stored scales, the stored zero points (None when symmetric) and the
    quantization parameters they make; the entries read go into ``used``."""
    rows, cols = _rows_cols(m)
    ck, sk, zk = (_qkey(group, i, x) for x in ("codes", "scale", "zero_point"))
    packed = _expect(tensors, ck, (torch.uint8,), (math.ceil(rows * cols * opt.bits / 8),))
    shape = (rows,) if opt.group_size is None else (rows, cols // opt.group_size)
    stored_scale = _expect(tensors, sk, (torch.float16, torch.float32), shape)
    scale = stored_scale.to(torch.float32)
    used.update((ck, sk))
    stored_zp = None
    if opt.symmetric:
        zp = torch.zeros(shape, dtype=torch.int32)
    else:
        stored_zp = _expect(tensors, zk, (torch.uint8,), shape)
        zp = stored_zp.to(torch.int32)
        used.add(zk)
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise _artifact_error(f"tensor {sk!r} holds scales that are not positive and finite")
    qp = quant.QParams(scale=scale, zero_point=zp, bits=opt.bits, symmetric=opt.symmetric, group_size=opt.group_size)
    return packed, stored_scale, stored_zp, qp


def _stored_member(
    tensors: Mapping[str, torch.Tensor], group: str, i: int, m: Member, opt: Any, used: set[str]
) -> tuple[torch.Tensor, quant.QParams]:
    """The codes (``[rows, cols]``) and scales of integer member ``i`` of ``group`` from the file
    (checked as :func:`_stored_integer` checks them)."""
    packed, _, _, qp = _stored_integer(tensors, group, i, m, opt, used)
    rows, cols = _rows_cols(m)
    return quant.unpack(packed, opt.bits, rows * cols, signed=opt.symmetric).view(rows, cols), qp


def _member_key(group: str, i: int) -> str:
    return f"{group}::{i}"


def _check_qparams(
    qparams: Mapping[str, quant.QParams] | None, space: SearchSpace, pmap: PrecisionMap
) -> dict[str, quant.QParams]:
    """The ``qparams`` overrides of :func:`export_artifact`, checked against the integer members of ``pmap``."""
    if not qparams:
        return {}
    members = {
        _member_key(g.name, i): (m, pmap.get(g.name, FULL_PRECISION)) for g in space.groups for i, m in enumerate(g.members)
    }
    out: dict[str, quant.QParams] = {}
    for key, qp in qparams.items():
        if key not in members:
            raise InvalidInputError(f"qparams names no member of the space: {key!r}", field="qparams")
        m, opt = members[key]
        if not opt.is_integer:
            raise InvalidInputError(f"qparams given for {key!r}, which the map does not quantize to integers", field="qparams")
        if (
            not isinstance(qp, quant.QParams)
            or qp.bits != opt.bits
            or qp.symmetric != opt.symmetric
            or qp.group_size != opt.group_size
        ):
            raise InvalidInputError(f"qparams of {key!r} do not match its option {opt.key()}", field="qparams")
        shape = qp.shape_for((m.out_channels, m.in_features))
        if qp.scale.shape != shape or qp.zero_point.shape != shape:
            raise InvalidInputError(
                f"qparams of {key!r} have shape {tuple(qp.scale.shape)}, expected {shape}", field="qparams"
            )
        scale = qp.scale.detach().to(torch.float32)
        if not bool((scale > 0).all()) or not torch.equal(scale.to(torch.float16).to(torch.float32), scale):
            raise InvalidInputError(f"qparams of {key!r} must hold positive float16 scales", field="qparams")
        out[key] = quant.QParams(scale, qp.zero_point.detach().to(torch.int32), qp.bits, qp.symmetric, qp.group_size)
    return out


def _verify_against_adapter(
    adapter: ModelAdapter, space: SearchSpace, pmap: PrecisionMap, clip: str, stored: QuantizedPoint
) -> None:
    """Every stored member equals the model as :meth:`ModelAdapter.quantized` makes it (a second
    quantization pass: it doubles the export's time)."""
    with torch.no_grad(), adapter.quantized(pmap, space, clip=clip):
        for g in space.groups:
            opt = pmap.get(g.name, FULL_PRECISION)
            if opt.is_tt:
                continue  # the module is a TT module here; its cores are the TT-SVD the export stored
            for i, m in enumerate(g.members):
                view = adapter.member_slice(m).detach()
                if opt.is_integer:
                    want = stored.expected[(g.name, i)]
                elif opt.pruned:
                    want = torch.zeros_like(view)
                else:
                    want = stored.tensors[_qkey(g.name, i, "weight")].to(device=view.device, dtype=view.dtype)
                if not torch.equal(view, want):
                    raise SearchError(
                        f"export self-check failed: member {i} of {g.name} differs from the weights the search evaluates"
                    )


# ------------------------------------------------------------------------------------------ load
@dataclass(frozen=True)
class ArtifactInfo:
    """What an artifact's metadata says: its map, space, clip rule, dtypes, aliases and the caller's info."""

    path: Path
    precision_map: PrecisionMap
    space: SearchSpace
    clip: str
    dtypes: dict[str, str]
    aliases: dict[str, str]
    info: dict[str, Any]
    format_version: int
    #: the frozen activation scales (:mod:`search.export.activations`; empty: per token)
    activations: ActivationSteps = field(default_factory=ActivationSteps)


def _resolve_artifact(path_or_dir: str | Path) -> Path:
    p = Path(path_or_dir)
    if p.is_dir():
        p = p / ARTIFACT_FILE
    if not p.is_file():
        raise _artifact_error(f"no artifact at {str(p)!r} (expected a directory holding {ARTIFACT_FILE} or the file)")
    return p


def _sniff(path: Path) -> None:
    """Refuse pickles and torch checkpoints before any parser sees them: a safetensors file is an
    8-byte little-endian header length followed by a JSON header."""
    with path.open("rb") as f:
        head = f.read(9)
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"
    if head.startswith(b"PK\x03\x04") or (not looks_safetensors and head[:1] == b"\x80"):
        raise _artifact_error(
            f"{path.name} is a pickle or torch checkpoint, not a safetensors artifact; bitscout never loads pickles"
        )
    if not looks_safetensors:
        raise _artifact_error(f"{path.name} is not a safetensors file")
    n = int.from_bytes(head[:8], "little")
    if n > path.stat().st_size - 8:
        raise _artifact_error(f"{path.name} is not a safetensors file (its header runs past the end)")


def _json_meta(meta: Mapping[str, str], key: str) -> Any:
    if key not in meta:
        raise _artifact_error(f"the artifact's metadata lacks {key!r}")
    try:
        return json.loads(meta[key])
    except (TypeError, ValueError) as exc:
        raise _artifact_error(f"the artifact's metadata {key!r} is not valid JSON: {exc}") from exc


def _read_info(path: Path, meta: Mapping[str, str] | None) -> ArtifactInfo:
    if not meta or meta.get("format") != FORMAT:
        raise _artifact_error(
            f"{path.name} is not a bitscout artifact (no '{FORMAT}' metadata; a plain safetensors checkpoint?)"
        )
    version = meta.get("format_version", "")
    if version != str(FORMAT_VERSION):
        raise _artifact_error(
            f"unsupported artifact format version {version!r}: this bitscout reads version {FORMAT_VERSION}"
        )
    if meta.get("digest") != _digest(meta):
        raise _artifact_error(
            "the artifact's metadata does not match its digest: the file was modified after export"
        )
    pmap_data = _json_meta(meta, "precision_map")
    space_data = _json_meta(meta, "space")
    dtypes = _json_meta(meta, "dtypes")
    aliases = _json_meta(meta, "aliases")
    info = _json_meta(meta, "info")
    try:
        pmap = PrecisionMap.from_dict(pmap_data)
        space = space_from_dict(space_data)
    except InvalidInputError as exc:
        raise _artifact_error(f"the artifact's metadata is inconsistent: {exc.message}") from exc
    if not all(isinstance(d, Mapping) for d in (dtypes, aliases, info)):
        raise _artifact_error("the artifact's metadata is inconsistent: dtypes, aliases and info must be objects")
    unknown = [k for k in pmap if k not in space._index]
    if unknown:
        raise _artifact_error(f"the artifact's precision map names groups not in its space: {unknown[:3]}")
    clip = meta.get("clip", "mse")
    acts = ActivationSteps.from_dict(_json_meta(meta, "activations") if "activations" in meta else None)
    return ArtifactInfo(path, pmap, space, clip, dict(dtypes), dict(aliases), dict(info), FORMAT_VERSION, acts)


def artifact_info(path_or_dir: str | Path) -> ArtifactInfo:
    """Read and validate an artifact's metadata (no tensors, no model): its map, space and info."""
    path = _resolve_artifact(path_or_dir)
    _sniff(path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
    except Exception as exc:  # safetensors raises its own error type for malformed files
        raise _artifact_error(f"{path.name} is not a valid safetensors file: {exc}") from exc
    return _read_info(path, meta)


def _expect(tensors: Mapping[str, torch.Tensor], key: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...]) -> torch.Tensor:
    t = tensors.get(key)
    if t is None:
        raise _artifact_error(f"the artifact lacks tensor {key!r}")
    if t.dtype not in dtypes or tuple(t.shape) != shape:
        raise _artifact_error(
            f"tensor {key!r} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, expected "
            f"{' or '.join(str(d).removeprefix('torch.') for d in dtypes)} {list(shape)}"
        )
    return t


def _rows_cols(m: Member) -> tuple[int, int]:
    return m.out_channels, m.in_features


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for malformed files
        raise _artifact_error(f"{path.name} is not a valid safetensors file: {exc}") from exc


@dataclass(frozen=True)
class StoredQuantization:
    """What an artifact stores of its quantization (:func:`read_quantization`): ``codes`` of every
    integer member (``[rows, cols]``, int8 when symmetric, uint8 when asymmetric) keyed ``(group,
    member index)``; ``qparams``: their scales and zero points keyed ``"<group>::<i>"``, the
    ``qparams`` of :func:`export_artifact` and :func:`quantize_point`; ``tt_cores``: every tensor-train
    group's cores, their ``tt_cores``."""

    info: ArtifactInfo
    codes: dict[tuple[str, int], torch.Tensor]
    qparams: dict[str, quant.QParams]
    tt_cores: dict[str, tt.StoredCores]


def read_quantization(path_or_dir: str | Path) -> StoredQuantization:
    """The codes, scales, zero points and tensor-train cores an artifact stores, read and checked as
    :func:`load_artifact` reads them (no model). Handing its ``qparams`` and ``tt_cores`` to
    :func:`quantize_point` over a model the artifact was loaded onto gives back the stored codes: the
    loaded weights are ``(codes - zero_point) * scale``, which the given scales round to the same codes.
    Raises :class:`InvalidInputError` (``field="artifact"``) as :func:`load_artifact` does."""
    info = artifact_info(path_or_dir)
    tensors = _load_tensors(info.path)
    out = StoredQuantization(info, {}, {}, {})
    used: set[str] = set()
    for g in info.space.groups:
        opt = info.precision_map.get(g.name, FULL_PRECISION)
        if opt.is_tt:
            m = g.members[0]
            dtype = getattr(torch, info.dtypes.get(m.module, "float32"), torch.float32)
            out.tt_cores[g.name] = _load_cores(tensors, g.name, m.shape, opt, dtype, used)
        elif opt.is_integer:
            for i, m in enumerate(g.members):
                codes, qp = _stored_member(tensors, g.name, i, m, opt, used)
                out.codes[(g.name, i)] = codes
                out.qparams[_member_key(g.name, i)] = qp
    return out


@torch.no_grad()
def load_artifact(path_or_dir: str | Path, model: nn.Module, *, materialize: bool = True) -> nn.Module:
    """Rebuild the quantized weights of an artifact onto ``model`` (same architecture, e.g. loaded from
    the original config or the user's own model object) and return it, in place.

    ``materialize`` True writes them into the model's float weights; False builds packed modules
    (:mod:`search.export.packed`) straight from the file's codes, scales and float slices, wherever one
    fits (floats elsewhere): no float copy of a packed matrix is made, and the model's own float weight
    goes with the module it replaces.
    The result is bit-identical to the search's fake-quantized model when ``model`` has the dtype the
    artifact was exported from. Raises :class:`InvalidInputError` (``field="artifact"``) for a file that
    is not a bitscout safetensors artifact (pickles are refused unread), an unknown format version,
    edited metadata, missing or malformed tensors, and names or shapes that do not fit ``model``.
    """
    info = artifact_info(path_or_dir)
    tensors = _load_tensors(info.path)
    space, pmap = info.space, info.precision_map
    refuse_packed(model)
    modules = _check_fits(model, space, field="artifact")
    by_module = _members_by_module(space)
    state = model.state_dict(keep_vars=True)
    holders = {} if materialize else holders_of(model)

    # Which file entries the map calls for, checked before anything is written.
    used: set[str] = set()
    rebuilt: dict[str, torch.Tensor] = {}
    packs: dict[str, tuple[PackedWeight, list[tuple[str, nn.Module]]]] = {}
    covered: dict[str, bool] = {}
    for name, members in by_module.items():
        w = _weight_view(modules[name])
        covered[name] = _fully_covered(tuple(w.shape), [m for _, _, m in members])  # type: ignore[arg-type]
        want = info.dtypes.get(name)
        dtype = w.dtype
        if want is not None and want != str(dtype).removeprefix("torch."):
            log.warning(
                "%s is %s in the model but was exported from %s: its outputs will not be bit-identical",
                name, str(dtype).removeprefix("torch."), want,
            )
            dtype = getattr(torch, want, dtype)
        hold = None if materialize else _packable_here(name, members, modules, holders, state, info, pmap)
        if hold is not None:
            packs[name] = (new_packed_weight(modules[name], dtype), hold)
        else:
            rebuilt[name] = torch.zeros(tuple(w.shape), dtype=dtype)
    tt_groups: dict[str, list[torch.Tensor]] = {}
    for g in space.groups:
        opt = pmap.get(g.name, FULL_PRECISION)
        if opt.is_tt:
            m = g.members[0]
            tt_groups[g.name] = list(_load_cores(tensors, g.name, m.shape, opt, rebuilt[m.module].dtype, used).cores)
            continue
        for i, m in enumerate(g.members):
            rows, cols = _rows_cols(m)
            pack = packs[m.module][0] if m.module in packs else None
            target = None if pack is not None else _member_view(rebuilt[m.module], m)
            if opt.pruned:
                if pack is not None:
                    pack.add_zero(m)
                continue
            if opt.is_integer:
                if pack is not None:  # the file's codes as they are: no float copy
                    packed, stored_scale, stored_zp, _ = _stored_integer(tensors, g.name, i, m, opt, used)
                    pack.add_integer(m, opt, packed, stored_scale, stored_zp)
                    continue
                codes, qp = _stored_member(tensors, g.name, i, m, opt, used)
                target.copy_(quant.dequantize(codes, qp, dtype=target.dtype))
            else:
                wk = _qkey(g.name, i, "weight")
                dtype = pack.source_dtype if pack is not None else target.dtype  # type: ignore[union-attr]
                allowed = (torch.float16, dtype) if opt.bits == 16 else (dtype,)
                stored = _expect(tensors, wk, allowed, (rows, cols))
                used.add(wk)
                if pack is not None:
                    pack.add_float(m, stored)
                else:
                    target.copy_(stored.to(target.dtype))  # type: ignore[union-attr]

    # The float part: the state dict minus the covered weights, tied names stored once.
    covered_names = {_state_name(state, _weight(modules[name])) for name, full in covered.items() if full}
    covered_ids = {id(state[n]) for n in covered_names}
    extra_q = sorted(k for k in tensors if k.startswith(_Q) and k not in used)
    if extra_q:
        raise _artifact_error(f"the artifact holds tensors its precision map does not use: {extra_q[:3]}")
    float_keys = [k for k in tensors if not k.startswith(_Q)]
    for k in float_keys:
        if k not in state:
            raise _artifact_error(f"the artifact's parameter {k!r} is not in the model (a different architecture?)")
        if tuple(tensors[k].shape) != tuple(state[k].shape):
            raise _artifact_error(
                f"{k} has shape {list(tensors[k].shape)} in the artifact but {list(state[k].shape)} in the "
                "model (a different architecture or size?)"
            )
    present = set(float_keys)
    sources: dict[str, str] = {}  # model name not stored under its own name -> the stored (or rebuilt) name
    missing = []
    for k, t in state.items():
        if k in present or k in covered_names:
            continue
        canon = info.aliases.get(k)
        if canon is not None and (canon in present or canon in covered_names):
            sources[k] = canon
        elif id(t) in covered_ids:
            continue  # tied to a rebuilt weight in this model
        else:
            missing.append(k)
    if missing:
        raise _artifact_error(
            f"the model has parameters the artifact lacks: {missing[:3]} (a different architecture or task head?)"
        )

    # Everything checked: write.
    for k in float_keys:
        state[k].data.copy_(tensors[k])
    for name, w in rebuilt.items():
        view = _weight_view(modules[name]).data
        if covered[name]:
            view.copy_(w)
        else:
            for _, _, m in by_module[name]:
                _member_view(view, m).copy_(_member_view(w, m))
    for alias, canon in sources.items():
        if state[alias] is not state[canon]:  # tied in the exported model, not in this one
            state[alias].data.copy_(state[canon].data)
    if tt_groups:  # the TT module in each tensor-train group's place, with the module's (loaded) bias
        adapter = ModelAdapter(model)
        for g in space.groups:
            if g.name in tt_groups:
                name = g.members[0].module
                w = _weight_view(modules[name])
                cores = [c.to(w.device) for c in tt_groups[g.name]]
                adapter.swap_module(name, adapter.tt_module(g, pmap[g.name], info.clip, cores=cores))
    # activation hooks first: hooks on a module move with it when a packed module takes its place
    install_activation_hooks(model, space, pmap, info.activations)
    mapped = any(maps_a_file(modules[name]) for name in packs)
    for pw, hold in packs.values():  # last: the holders take the modules' loaded biases
        install(model, pw, hold)
    if mapped:
        release_mapping(model)
    return model


def _packable_here(
    name: str,
    members: list[tuple[Any, int, Member]],
    modules: Mapping[str, nn.Module],
    holders: Mapping[int, list[tuple[str, nn.Module]]],
    state: Mapping[str, torch.Tensor],
    info: ArtifactInfo,
    pmap: PrecisionMap,
) -> list[tuple[str, nn.Module]] | None:
    """The holders to replace by a packed module for ``name`` (None: rebuild it in float): not a
    tensor-train group, not all at 32 bits, and no name tied to it in the exported model that this
    model holds apart (that copy is written in float)."""
    opts = [pmap.get(g.name, FULL_PRECISION) for g, _, _ in members]
    if any(o.is_tt for o in opts) or all(o.unchanged for o in opts):
        return None
    module = modules[name]
    weight = _weight(module)
    own = _state_name(state, weight)
    if any(canon == own and state.get(alias) is not weight for alias, canon in info.aliases.items()):
        return None
    return packable(holders, module, [m for _, _, m in members])

