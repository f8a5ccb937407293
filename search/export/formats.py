"""One entry point over every checkpoint format: :func:`export_point` writes a point's map in the format
asked for (names in :mod:`bitscout.formats`) and returns an :class:`ExportReport` that says what it wrote
and which groups an inference engine can run as quantized.

Each format is one writer registered in :data:`WRITERS`; the command line (``bitscout export --format``)
and the workers' export of a job's point both call :func:`export_point`, never a writer directly.
:func:`export_stored` writes a native artifact in another format (a refined point, whose learned step
sizes and refined float parameters exist only in its artifact) through the same writers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitscout.formats import COMPRESSED_TENSORS, DENSE, NATIVE, parse_export_format
from search.errors import InvalidInputError
from search.space import PrecisionMap, SearchSpace


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_point` wrote.

    ``format``: the format's name; ``path``: the main weights file; ``files``: every file written (paths
    inside the output directory); ``quantized``: the groups stored as integers that an engine with 4/8-bit
    weight kernels runs as quantized; ``no_kernel``: the groups stored as integers at a width such an
    engine has no kernel for (2, 3, 5, 6, 7 bits: transformers dequantizes them, an engine may refuse
    them); ``dense``: the groups stored in floating point (full or half precision, or options the format
    cannot express, written dequantized); ``pruned``: the groups stored as zeros; ``warnings``: one line
    per module written otherwise than the search evaluated it or than its option asks (dense for want
    of a scheme, activations not rounded), empty when every option is held as searched.
    """

    format: str
    path: Path
    files: tuple[str, ...]
    quantized: tuple[str, ...] = ()
    dense: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default=())
    no_kernel: tuple[str, ...] = ()
    pruned: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "path": str(self.path),
            "files": list(self.files),
            "quantized": list(self.quantized),
            "no_kernel": list(self.no_kernel),
            "dense": list(self.dense),
            "pruned": list(self.pruned),
            "warnings": list(self.warnings),
        }


#: A writer: ``(model, space, pmap, out_dir, clip=..., metadata=..., model_dir=..., **extra) -> ExportReport``.
Writer = Callable[..., ExportReport]


def _native(
    model: nn.Module,
    space: SearchSpace,
    pmap: PrecisionMap,
    out_dir: Path,
    *,
    clip: str,
    metadata: Mapping[str, Any] | None,
    model_dir: str | Path | None,
    **extra: Any,
) -> ExportReport:
    from search.export.artifact import export_artifact

    path = export_artifact(model, space, pmap, out_dir, clip=clip, metadata=metadata, model_dir=model_dir, **extra)
    quantized = tuple(g for g, o in pmap.items() if 0 < o.bits < 16 and o.tt_rank is None)
    pruned = tuple(g for g, o in pmap.items() if o.pruned)
    dense = tuple(g.name for g in space.groups if g.name not in set(quantized) | set(pruned))
    return ExportReport(format=NATIVE, path=path, files=written_files(out_dir), quantized=quantized, dense=dense,
                        pruned=pruned)


def _compressed_tensors(*args: Any, **kwargs: Any) -> ExportReport:
    from search.export.compressed_tensors import write_compressed_tensors

    return write_compressed_tensors(*args, **kwargs)


def _dense(*args: Any, **kwargs: Any) -> ExportReport:
    from search.export.dense import write_dense

    return write_dense(*args, **kwargs)


def written_files(out_dir: Path) -> tuple[str, ...]:
    """The names of the files in ``out_dir``, sorted (what a writer reports it wrote)."""
    return tuple(sorted(p.name for p in out_dir.iterdir() if p.is_file()))


#: Format name → writer. A new format is one module and one entry here.
WRITERS: dict[str, Writer] = {NATIVE: _native, COMPRESSED_TENSORS: _compressed_tensors, DENSE: _dense}


def export_point(
    format: str,
    model: nn.Module,
    space: SearchSpace,
    pmap: PrecisionMap,
    out_dir: str | Path,
    *,
    clip: str = "mse",
    metadata: Mapping[str, Any] | None = None,
    model_dir: str | Path | None = None,
    **extra: Any,
) -> ExportReport:
    """Write ``pmap`` over ``space`` for ``model`` (the original, unquantized weights) into ``out_dir`` in
    ``format`` and say what was written. ``extra`` reaches the writer (the native format takes ``verify``,
    ``qparams`` and ``tt_cores``). Raises :class:`InvalidInputError` (field ``format``) for an unknown
    format and whatever the writer raises for a map it cannot write."""
    try:
        name = parse_export_format(format)
    except ValueError as exc:
        raise InvalidInputError(str(exc), field="format") from None
    writer = WRITERS.get(name)
    if writer is None:
        raise InvalidInputError(f"this installation cannot write format {name!r}", field="format")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return writer(model, space, pmap, out, clip=clip, metadata=metadata, model_dir=model_dir, **extra)


def export_stored(
    format: str,
    artifact: str | Path,
    model: nn.Module,
    out_dir: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    model_dir: str | Path | None = None,
) -> ExportReport:
    """Write the native artifact ``artifact`` (a directory or its ``model.quant.safetensors``) in
    ``format`` exactly: the artifact is loaded onto ``model`` (the architecture it was exported from; its
    weights are replaced in place, float parameters included: a refined point's refined biases and norms
    come along), and :func:`export_point` writes its map with the artifact's own scales and zero points
    (and tensor-train cores), so every integer member carries the stored codes. Those codes are checked
    against the stored ones before anything is written; the map, space and clip rule are the artifact's.
    ``metadata`` goes to the writer (the artifact's own ``info`` under it, ``artifact_info``).

    Raises :class:`InvalidInputError` (field ``artifact``) for an artifact that does not read or does not
    fit ``model``, (field ``format``) as :func:`export_point` does, and :class:`SearchError` when the
    codes come out otherwise than stored."""
    from search.adapter import ModelAdapter
    from search.errors import SearchError
    from search.export.artifact import load_artifact, quantize_point, read_quantization

    stored = read_quantization(artifact)
    info = stored.info
    # Tensor-train groups: the writers take their cores (``tt_cores``) and write them into the model's own
    # module, so the module load_artifact puts in their place goes back out (it holds the loaded bias).
    tt_names = [g.members[0].module for g in info.space.groups if g.name in stored.tt_cores]
    kept = {name: model.get_submodule(name) for name in tt_names}
    load_artifact(info.path, model)
    adapter = ModelAdapter(model)
    for name, module in kept.items():
        loaded = model.get_submodule(name)
        bias = getattr(loaded, "bias", None)
        if isinstance(bias, torch.Tensor) and isinstance(getattr(module, "bias", None), torch.Tensor):
            with torch.no_grad():
                module.bias.copy_(bias)
        adapter.swap_module(name, module)
    point = quantize_point(model, info.space, info.precision_map, clip=info.clip, qparams=stored.qparams,
                           tt_cores=stored.tt_cores or None)  # fmt: skip
    for key, want in stored.codes.items():
        got = point.codes.get(key)
        if got is None or not bool(torch.equal(got.to(torch.int16), want.to(torch.int16))):
            raise SearchError(f"member {key[1]} of {key[0]} does not come back to the artifact's codes")
    meta = {**dict(metadata or {}), "artifact_info": info.info}
    return export_point(format, model, info.space, info.precision_map, out_dir, clip=info.clip, metadata=meta,
                        model_dir=model_dir, qparams=stored.qparams, tt_cores=stored.tt_cores or None)  # fmt: skip
