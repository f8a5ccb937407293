"""Applying a precision map (or an artifact's) to a user's model: :func:`apply_precision_map`, what
``bitscout.apply`` calls for a map."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from search.adapter import ModelAdapter
from search.errors import InvalidInputError
from search.export.activations import install_activation_hooks
from search.export.artifact import ARTIFACT_FILE, PRECISION_MAP_FILE, ArtifactInfo, artifact_info
from search.export.common import _as_space, _check_fits
from search.export.packed import apply_packed, refuse_packed
from search.space import FULL_PRECISION, BitOption, PrecisionMap, SearchSpace

__all__ = ["apply_precision_map"]


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
            strict=False,  # a group-wise option of the map need only fit the groups the map gives it
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
    materialize: bool = True,
) -> nn.Module:
    """Fake-quantize ``model`` in place under a precision map and return it (what ``bitscout.apply``
    calls): exactly what the search evaluated for that map.

    ``materialize`` True writes the quantized weights into the model's float parameters; False puts
    packed modules in their place (:mod:`search.export.packed`: integer codes in memory, dequantized on
    every forward pass, the same outputs bit for bit) wherever one fits, floats elsewhere.

    ``pmap_or_path``: a :class:`PrecisionMap`, a mapping (group name → option, or an object holding
    ``precision_map`` such as a Pareto point), a ``precision_map.json`` path, or an artifact directory.
    The space is, in order: ``space`` (a SearchSpace, ``space_to_dict`` or ``SearchResult.space``), the
    one in an artifact next to the map, or rebuilt from ``model`` by the adapter (granularity ``group``
    when a group name has a ``/``; head and embedding groups included when the map names them). Pass
    the search's ``ffn_block_size`` (or its space) when it was not 64. ``clip`` is the search's clip rule:
    by default the artifact's, else ``mse``. Groups missing from the map stay in full precision.
    """
    refuse_packed(model)
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
    # activation widths (``4a8``): the inputs rounded as the artifact froze them, else per token;
    # installed before packing, so that the hooks move with the modules the packed ones replace
    install_activation_hooks(model, sp, pmap, found.activations if found is not None else None)
    if materialize:
        adapter.apply(pmap, sp, clip=clip)
    else:
        apply_packed(adapter, sp, pmap, clip=clip)
    return model

