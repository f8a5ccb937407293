"""Quantized artifacts: export a precision map as packed integer weights, load it back bit for bit,
apply a map to a user's model, and map what torchao can express onto its per-module configs.

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
  ``quant::<group>::<i>::scale``              float16 ``[rows]``: the per-row scales (float32 only
                                              if a scale is not a float16 value, which the search's
                                              quantizer never produces: see below)
  ``quant::<group>::<i>::zero_point``         uint8 ``[rows]``, asymmetric options only
  ``quant::<group>::<i>::weight``             the member slice as float16 (16-bit groups) or in the
                                              model's dtype (32-bit groups)
  (nothing)                                   pruned groups: their weights are zeros
  ``<state-dict name>``                       every other parameter and buffer, in its own dtype:
                                              the state dict minus the weights the groups cover
                                              (biases of pruned groups are stored zeroed)
  ==========================================  ====================================================

  and, as string metadata: ``format`` (``bitscout.quant``), ``format_version``, ``precision_map``
  and ``space`` (JSON: :meth:`PrecisionMap.to_dict`, :func:`search.space.space_to_dict`), ``clip``,
  ``dtypes`` (each covered weight's dtype), ``aliases`` (tied state-dict names stored once),
  ``info`` (the caller's ``metadata``) and ``digest`` (SHA-256 of the other entries, so an edited
  header is refused with a clear message);
* ``precision_map.json``: the map alone, group name → ``{"bits", "symmetric"}``. Group names are the
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
the scale and 1 more for an asymmetric zero point. ``export_artifact(..., verify=True)`` also checks
every stored member against the model quantized by :meth:`ModelAdapter.quantized` before writing.

Size: the file's tensors take exactly :class:`search.cost.CostModel`'s ``size_bytes`` plus 4 bytes
for every bias entry of a pruned group (the file keeps whole bias vectors, zeroed rows included,
where the cost model counts those entries as removed), and the file adds its JSON header (names and
metadata; about 37 kB for MiniLM at ``layer`` granularity, 276 kB at ``group``).

Quantization is deterministic, but floating-point sums may differ between devices: export on the
device type the search ran on (CPU by default) for bit-exactness. Loading onto a model of another
dtype casts the weights (a warning says the outputs are no longer bit-identical).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search import quant
from search.adapter import ModelAdapter, _is_conv1d
from search.errors import InvalidInputError, SearchError
from search.space import (
    FULL_PRECISION,
    BitOption,
    Group,
    Member,
    PrecisionMap,
    SearchSpace,
    space_from_dict,
    space_to_dict,
)

log = logging.getLogger(__name__)

__all__ = [
    "ARTIFACT_FILE",
    "ArtifactInfo",
    "FORMAT",
    "FORMAT_VERSION",
    "PRECISION_MAP_FILE",
    "TorchaoConfig",
    "apply_precision_map",
    "artifact_info",
    "export_artifact",
    "load_artifact",
    "to_torchao_config",
    "torchao_unsupported",
]

FORMAT = "bitscout.quant"
#: Version of the artifact layout this module writes and reads.
FORMAT_VERSION = 1
ARTIFACT_FILE = "model.quant.safetensors"
PRECISION_MAP_FILE = "precision_map.json"
_Q = "quant::"
#: Metadata entries the digest covers (everything but the digest itself).
_SIGNED = ("format", "format_version", "precision_map", "space", "clip", "dtypes", "aliases", "info")
#: Files of a model directory copied next to the artifact: tokenizer and generation settings
#: (weights never are; ``config.json`` is written from ``model.config`` when the model has one).
_COPY_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template*",
    "preprocessor_config.json",
)


def _artifact_error(message: str) -> InvalidInputError:
    return InvalidInputError(message, field="artifact")


def _qkey(group: str, i: int, what: str) -> str:
    return f"{_Q}{group}::{i}::{what}"


# --------------------------------------------------------------------------------------- helpers
def _as_pmap(pmap: PrecisionMap | Mapping[str, Any]) -> PrecisionMap:
    return pmap if isinstance(pmap, PrecisionMap) else PrecisionMap.from_dict(pmap)


def _as_space(space: SearchSpace | Mapping[str, Any]) -> SearchSpace:
    if isinstance(space, SearchSpace):
        return space
    if isinstance(space, Mapping):
        # SearchResult.space holds Search.space_dict(): {"space": ..., "cost_model": ...}
        inner = space.get("space") if "groups" not in space else space
        if isinstance(inner, Mapping):
            return space_from_dict(inner)
    raise InvalidInputError("space must be a SearchSpace or a serialised one (space_to_dict)", field="space")


def _weight(module: nn.Module) -> torch.Tensor:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise InvalidInputError(f"{type(module).__name__} has no weight tensor", field="model")
    return w


def _weight_view(module: nn.Module) -> torch.Tensor:
    """The module's weight as an ``[out, in]`` view (GPT-2's Conv1D is stored transposed)."""
    w = _weight(module)
    return w.t() if _is_conv1d(module) else w


def _member_view(weight: torch.Tensor, m: Member) -> torch.Tensor:
    if m.axis == "out":
        return weight[m.start : m.stop]
    if m.axis == "in":
        return weight[:, m.start : m.stop]
    return weight


def _members_by_module(space: SearchSpace) -> dict[str, list[tuple[Group, int, Member]]]:
    out: dict[str, list[tuple[Group, int, Member]]] = {}
    for g in space.groups:
        for i, m in enumerate(g.members):
            out.setdefault(m.module, []).append((g, i, m))
    return out


def _check_fits(model: nn.Module, space: SearchSpace, *, field: str) -> dict[str, nn.Module]:
    """Every module the space names exists with a 2-d weight of the recorded ``[out, in]`` shape."""
    modules = dict(model.named_modules())
    for name, members in _members_by_module(space).items():
        module = modules.get(name)
        w = getattr(module, "weight", None) if module is not None else None
        if module is None or not isinstance(w, torch.Tensor) or w.ndim != 2:
            raise InvalidInputError(
                f"the model has no weight matrix named {name!r} (a different architecture?)", field=field
            )
        shape = tuple(_weight_view(module).shape)
        want = members[0][2].shape
        if shape != tuple(want):
            raise InvalidInputError(
                f"{name} has a weight of shape {list(shape)} in the model but {list(want)} in the "
                f"{'artifact' if field == 'artifact' else 'space'} (a different architecture or size?)",
                field=field,
            )
    return modules


def _fully_covered(shape: tuple[int, int], members: Sequence[Member]) -> bool:
    """Whether the members tile the whole matrix (each weight once)."""
    count = torch.zeros(shape, dtype=torch.int16)
    for m in members:
        _member_view(count, m).add_(1)
    return bool((count == 1).all())


def _digest(meta: Mapping[str, str]) -> str:
    canonical = json.dumps({k: meta.get(k) for k in _SIGNED}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _state_entries(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with tied tensors stored once: ``(canonical name → tensor, alias → canonical)``."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor):
            continue
        key = id(t)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            tensors[name] = t
    return tensors, aliases


# ---------------------------------------------------------------------------------------- export
@dataclass
class _Stored:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    expected: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)


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
    Raises :class:`InvalidInputError` when the map or the space does not fit the model.
    """
    space = _as_space(space)
    pmap = _as_pmap(pmap)
    unknown = [k for k in pmap if k not in space._index]
    if unknown:
        raise InvalidInputError(f"the precision map names groups not in the space: {unknown[:3]}", field="precision_map")
    overrides = _check_qparams(qparams, space, pmap)
    if overrides and verify:
        raise InvalidInputError("verify checks the post-training quantizer: it cannot be used with qparams", field="verify")
    if clip not in ("mse", "minmax"):
        raise InvalidInputError(f"clip must be 'mse' or 'minmax', got {clip!r}", field="clip")
    try:
        info_json = json.dumps(dict(metadata or {}), sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"metadata must be JSON-serialisable: {exc}", field="metadata") from exc
    if model_dir is not None and not Path(model_dir).is_dir():
        raise InvalidInputError(f"model directory {str(model_dir)!r} does not exist", field="model")
    modules = _check_fits(model, space, field="space")
    by_module = _members_by_module(space)
    covered = {
        name: _fully_covered(tuple(_weight_view(modules[name]).shape), [m for _, _, m in mem])  # type: ignore[arg-type]
        for name, mem in by_module.items()
    }
    adapter = ModelAdapter(model)
    stored = _Stored()
    dtypes: dict[str, str] = {}

    # Codes and scales from the original weights, exactly as quant.fake_quantize computes them.
    with torch.no_grad():
        for g in space.groups:
            opt = pmap.get(g.name, FULL_PRECISION)
            if not opt.is_integer:
                continue
            for i, m in enumerate(g.members):
                block = adapter.member_slice(m).detach()
                qp = overrides.get(_member_key(g.name, i)) or quant.choose_qparams(
                    block, opt.bits, symmetric=opt.symmetric, clip=clip  # type: ignore[arg-type]
                )
                if qp.scale.device != block.device:
                    qp = quant.QParams(qp.scale.to(block.device), qp.zero_point.to(block.device), qp.bits, qp.symmetric)
                codes = quant.quantize(block, qp)
                stored.tensors[_qkey(g.name, i, "codes")] = quant.pack(codes, opt.bits).cpu()
                scale = qp.scale.detach().cpu()
                half = scale.to(torch.float16)
                exact = bool(torch.equal(half.to(torch.float32), scale))
                stored.tensors[_qkey(g.name, i, "scale")] = half if exact else scale.clone()
                if not opt.symmetric:
                    stored.tensors[_qkey(g.name, i, "zero_point")] = qp.zero_point.to(torch.uint8).cpu()
                stored.expected[(g.name, i)] = quant.dequantize(codes, qp, dtype=block.dtype)

    # Everything else from the model as the search evaluated it: the integer members written from the
    # codes above, the other groups by the adapter itself (pruned groups and their biases zeroed,
    # 16-bit groups rounded), the model restored afterwards.
    touched = list(dict.fromkeys(n for g in space.groups if pmap.get(g.name, FULL_PRECISION).bits != 32 for n in g.modules))
    saved = adapter.snapshot(touched)
    try:
        with torch.no_grad():
            for g in space.groups:
                opt = pmap.get(g.name, FULL_PRECISION)
                if opt.is_integer:
                    for i, m in enumerate(g.members):
                        adapter.member_slice(m).copy_(stored.expected[(g.name, i)])
                elif opt.bits != 32:
                    adapter._write_group(g, opt, clip)
            for g in space.groups:
                opt = pmap.get(g.name, FULL_PRECISION)
                if opt.is_integer or opt.pruned:
                    continue
                for i, m in enumerate(g.members):
                    view = adapter.member_slice(m).detach()
                    if opt.bits == 16:
                        half = view.to(torch.float16)
                        keep = half if torch.equal(half.to(view.dtype), view) else view
                    else:
                        keep = view
                    stored.tensors[_qkey(g.name, i, "weight")] = keep.contiguous().cpu().clone()
            # Tied tensors are stored once; ``aliases`` names the others (rebuilt from their canonical name).
            state, aliases = _state_entries(model)
            drop = {_state_name(state, _weight(modules[name])) for name in by_module if covered[name]}
            for name in by_module:
                dtypes[name] = str(_weight(modules[name]).dtype).removeprefix("torch.")
            for name, t in state.items():
                if name in drop:
                    continue
                if name.startswith(_Q):
                    raise InvalidInputError(f"state-dict name {name!r} clashes with the artifact's names", field="model")
                stored.tensors[name] = t.detach().contiguous().cpu().clone()
    finally:
        adapter.restore(saved)
    if verify:
        _verify_against_adapter(adapter, space, pmap, clip, stored)

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
    meta["digest"] = _digest(meta)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / ARTIFACT_FILE
    from safetensors.torch import save_file

    tmp = out / f".{ARTIFACT_FILE}.{os.getpid()}.tmp"
    try:
        save_file(stored.tensors, tmp, metadata=meta)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    (out / PRECISION_MAP_FILE).write_text(json.dumps(pmap.to_dict(), indent=2) + "\n")
    shutil.copymode(out / PRECISION_MAP_FILE, target)  # safetensors creates files owner-only
    _write_model_files(model, model_dir, out)
    return target


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
        if not isinstance(qp, quant.QParams) or qp.bits != opt.bits or qp.symmetric != opt.symmetric:
            raise InvalidInputError(f"qparams of {key!r} do not match its option {opt.key()}", field="qparams")
        rows = m.out_channels
        if qp.scale.shape != (rows,) or qp.zero_point.shape != (rows,):
            raise InvalidInputError(f"qparams of {key!r} have {tuple(qp.scale.shape)} rows, expected {rows}", field="qparams")
        scale = qp.scale.detach().to(torch.float32)
        if not bool((scale > 0).all()) or not torch.equal(scale.to(torch.float16).to(torch.float32), scale):
            raise InvalidInputError(f"qparams of {key!r} must hold positive float16 scales", field="qparams")
        out[key] = quant.QParams(scale, qp.zero_point.detach().to(torch.int32), qp.bits, qp.symmetric)
    return out


