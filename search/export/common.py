"""What every checkpoint format of :mod:`search.export` shares: reading a map or a space given in any
accepted form, a module's weight in the ``[out, in]`` layout, member slices, the check that a space
fits a model, the state dict with tied tensors stored once, and the model files (config, tokenizer)
copied next to the weights. Package-internal: the formats import these, users do not."""

from __future__ import annotations

import fnmatch
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search.adapter import _is_conv1d
from search.errors import InvalidInputError
from search.space import Group, Member, PrecisionMap, SearchSpace, space_from_dict

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

