"""The compressed-tensors checkpoint (format ``compressed-tensors``): a point written with the
``compressed-tensors`` package's own config classes and packer, loadable by plain transformers
(``AutoModel*.from_pretrained(DIR)`` with ``compressed-tensors`` installed) to the same outputs as
:meth:`search.adapter.ModelAdapter.quantized`, and by the inference engines that read the format.

Layout
======

* ``model.safetensors`` (from the model's own ``save_pretrained``): every module written with a
  symmetric grid holds ``weight_packed`` (int32: the codes packed by compressed-tensors'
  ``pack-quantized`` compressor), ``weight_scale`` (the model's dtype) and ``weight_shape``; every
  module with an asymmetric grid holds ``weight`` (int8 codes, compressed-tensors' ``naive-quantized``
  compressor), ``weight_scale`` and ``weight_zero_point`` (int8). Every other tensor is the model as the
  search evaluated it (:mod:`search.export.dense`);
* ``config.json`` carrying ``quantization_config`` (``quant_method: compressed-tensors``, format
  ``pack-quantized``, or ``mixed-precision`` when asymmetric modules are present): one config group
  (``group_0``, ``group_1``...) per distinct scheme, each a ``QuantizationScheme`` whose ``targets``
  are the exact module names it covers, whose ``format`` is its compressor's and whose ``weights`` are
  ``QuantizationArgs(num_bits, type="int", symmetric, strategy, group_size)``; ``ignore`` lists every
  other ``Linear`` module (kept in floating point);
* the tokenizer files, ``precision_map.json`` and ``export.json`` (the report and the caller's metadata).

Why asymmetric modules are not packed: transformers builds a compressed-tensors model on the meta
device, where the ``pack-quantized`` compressor leaves zero points unpacked, so the packed zero points
of an asymmetric ``pack-quantized`` checkpoint do not fit and ``from_pretrained`` fails
(compressed-tensors 0.20, transformers 5). ``naive-quantized`` loads, exactly, at a byte a code.

Our options as schemes
======================

==============================  ===============================================================================
bitscout                        compressed-tensors
==============================  ===============================================================================
per-row scales (``4``)          ``strategy: channel`` (``weight_scale`` ``[rows, 1]``)
``4g128``                       ``strategy: group``, ``group_size: 128`` (``weight_scale`` ``[rows, cols/128]``)
per-row scales on column        ``strategy: group`` with the block's width (at ``group`` granularity the output
blocks of one width             projection's heads are column blocks with their own per-row scales)
symmetric codes                 the same codes (``-(2^(b-1)-1) .. 2^(b-1)-1`` lie in the format's signed range),
                                no zero point
asymmetric codes ``u`` and      ``u - 2^(b-1)`` and ``z - 2^(b-1)`` (the format's signed range): ``(q - z)`` is
zero points ``z`` (unsigned)    unchanged, so ``(q - z) * scale`` is the same number
float16-valued scales           stored in the model's dtype: exact for float32 and float16 models, and for
                                bfloat16 ones, whose scales are numbers of both types
                                (:func:`search.quant.round_scale`); scales that are not numbers of the model's
                                dtype (an artifact of another dtype) are rounded, a warning names the modules
pruned groups                   zero codes (and a zero zero point) with the smallest float16 scale inside an
                                integer module; a module pruned whole is written as zeros in floating point
16 / 32 bits                    floating point, the module in ``ignore``
==============================  ===============================================================================

What it cannot express, written dense in that module with a warning in the report (the values are
still the search's, so the reload stays exact): several options inside one module (``group``
granularity with heads at different widths), per-row scales on column blocks of different widths,
tensor-train options (their dense matrix, to float rounding), modules that are not ``torch.nn.Linear``
(embeddings: transformers fails to initialise a compressed ``Embedding``; GPT-2's ``Conv1D``), a weight tied to another module (an embedding shared with the
output layer). Activation widths (``4a8``) are not written: compressed-tensors'
int8 activations take ``amax / 127.5`` with codes ``-128..127`` where bitscout rounds with ``amax / 127``
on ``-127..127``, so no scheme reproduces them exactly; the weights are written as the option's
weight-only scheme (W4A16) and the report names the modules. Static activation scales are not part of
a search result, so they could not be written either.

Engines
=======

The report's ``quantized`` groups are stored packed at 4 or 8 bits with a symmetric grid: what the
W4A16 / W8A16 weight kernels of engines that read compressed-tensors (vLLM, among others) run.
``no_kernel`` groups are stored as integers at other widths, or with an asymmetric grid (one int8 a
code): transformers dequantizes them on load, such an engine refuses them or runs them unquantized.
Engines fuse q/k/v and gate/up into one matrix and need one scheme for the fused set: a map searched
with ties (``--tie qkv,gate_up``) always has it; otherwise the report warns about each fused set whose
modules are written with different schemes.

The reloaded weights are the search's bit for bit. bitscout evaluates with eager attention
(:func:`search.tasks.load_model`) where ``from_pretrained`` defaults to PyTorch's fused attention:
pass ``attn_implementation="eager"`` for the search's logits; PyTorch's CPU matmul also rounds by
the memory alignment of the weights, which a load from another file changes
(``docs/methods/export.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitscout.formats import COMPRESSED_TENSORS
from search import quant
from search.errors import InvalidInputError, SearchError
from search.export.artifact import QuantizedPoint, quantize_point
from search.export.common import _fully_covered, _members_by_module, _weight_view
from search.export.dense import (
    activation_warnings,
    check_saveable,
    group_lists,
    save_checkpoint,
    write_side_files,
)
from search.export.formats import ExportReport, written_files
from search.space import BitOption, Group, Member, PrecisionMap, SearchSpace

__all__ = ["write_compressed_tensors"]

#: Integer widths inference engines ship weight kernels for (W4A16, W8A16).
KERNEL_BITS = (4, 8)
#: The compressed-tensors format of symmetric integer modules: codes packed into int32 words.
PACK_FORMAT = "pack-quantized"
#: The format of asymmetric ones: one int8 a code, zero points unpacked. transformers builds the modules
#: of a checkpoint on the meta device, where ``pack-quantized`` leaves zero points unpacked, so an
#: asymmetric ``pack-quantized`` checkpoint does not load (its packed zero points have another shape).
NAIVE_FORMAT = "naive-quantized"


@dataclass(frozen=True)
class _Scheme:
    """How one module is written: its integer option and the format's group width (None: channel)."""

    option: BitOption
    group_size: int | None