def _verify_against_adapter(
    adapter: ModelAdapter, space: SearchSpace, pmap: PrecisionMap, clip: str, stored: _Stored
) -> None:
    """Every stored member equals the model as :meth:`ModelAdapter.quantized` makes it (a second
    quantization pass: it doubles the export's time)."""
    with torch.no_grad(), adapter.quantized(pmap, space, clip=clip):
        for g in space.groups:
            opt = pmap.get(g.name, FULL_PRECISION)
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


def _state_name(state: Mapping[str, torch.Tensor], tensor: torch.Tensor) -> str:
    for name, t in state.items():
        if t is tensor:
            return name
    raise InvalidInputError("a covered weight is not in the model's state dict", field="model")


def _write_model_files(model: nn.Module, model_dir: str | Path | None, out: Path) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_file"):
        config.to_json_file(str(out / "config.json"))
    if model_dir is None:
        return
    src = Path(model_dir)
    for f in sorted(src.iterdir()):
        if not f.is_file() or not any(fnmatch.fnmatchcase(f.name, p) for p in _COPY_PATTERNS):
            continue
        if f.name == "config.json" and (out / f.name).exists():
            continue
        shutil.copy2(f, out / f.name)


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
    return ArtifactInfo(path, pmap, space, clip, dict(dtypes), dict(aliases), dict(info), FORMAT_VERSION)


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


