"""The dense checkpoint (format ``dense``): a point's weights as the search evaluated them, dequantized
into the model's dtype and written by the model's own ``save_pretrained``: a plain ``model.safetensors``
(with ``config.json`` and the tokenizer) that any transformers version loads with
``AutoModel*.from_pretrained``, with the weights :meth:`search.adapter.ModelAdapter.quantized` evaluates,
bit for bit (the same logits under eager attention: ``docs/methods/export.md``).

What the weights hold, group by group: integer options their dequantized codes
(``(q - z) * scale``, the very values the search evaluated); 16-bit options the float16-rounded
weights; pruned groups zeros (their bias entries too); tensor-train options the dense matrix of their
quantized cores (:func:`search.tensor_train.tt_full`: the search ran the factorised forward, so outputs
agree to float rounding, and the report says so). Activation widths (``4a8``) are not held by any
checkpoint of plain weights: the report names the modules whose inputs the search rounded.

Next to the weights: ``precision_map.json`` (the map, as in the native artifact) and ``export.json``
(the format, the report's lists and warnings, the caller's ``metadata``).

The checkpoint writing (:func:`save_checkpoint`) and the report's group lists (:func:`group_lists`)
are shared with :mod:`search.export.compressed_tensors`, which replaces some weights by their
compressed form before saving.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitscout.formats import DENSE
from search.errors import InvalidInputError
from search.export.artifact import PRECISION_MAP_FILE, QuantizedPoint, quantize_point
from search.export.common import _write_model_files
from search.export.formats import ExportReport, written_files
from search.space import PrecisionMap, SearchSpace

__all__ = ["EXPORT_INFO_FILE", "group_lists", "save_checkpoint", "write_dense"]

#: The side file of the dense and compressed-tensors formats: format, report lists, warnings, metadata.
EXPORT_INFO_FILE = "export.json"


def check_saveable(model: nn.Module) -> None:
    """A plain checkpoint is written by transformers' ``save_pretrained``: refuse other models early."""
    if not callable(getattr(model, "save_pretrained", None)) or getattr(model, "config", None) is None:
        raise InvalidInputError(
            f"{type(model).__name__} is not a transformers model (no save_pretrained/config): only the native "
            "format can hold it",
            field="model",
        )


def activation_warnings(point: QuantizedPoint) -> list[str]:
    """One line per group whose option rounds its matrices' inputs (``4a8``): a checkpoint of weights
    does not hold that rounding."""
    out = []
    for g in point.space.groups:
        opt = point.option(g.name)
        if opt.act_bits is not None:
            out.append(
                f"{g.name}: activations not rounded to {opt.act_bits} bits (option {opt.key()}): the checkpoint "
                f"holds the weights of {opt.weight_only.key()} and the model runs its inputs unrounded"
            )
    return out


def group_lists(point: QuantizedPoint, stored: Mapping[str, bool]) -> dict[str, tuple[str, ...]]:
    """The report's lists: ``stored`` maps each module written as integers to whether an engine's
    4/8-bit weight kernels run it; a group is ``quantized`` (all its modules run so) or ``no_kernel``
    when every one of its modules is stored as integers, ``pruned`` when its option prunes it, ``dense``
    otherwise."""
    lists: dict[str, list[str]] = {"quantized": [], "no_kernel": [], "dense": [], "pruned": []}
    for g in point.space.groups:
        opt = point.option(g.name)
        kernels = {stored.get(m) for m in g.modules}
        if opt.pruned:
            lists["pruned"].append(g.name)
        elif opt.is_integer and None not in kernels:
            lists["quantized" if kernels == {True} else "no_kernel"].append(g.name)
        else:
            lists["dense"].append(g.name)
    return {k: tuple(v) for k, v in lists.items()}


def save_checkpoint(
    point: QuantizedPoint,
    out: Path,
    *,
    model_dir: str | Path | None,
    replace: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Write the model as the search evaluated it (:meth:`QuantizedPoint.applied`, tensor-train groups as
    their dense matrices) with its own ``save_pretrained`` into ``out``, then the tokenizer files of
    ``model_dir``; ``replace`` maps a module name to the tensors stored in place of its ``weight``
    (compressed-tensors' ``weight_packed``, ``weight_scale``...). Returns the weights file (or the
    index of a sharded checkpoint). The model is left as it was."""
    if model_dir is not None and not Path(model_dir).is_dir():
        raise InvalidInputError(f"model directory {str(model_dir)!r} does not exist", field="model")
    with point.applied(tt_dense=True) as model:
        state = model.state_dict()
        for name, tensors in (replace or {}).items():
            del state[f"{name}.weight"]
            state.update({f"{name}.{k}": v for k, v in tensors.items()})
        model.save_pretrained(str(out), state_dict=state)
    _write_model_files(model, model_dir, out)
    single = out / "model.safetensors"
    return single if single.is_file() else out / "model.safetensors.index.json"


def write_side_files(out: Path, report: ExportReport, pmap: PrecisionMap, metadata: Mapping[str, Any] | None) -> None:
    """``precision_map.json`` and ``export.json`` (the report minus paths, and the caller's metadata)."""
    try:
        info = json.loads(json.dumps(dict(metadata or {}), allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"metadata must be JSON-serialisable: {exc}", field="metadata") from exc
    (out / PRECISION_MAP_FILE).write_text(json.dumps(pmap.to_dict(), indent=2) + "\n")
    body = {k: v for k, v in report.to_dict().items() if k not in ("path", "files")}
    (out / EXPORT_INFO_FILE).write_text(json.dumps({**body, "info": info}, indent=2, sort_keys=True) + "\n")


def write_dense(
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
    """The writer of format ``dense`` (:data:`search.export.formats.WRITERS`): the checkpoint described
    in the module docstring. ``qparams`` / ``tt_cores`` as in :func:`search.export.export_artifact`
    (a refined point); other ``extra`` (``verify``) is ignored: the values are the quantizer's own."""
    check_saveable(model)
    point = quantize_point(model, space, pmap, clip=clip, qparams=qparams, tt_cores=tt_cores)
    warnings = activation_warnings(point)
    for g in point.space.groups:
        opt = point.option(g.name)
        if opt.is_tt:
            warnings.append(
                f"{g.name}: tensor-train option {opt.key()} written as the dense matrix of its cores; the search "
                "ran the factorised forward, so outputs agree to float rounding"
            )
    path = save_checkpoint(point, out_dir, model_dir=model_dir)
    lists = group_lists(point, {})
    report = ExportReport(format=DENSE, path=path, files=(), warnings=tuple(warnings), **lists)
    write_side_files(out_dir, report, point.pmap, metadata)
    return ExportReport(format=DENSE, path=path, files=written_files(out_dir), warnings=tuple(warnings), **lists)