def _check_library() -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise InvalidInputError(
            "format compressed-tensors needs the compressed-tensors package: pip install 'bitscout[compressed-tensors]'",
            field="format",
        ) from None


def _compressor(scheme: _Scheme) -> Any:
    """The compressor class of the scheme's format, from compressed-tensors' own registry."""
    from compressed_tensors.compressors import BaseCompressor

    return BaseCompressor.get_value_from_registry(_format(scheme))


def _tied(model: nn.Module) -> dict[str, list[str]]:
    """Module name → the other modules holding the same weight tensor (tied embeddings)."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor):
            holders.setdefault(w.data_ptr(), []).append(name)
    return {n: [o for o in names if o != n] for names in holders.values() for n in names if len(names) > 1}


def _scheme_of(
    point: QuantizedPoint, module: nn.Module, members: list[tuple[Group, int, Member]], tied: list[str]
) -> tuple[_Scheme | None, str | None]:
    """The scheme module ``name`` is written with, or None (floating point) and why, when that is not
    how its options ask to be stored."""
    opts = [point.option(g.name) for g, _, _ in members]
    if any(o.is_tt for o in opts):
        return None, "tensor-train option: written as the dense matrix of its cores (outputs agree to float rounding)"
    weights = {o.weight_only for o in opts if o.is_integer}
    if not weights:
        return None, None  # 16/32 bits or pruned: floating point is how the search stored it
    if not isinstance(module, nn.Linear):
        return None, (
            f"transformers loads compressed-tensors Linear modules only, not {type(module).__name__} (a compressed "
            "Embedding fails its weight initialisation): written dense"
        )
    if tied:
        return None, f"its weight is tied to {', '.join(tied)}, which reads it as a plain weight: written dense"
    if not _fully_covered(tuple(_weight_view(module).shape), [m for _, _, m in members]):  # type: ignore[arg-type]
        return None, "the space covers part of this matrix only: written dense"
    floats = sorted({o.key() for o in opts if not o.is_integer and not o.pruned})
    if len(weights) > 1 or floats:
        keys = sorted({o.key() for o in weights} | set(floats))
        return None, f"options {', '.join(keys)} inside one module: compressed-tensors holds one scheme a module; written dense"
    (opt,) = weights
    axes = {m.axis for _, _, m in members}
    if axes <= {"out", "all"}:
        return _Scheme(opt, opt.group_size), None
    if axes == {"in"}:
        if opt.group_size is not None:
            return _Scheme(opt, opt.group_size), None
        widths = {int(m.stop) - m.start for _, _, m in members}  # type: ignore[operator]
        if len(widths) == 1:
            return _Scheme(opt, widths.pop()), None
        return None, "per-row scales on column blocks of different widths: written dense"
    return None, "members on both axes of one matrix: written dense"


def _module_tensors(
    point: QuantizedPoint,
    scheme: _Scheme,
    module: nn.Module,
    members: list[tuple[Group, int, Member]],
) -> tuple[dict[str, torch.Tensor], bool]:
    """The module's compressed tensors: codes, scales and zero points of every member assembled into the
    whole matrix in the format's convention, then packed by compressed-tensors' own compressor; and
    whether the scales are exact in the model's dtype."""
    from compressed_tensors.quantization import QuantizationScheme

    opt = scheme.option
    rows, cols = (int(x) for x in _weight_view(module).shape)
    width = scheme.group_size or cols
    offset = 0 if opt.symmetric else 2 ** (opt.bits - 1)
    codes = torch.zeros(rows, cols, dtype=torch.int16)
    scale = torch.full((rows, cols // width), quant.SCALE_EPS, dtype=torch.float32)
    zero = torch.zeros(rows, cols // width, dtype=torch.int16)
    for g, i, m in members:
        if point.option(g.name).pruned:
            continue  # zero codes on a zero zero point: the group's weights are zeros
        qp = point.qparams[(g.name, i)]
        c = point.codes[(g.name, i)].to(torch.int16)
        s = qp.scale.detach().cpu().to(torch.float32).reshape(c.shape[0], -1)
        z = qp.zero_point.detach().cpu().to(torch.int16).reshape(c.shape[0], -1)
        if s.shape[1] != c.shape[1] // width:  # per-row scales of a column block of `width` columns
            s, z = s.reshape(c.shape[0], 1), z.reshape(c.shape[0], 1)
        if m.axis == "in":
            codes[:, m.start : m.stop] = c
            scale[:, m.start // width : int(m.stop) // width] = s  # type: ignore[operator]
            zero[:, m.start // width : int(m.stop) // width] = z  # type: ignore[operator]
        else:
            r = slice(m.start, m.stop) if m.axis == "out" else slice(None)
            codes[r], scale[r], zero[r] = c, s, z
    q = (codes - offset).to(torch.int8)  # the format's signed codes: (q - z) is unchanged
    zp = (zero - offset).to(torch.int8)
    # The dequantized weight the packer reads back into these very codes: (q - z) * s is exact in float32.
    w = ((q.to(torch.float32) - zp.to(torch.float32).repeat_interleave(width, dim=1))
         * scale.repeat_interleave(width, dim=1))
    local: dict[str, torch.Tensor] = {"weight": w, "weight_scale": scale}
    if not opt.symmetric:
        local["weight_zero_point"] = zp
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=_args(scheme), format=_format(scheme))
    packed = dict(_compressor(scheme).compress(local, ct_scheme))
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    kept = (
        packed["weight"] if "weight" in packed
        else unpack_from_int32(packed["weight_packed"], opt.bits, torch.Size((rows, cols)))
    )
    if not torch.equal(kept, q):
        raise SearchError("compressed-tensors' packer did not keep the codes of the search: export refused")
    stored = packed["weight_scale"].to(_weight_view(module).dtype)
    packed["weight_scale"] = stored
    return packed, bool(torch.equal(stored.to(torch.float32), scale.reshape(stored.shape)))


def _format(scheme: _Scheme) -> str:
    return PACK_FORMAT if scheme.option.symmetric else NAIVE_FORMAT


def _args(scheme: _Scheme) -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    opt = scheme.option
    if scheme.group_size is None:
        return QuantizationArgs(num_bits=opt.bits, type="int", symmetric=opt.symmetric, strategy="channel")
    return QuantizationArgs(
        num_bits=opt.bits, type="int", symmetric=opt.symmetric, strategy="group", group_size=scheme.group_size
    )


def _sibling_warnings(point: QuantizedPoint, labels: Mapping[str, str]) -> list[str]:
    """Engines fuse q/k/v and gate/up: one line per fused set whose modules are written differently."""
    out = []
    for kind, names in point.adapter.find_siblings():
        written = {labels.get(n, "dense") for n in names}
        if len(written) > 1:
            out.append(
                f"{', '.join(names)} ({kind}) are written with different schemes: engines that fuse them "
                "(vLLM) need one; search with --tie qkv,gate_up"
            )
    return out


def write_compressed_tensors(
    model: nn.Module,
    space: SearchSpace,
    pmap: PrecisionMap,
    out_dir: Path,
    *,
    clip: str,
    metadata: Mapping[str, Any] | None,
    model_dir: str | Path | None,
    qparams: Mapping[str, Any] | None = None,
    tt_cores: Mapping[str, Any] | None = None,
    **extra: Any,
) -> ExportReport:
    """The writer of format ``compressed-tensors`` (:data:`search.export.formats.WRITERS`): the checkpoint
    described in the module docstring. ``qparams`` / ``tt_cores`` as in
    :func:`search.export.export_artifact` (a refined point); other ``extra`` (``verify``) is ignored.
    Raises :class:`InvalidInputError` (field ``format``) without the compressed-tensors package, (field
    ``model``) for a model transformers cannot save, and what :func:`quantize_point` raises."""
    _check_library()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    check_saveable(model)
    point = quantize_point(model, space, pmap, clip=clip, qparams=qparams, tt_cores=tt_cores)
    warnings = activation_warnings(point)
    schemes: dict[_Scheme, list[str]] = {}
    replace: dict[str, dict[str, torch.Tensor]] = {}
    stored: dict[str, bool] = {}
    tied = _tied(point.adapter.model)
    for name, members in _members_by_module(point.space).items():
        module = point.modules[name]
        scheme, why = _scheme_of(point, module, members, tied.get(name, []))
        if why is not None:
            warnings.append(f"{name}: {why}")
        if scheme is None:
            continue
        dtype = _weight_view(module).dtype
        tensors, exact = _module_tensors(point, scheme, module, members)
        if not exact:
            warnings.append(f"{name}: float16 scales rounded to {str(dtype).removeprefix('torch.')}, the model's dtype")
        replace[name] = tensors
        schemes.setdefault(scheme, []).append(name)
        stored[name] = scheme.option.symmetric and scheme.option.bits in KERNEL_BITS
    labels = {}
    config_groups = {}
    for k, (scheme, names) in enumerate(sorted(schemes.items(), key=lambda kv: (kv[0].option, kv[0].group_size or 0))):
        config_groups[f"group_{k}"] = QuantizationScheme(targets=names, weights=_args(scheme), format=_format(scheme))
        labels.update(dict.fromkeys(names, f"group_{k}"))
    warnings.extend(_sibling_warnings(point, labels))
    ignore = sorted(n for n, m in point.adapter.model.named_modules() if isinstance(m, nn.Linear) and n not in labels)

    path = save_checkpoint(point, out_dir, model_dir=model_dir, replace=replace)
    if config_groups:
        formats = {g.format for g in config_groups.values()}
        config = QuantizationConfig(
            config_groups=config_groups,
            format=formats.pop() if len(formats) == 1 else "mixed-precision",
            quantization_status="compressed",
            ignore=ignore,
        )
        ModelCompressor(quantization_config=config).update_config(str(out_dir))
    else:
        warnings.append("no module is written as integers: the checkpoint is a plain one, without quantization_config")
    lists = group_lists(point, stored)
    report = ExportReport(format=COMPRESSED_TENSORS, path=path, files=(), warnings=tuple(warnings), **lists)
    write_side_files(out_dir, report, point.pmap, metadata)
    return ExportReport(
        format=COMPRESSED_TENSORS, path=path, files=written_files(out_dir), warnings=tuple(warnings), **lists
    )