@torch.no_grad()
def load_artifact(path_or_dir: str | Path, model: nn.Module) -> nn.Module:
    """Rebuild the quantized weights of an artifact onto ``model`` (same architecture, e.g. loaded from
    the original config or the user's own model object) and return it, in place.

    The result is bit-identical to the search's fake-quantized model when ``model`` has the dtype the
    artifact was exported from. Raises :class:`InvalidInputError` (``field="artifact"``) for a file that
    is not a bitscout safetensors artifact (pickles are refused unread), an unknown format version,
    edited metadata, missing or malformed tensors, and names or shapes that do not fit ``model``.
    """
    info = artifact_info(path_or_dir)
    path = info.path
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise _artifact_error(f"{path.name} is not a valid safetensors file: {exc}") from exc
    space, pmap = info.space, info.precision_map
    modules = _check_fits(model, space, field="artifact")
    by_module = _members_by_module(space)

    # Which file entries the map calls for, checked before anything is written.
    used: set[str] = set()
    rebuilt: dict[str, torch.Tensor] = {}
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
        rebuilt[name] = torch.zeros(tuple(w.shape), dtype=dtype)
    for g in space.groups:
        opt = pmap.get(g.name, FULL_PRECISION)
        for i, m in enumerate(g.members):
            rows, cols = _rows_cols(m)
            target = _member_view(rebuilt[m.module], m)
            if opt.pruned:
                continue
            if opt.is_integer:
                n_bytes = math.ceil(rows * cols * opt.bits / 8)
                ck, sk, zk = (_qkey(g.name, i, x) for x in ("codes", "scale", "zero_point"))
                packed = _expect(tensors, ck, (torch.uint8,), (n_bytes,))
                scale = _expect(tensors, sk, (torch.float16, torch.float32), (rows,)).to(torch.float32)
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
                target.copy_(quant.dequantize(codes, qp, dtype=target.dtype))
            else:
                wk = _qkey(g.name, i, "weight")
                allowed = (torch.float16, target.dtype) if opt.bits == 16 else (target.dtype,)
                stored = _expect(tensors, wk, allowed, (rows, cols))
                used.add(wk)
                target.copy_(stored.to(target.dtype))

    # The float part: the state dict minus the covered weights, tied names stored once.
    state = model.state_dict(keep_vars=True)
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
    return model


