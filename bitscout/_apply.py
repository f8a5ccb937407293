"""The implementation of :func:`bitscout.apply`: the quantized model in your own process, from a precision map or an artifact.

This is the one part of the SDK that needs PyTorch and the search library
(``pip install 'bitscout[search]'``); they are imported when it is called, never when ``bitscout``
is imported.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bitscout.errors import BitscoutError, InvalidRequest
from bitscout.schemas import BitOptionRead, ParetoPointRead, ResolveRead

__all__ = ["apply"]

INSTALL_HINT = "pip install 'bitscout[search]'"
ARTIFACT_FILE = "model.quant.safetensors"


def _export_module() -> Any:
    try:
        return importlib.import_module("search.export")
    except ImportError as exc:
        missing = exc.name or "search"
        raise ImportError(
            f"bitscout.apply needs PyTorch and the bitscout search library ({missing} is missing): {INSTALL_HINT}"
        ) from exc


def _as_map(source: Any) -> Any:
    """Wire models to the plain dicts search.export reads; anything else unchanged."""
    if isinstance(source, ParetoPointRead | ResolveRead):
        source = source.precision_map
    if isinstance(source, Mapping) and source and all(isinstance(v, BitOptionRead) for v in source.values()):
        return {str(k): v.model_dump() for k, v in source.items()}
    return source


def _is_artifact(source: Any) -> Path | None:
    if not isinstance(source, str | os.PathLike):
        return None
    p = Path(source).expanduser()
    if p.is_dir() and (p / ARTIFACT_FILE).is_file():
        return p
    if p.is_file() and p.name.endswith(".safetensors"):
        return p
    return None


def apply(model: Any, precision_map_or_artifact: Any, *, materialize: bool = False, **options: Any) -> Any:
    """Quantize ``model`` (a ``torch.nn.Module``, e.g. from ``transformers``) in place and return it.

    By default the quantized matrices stay packed in memory: each quantized ``Linear``, ``Conv1D``
    and ``Embedding`` is replaced by a module holding its integer codes and float16 scales that
    dequantizes them on every forward pass (``search.export.packed``), so the model takes about the
    memory of its quantized size, and its outputs are bit-identical to the search's evaluation.
    Such a model runs inference (``model(...)``, ``generate``); its state dict holds the codes.
    ``materialize=True`` writes the quantized values into the model's float weights instead (as much
    memory as the original, no dequantization per forward pass): for fine-tuning, or for
    ``save_pretrained`` of a checkpoint plain ``transformers`` reloads.

    ``precision_map_or_artifact`` is one of:

    * an artifact from :meth:`Job.download` (its directory or its ``model.quant.safetensors``):
      the stored quantized weights are loaded onto ``model``, bit-identical to what the search
      evaluated (``model`` must have the original architecture);
    * a precision map: a point (:class:`~bitscout.schemas.ParetoPointRead`), a resolve answer, a
      mapping ``{group: {"bits": 4, "symmetric": True}}``, or a ``precision_map.json`` path: the
      weights of ``model`` are fake-quantized under it, exactly as the search does.

    ``options`` go to ``search.export.apply_precision_map`` for maps (``space``, ``granularity``,
    ``ffn_block_size``, ``include``, ``exclude``, ``include_head``, ``include_embeddings``,
    ``clip``): pass the job's ``ffn_block_size`` for group-granularity maps, or use
    :meth:`Job.apply`, which passes the job's space settings itself.

    Raises ImportError (with the ``pip install`` line) without PyTorch and the search library, and
    :class:`InvalidRequest` when the map or the artifact does not fit the model (or the model already
    holds packed modules: apply to the original model).

    Example::

        >>> from transformers import AutoModelForSequenceClassification   # doctest: +SKIP
        >>> model = AutoModelForSequenceClassification.from_pretrained("./minilm-bbc")  # doctest: +SKIP
        >>> path = job.download("recommended", "quantized/")               # doctest: +SKIP
        >>> model = bitscout.apply(model, path)                            # doctest: +SKIP
        >>> model = bitscout.apply(model, job.best(max_size_mb=20), ffn_block_size=256)  # doctest: +SKIP
        >>> model = bitscout.apply(fresh_model, path, materialize=True)     # doctest: +SKIP
    """
    export = _export_module()
    artifact = _is_artifact(precision_map_or_artifact)
    try:
        if artifact is not None:
            if options:
                raise InvalidRequest(
                    f"an artifact carries its own space: {', '.join(sorted(options))} cannot be given with it",
                    field=next(iter(sorted(options))),
                )
            return export.load_artifact(artifact, model, materialize=materialize)
        return export.apply_precision_map(
            model, _as_map(precision_map_or_artifact), materialize=materialize, **options
        )
    except BitscoutError:
        raise
    except Exception as exc:
        code = getattr(exc, "code", None)
        if code not in _INPUT_CODES or getattr(type(exc), "__module__", "").split(".")[0] != "search":
            raise
        field = getattr(exc, "field", None)
        message = getattr(exc, "message", None) or str(exc)
        raise InvalidRequest(
            str(message), field=field if isinstance(field, str) else None, code=str(code)
        ) from exc


#: The search library's error codes that mean "this input does not fit" (raised as InvalidRequest).
_INPUT_CODES = ("invalid_request", "model_load_failed", "data_invalid", "budget_infeasible")