# ----------------------------------------------------------------------------------------- apply
def _read_map_source(
    source: PrecisionMap | Mapping[str, Any] | str | Path,
) -> tuple[PrecisionMap, ArtifactInfo | None]:
    """A map from a PrecisionMap, a mapping (plain, or holding ``precision_map``), a JSON file, an
    artifact directory or file. The artifact's metadata (space, clip) comes along when one is at hand."""
    if isinstance(source, PrecisionMap):
        return source, None
    if isinstance(source, Mapping):
        data = source["precision_map"] if "precision_map" in source else source
        if not isinstance(data, Mapping):
            raise InvalidInputError("precision_map must be an object of group name to bit option", field="precision_map")
        return PrecisionMap.from_dict(data), None
    if not isinstance(source, str | Path):
        raise InvalidInputError("expected a precision map, a mapping or a path", field="precision_map")
    p = Path(source)
    if p.is_dir() or p.suffix == ".safetensors":
        art = p / ARTIFACT_FILE if p.is_dir() else p
        if art.is_file():
            info = artifact_info(art)
            return info.precision_map, info
        p = p / PRECISION_MAP_FILE if p.is_dir() else p
    if not p.is_file():
        raise InvalidInputError(f"no precision map at {str(p)!r}", field="precision_map")
    try:
        data = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{p.name} is not valid JSON: {exc}", field="precision_map") from exc
    pmap, _ = _read_map_source(data)
    sibling = p.parent / ARTIFACT_FILE
    return pmap, artifact_info(sibling) if sibling.is_file() else None


def _rebuild_space(
    model: nn.Module,
    pmap: PrecisionMap,
    *,
    granularity: str | None,
    ffn_block_size: int | None,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    include_head: bool | None,
    include_embeddings: bool | None,
) -> tuple[ModelAdapter, SearchSpace]:
    gran = granularity or ("group" if any("/" in k for k in pmap) else "layer")
    options: list[BitOption] = sorted(set(pmap.values()) | {FULL_PRECISION})
    if include_head is None and include_embeddings is None:
        tries = [(False, False), (True, False), (False, True), (True, True)]
    else:
        tries = [(bool(include_head), bool(include_embeddings))]
    unknown: list[str] = []
    for head, emb in tries:
        adapter = ModelAdapter(model, include=include, exclude=exclude, include_head=head, include_embeddings=emb)
        space = adapter.build_space(
            granularity=gran,  # type: ignore[arg-type]
            bits=options,
            ffn_block_size=64 if ffn_block_size is None else ffn_block_size,
        )
        unknown = [k for k in pmap if k not in space._index]
        if unknown:
            continue
        if gran == "group" and ffn_block_size is None:
            _check_ffn_counts(pmap, space)
        return adapter, space
    raise InvalidInputError(
        f"the precision map names groups this model does not have: {unknown[:3]} (a different model, "
        "granularity or ffn_block_size? pass the search's space)",
        field="precision_map",
    )


def _check_ffn_counts(pmap: PrecisionMap, space: SearchSpace) -> None:
    in_space: dict[str, int] = {}
    in_map: dict[str, int] = {}
    for g in space.groups:
        if g.kind == "ffn":
            in_space[g.parent] = in_space.get(g.parent, 0) + 1
            if g.name in pmap:
                in_map[g.parent] = in_map.get(g.parent, 0) + 1
    for parent, n in in_map.items():
        if n != in_space[parent]:
            raise InvalidInputError(
                f"the precision map has {n} FFN groups in {parent} but the default ffn_block_size (64) makes "
                f"{in_space[parent]}: pass the ffn_block_size the search used, or its space",
                field="ffn_block_size",
            )


def apply_precision_map(
    model: nn.Module,
    pmap_or_path: PrecisionMap | Mapping[str, Any] | str | Path,
    *,
    space: SearchSpace | Mapping[str, Any] | None = None,
    granularity: str | None = None,
    ffn_block_size: int | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    include_head: bool | None = None,
    include_embeddings: bool | None = None,
    clip: str | None = None,
) -> nn.Module:
    """Fake-quantize ``model`` in place under a precision map and return it (what ``bitscout.apply``
    calls): exactly what the search evaluated for that map.

    ``pmap_or_path``: a :class:`PrecisionMap`, a mapping (group name → option, or an object holding
    ``precision_map`` such as a Pareto point), a ``precision_map.json`` path, or an artifact directory.
    The space is, in order: ``space`` (a SearchSpace, ``space_to_dict`` or ``SearchResult.space``), the
    one in an artifact next to the map, or rebuilt from ``model`` by the adapter (granularity ``group``
    when a group name has a ``/``; head and embedding groups included when the map names them). Pass
    the search's ``ffn_block_size`` (or its space) when it was not 64. ``clip`` is the search's clip rule:
    by default the artifact's, else ``mse``. Groups missing from the map stay in full precision.
    """
    pmap, found = _read_map_source(pmap_or_path)
    clip = clip or (found.clip if found is not None else "mse")
    if clip not in ("mse", "minmax"):
        raise InvalidInputError(f"clip must be 'mse' or 'minmax', got {clip!r}", field="clip")
    if space is not None or found is not None:
        sp = _as_space(space) if space is not None else found.space  # type: ignore[union-attr]
        _check_fits(model, sp, field="space")
        adapter = ModelAdapter(model)
    else:
        adapter, sp = _rebuild_space(
            model,
            pmap,
            granularity=granularity,
            ffn_block_size=ffn_block_size,
            include=include,
            exclude=exclude,
            include_head=include_head,
            include_embeddings=include_embeddings,
        )
    adapter.apply(pmap, sp, clip=clip)
    return model


# --------------------------------------------------------------------------------------- torchao
@dataclass(frozen=True)
class TorchaoConfig:
    """A torchao config named by class and keyword arguments (``torchao.quantization.<cls>(**kwargs)``),
    so the mapping needs no torchao; :meth:`build` makes the real object."""

    cls: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Any:
        """The torchao object. ``group_size`` of ``Int8WeightOnlyConfig`` becomes
        ``granularity=PerGroup(group_size)`` on torchao versions whose config has ``granularity``
        (0.14 on); older ones take ``group_size``."""
        import dataclasses

        import torchao.quantization as tq

        cls = getattr(tq, self.cls)
        kwargs = dict(self.kwargs)
        names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        if self.cls == "Int8WeightOnlyConfig" and "granularity" in names and kwargs.get("group_size") is not None:
            from torchao.quantization.granularity import PerGroup

            kwargs["granularity"] = PerGroup(kwargs.pop("group_size"))
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"cls": self.cls, "kwargs": dict(self.kwargs)}

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.cls}({args})"


#: Group sizes torchao's int4 weight-only kernels accept.
TORCHAO_INT4_GROUP_SIZES: tuple[int, ...] = (32, 64, 128, 256)


def _torchao_plan(
    pmap: PrecisionMap,
    space: SearchSpace,
    model: nn.Module | None,
    int4_group_size: int,
) -> tuple[dict[str, TorchaoConfig], list[str]]:
    if int4_group_size not in TORCHAO_INT4_GROUP_SIZES:
        raise InvalidInputError(
            f"int4_group_size must be one of {TORCHAO_INT4_GROUP_SIZES}, got {int4_group_size!r}", field="int4_group_size"
        )
    unknown = [k for k in pmap if k not in space._index]
    if unknown:
        raise InvalidInputError(f"the precision map names groups not in the space: {unknown[:3]}", field="precision_map")
    modules = dict(model.named_modules()) if model is not None else {}
    reasons: dict[str, str] = {}
    for g in space.groups:
        opt = pmap.get(g.name, FULL_PRECISION)
        if opt.bits == 32:
            continue
        if opt.pruned:
            reasons[g.name] = "pruned (bits 0): torchao has no config that zeroes a group; apply the map instead"
        elif opt.bits == 16:
            reasons[g.name] = "float16: torchao has no per-module half-precision weight config"
        elif opt.bits not in (4, 8):
            reasons[g.name] = f"{opt.bits}-bit: torchao's weight-only kernels are int4 and int8"
        elif not opt.symmetric:
            reasons[g.name] = f"asymmetric {opt.bits}-bit: torchao's int8 weight-only grid is symmetric and its int4 one has float zero points"
        elif g.block < 0:
            reasons[g.name] = "embedding table: torchao's int4/int8 weight-only configs quantize linear layers"
    by_module = _members_by_module(space)
    configs: dict[str, TorchaoConfig] = {}
    for name, members in by_module.items():
        opts = {pmap.get(g.name, FULL_PRECISION) for g, _, _ in members}
        candidates = [g for g, _, _ in members if g.name not in reasons and pmap.get(g.name, FULL_PRECISION).bits != 32]
        if not candidates:
            continue

        def refuse(why: str, groups: list[Group] = candidates) -> None:
            for g in groups:
                reasons.setdefault(g.name, why)

        if len(opts) > 1:
            refuse(f"shares {name} with groups at other options: torchao configures whole modules")
            continue
        opt = next(iter(opts))
        module = modules.get(name)
        if model is not None and module is not None and not isinstance(module, nn.Linear):
            refuse(f"{name} is a {type(module).__name__}, not nn.Linear: torchao's quantize_ skips it")
            continue
        shape = members[0][2].shape
        if not _fully_covered(shape, [m for _, _, m in members]):
            refuse(f"{name} is only partly covered by the space's groups")
            continue
        widths = {m.in_features for _, _, m in members}
        width = math.gcd(*widths)  # every scale group of ours is a whole number of these columns
        if opt.bits == 8:
            configs[name] = TorchaoConfig("Int8WeightOnlyConfig", {} if width == shape[1] else {"group_size": width})
        else:
            sizes = [s for s in TORCHAO_INT4_GROUP_SIZES if s <= int4_group_size and width % s == 0]
            if not sizes:
                refuse(f"{name}: no int4 group size in {TORCHAO_INT4_GROUP_SIZES} divides its {width} columns per scale")
                continue
            configs[name] = TorchaoConfig("Int4WeightOnlyConfig", {"group_size": max(sizes)})
    order = [g.name for g in space.groups]
    unsupported = [f"{n}: {reasons[n]}" for n in order if n in reasons]
    return configs, unsupported


def to_torchao_config(
    pmap: PrecisionMap | Mapping[str, Any],
    space: SearchSpace | Mapping[str, Any],
    *,
    model: nn.Module | None = None,
    int4_group_size: int = 128,
    build: bool | None = None,
) -> dict[str, Any]:
    """Module name → torchao config for the part of ``pmap`` torchao can run with its own kernels, in
    the space's order. Values are real torchao config objects when torchao is importable (``build=None``)
    or ``build=True``, else :class:`TorchaoConfig` (class name + kwargs). What it cannot express is
    listed by :func:`torchao_unsupported`; those groups are left out (and modules at 32 bits need no
    entry). Use it as::

        from torchao.quantization import FqnToConfig, quantize_   # ModuleFqnToConfig before 0.14
        quantize_(model, FqnToConfig(to_torchao_config(pmap, space, model=model)), filter_fn=None)

    =====================================  ==========================================  =========================
    every group covering the module        torchao config                              scales
    =====================================  ==========================================  =========================
    8 symmetric, whole rows (``layer``     ``Int8WeightOnlyConfig()``                  per row, as in bitscout
    groups; q/k/v rows of heads; FFN up
    rows)
    8 symmetric, column slices of width    ``Int8WeightOnlyConfig(group_size=w)``      per row and w columns,
    w (output projection of heads; FFN     (built as ``granularity=PerGroup(w)`` on    as in bitscout
    down projection)                       torchao 0.14 and later)
    4 symmetric                            ``Int4WeightOnlyConfig(group_size=G)``      per row and G columns: G
                                                                                       is the largest of 32, 64,
                                                                                       128, 256 at most
                                                                                       ``int4_group_size`` that
                                                                                       divides the columns of
                                                                                       one bitscout scale
    32                                     no entry (left as it is)
    =====================================  ==========================================  =========================

    Not expressible (see :func:`torchao_unsupported`): 2, 3, 5 and 6 bits; asymmetric options; float16
    groups; pruned groups (bits 0); embedding tables; a module whose groups take different options
    (e.g. heads of one block at different bit-widths, which is most ``group`` maps); with ``model``,
    modules that are not ``nn.Linear`` (GPT-2's ``Conv1D``).

    torchao computes its own scales (min-max, and for int4 asymmetric groups of G columns with float
    zero points), so a torchao model matches the *bit allocation* of the map, not the search's exact
    numbers; the int4 groups are at least as fine as the search's per-row scales. The artifact
    (:func:`export_artifact`) is the bit-exact form.
    """
    space = _as_space(space)
    configs, _ = _torchao_plan(_as_pmap(pmap), space, model, int4_group_size)
    if build is None:
        try:
            import torchao.quantization  # noqa: F401
        except ImportError:
            build = False
        else:
            build = True
    if not build:
        return dict(configs)
    return {name: spec.build() for name, spec in configs.items()}


def torchao_unsupported(
    pmap: PrecisionMap | Mapping[str, Any],
    space: SearchSpace | Mapping[str, Any],
    *,
    model: nn.Module | None = None,
    int4_group_size: int = 128,
) -> list[str]:
    """``"<group>: <reason>"`` for every group of ``pmap`` that :func:`to_torchao_config` cannot express
    (empty when the whole map runs on torchao), in the space's order."""
    _, unsupported = _torchao_plan(_as_pmap(pmap), _as_space(space), model, int4_group_size)
    return unsupported
