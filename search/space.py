"""The search vocabulary: bit options, groups, the search space and precision maps.

A :class:`Group` is the unit that gets one bit-width and its own scales. It spans one or more
*members*: slices of weight matrices addressed by module name. Every matrix is seen in the
``[out_features, in_features]`` layout of ``torch.nn.Linear`` (the model adapter transposes
GPT-2's ``Conv1D``), so a member is a block of rows (``axis="out"``), a block of columns
(``axis="in"``) or the whole matrix (``axis="all"``). Quantization is per output channel: each
row of a member's slice has its own scale (and zero point when asymmetric).

Group names are the keys of serialised precision maps:

* ``layer`` granularity: the module name, e.g. ``bert.encoder.layer.0.attention.self.query``;
* sub-layer groups: ``<parent module>/<kind><index>``, e.g. ``model.layers.3.self_attn/head5``
  or ``bert.encoder.layer.2/ffn7`` (``/`` never occurs in module names).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from search.errors import InvalidInputError

#: Bit-widths a group may take. 0 prunes the group, 16 keeps it in half precision, 32 unchanged.
ALLOWED_BITS: tuple[int, ...] = (0, 2, 3, 4, 5, 6, 8, 16, 32)
#: Bit-widths that are integer quantization (pruning and float excluded).
INTEGER_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)

Granularity = Literal["layer", "group"]
GroupKind = Literal["layer", "head", "ffn"]
Axis = Literal["out", "in", "all"]


@dataclass(frozen=True, order=True)
class BitOption:
    """One choice for a group: a bit-width and whether the integer grid is symmetric.

    ``bits == 0`` prunes the group (weights and biases zeroed, costed as nothing);
    16 keeps it in half precision; 32 leaves it unchanged. ``symmetric`` only matters for
    integer bit-widths.
    """

    bits: int
    symmetric: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in ALLOWED_BITS:
            raise InvalidInputError(
                f"unknown bit-width {self.bits!r}; allowed: {', '.join(map(str, ALLOWED_BITS))}", field="bits"
            )
        if self.bits not in INTEGER_BITS and not self.symmetric:
            # Asymmetry means nothing for pruned or float groups; normalise so equal choices compare equal.
            object.__setattr__(self, "symmetric", True)

    @property
    def pruned(self) -> bool:
        return self.bits == 0

    @property
    def is_float(self) -> bool:
        return self.bits >= 16

    @property
    def is_integer(self) -> bool:
        return self.bits in INTEGER_BITS

    def key(self) -> str:
        """Short text form: ``"4"``, ``"4a"`` (asymmetric), ``"0"``, ``"16"``, ``"32"``."""
        return f"{self.bits}a" if self.is_integer and not self.symmetric else str(self.bits)

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "symmetric": self.symmetric}

    @classmethod
    def parse(cls, value: BitOption | int | str | Mapping[str, Any]) -> BitOption:
        """Accept ``4``, ``"4"``, ``"4a"``, ``{"bits": 4, "symmetric": False}`` or a BitOption."""
        if isinstance(value, BitOption):
            return value
        if isinstance(value, Mapping):
            if "bits" not in value:
                raise InvalidInputError("a bit option needs a 'bits' entry", field="bits")
            return cls(int(value["bits"]), bool(value.get("symmetric", True)))
        if isinstance(value, bool):
            raise InvalidInputError(f"unknown bit-width {value!r}", field="bits")
        if isinstance(value, int):
            return cls(value)
        if isinstance(value, str):
            m = re.fullmatch(r"\s*(\d+)\s*([as]?)\s*", value)
            if not m:
                raise InvalidInputError(f"cannot read bit option {value!r} (e.g. '4', '4a')", field="bits")
            return cls(int(m.group(1)), m.group(2) != "a")
        raise InvalidInputError(f"cannot read bit option {value!r}", field="bits")


FULL_PRECISION = BitOption(32)
PRUNED = BitOption(0)


@dataclass(frozen=True)
class Member:
    """A slice of one weight matrix that belongs to a group.

    ``module`` is the module's name in the model; the slice is ``rows[start:stop]`` for
    ``axis="out"``, ``cols[start:stop]`` for ``axis="in"`` (both in the ``[out, in]`` layout) and
    the whole matrix for ``axis="all"``. ``shape`` is the full matrix's ``(out, in)``.
    The bias of the module follows the ``out`` rows (whole bias for ``all``; untouched for ``in``).
    """

    module: str
    shape: tuple[int, int]
    axis: Axis = "all"
    start: int = 0
    stop: int | None = None

    def __post_init__(self) -> None:
        out_f, in_f = self.shape
        size = {"out": out_f, "in": in_f, "all": None}[self.axis]
        if size is not None:
            stop = size if self.stop is None else self.stop
            if not 0 <= self.start < stop <= size:
                raise InvalidInputError(
                    f"slice [{self.start}:{stop}] out of range for {self.module} {self.axis} size {size}",
                    field="groups",
                )
            object.__setattr__(self, "stop", stop)

    @property
    def out_channels(self) -> int:
        """Rows of the slice: the number of per-channel scales it needs."""
        if self.axis == "out":
            return int(self.stop) - self.start  # type: ignore[arg-type]
        return self.shape[0]

    @property
    def in_features(self) -> int:
        if self.axis == "in":
            return int(self.stop) - self.start  # type: ignore[arg-type]
        return self.shape[1]

    @property
    def n_params(self) -> int:
        return self.out_channels * self.in_features


@dataclass(frozen=True)
class Group:
    """The unit that gets one bit-width and its own scales.

    ``block`` is the index of the transformer block the group lives in (``-1`` before the first
    block, e.g. embeddings; ``n_blocks`` after the last, e.g. a task head). ``macs_per_token``
    counts the multiply-accumulates of the group's weights for one token (0 for embeddings).
    ``bias_params`` counts the bias entries that follow the group (zeroed when pruned).
    """

    name: str
    kind: GroupKind
    members: tuple[Member, ...]
    block: int
    parent: str
    index: int | None = None
    macs_per_token: int = 0
    bias_params: int = 0

    @property
    def n_params(self) -> int:
        return sum(m.n_params for m in self.members)

    @property
    def n_channels(self) -> int:
        return sum(m.out_channels for m in self.members)

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.module for m in self.members))


@dataclass(frozen=True)
class PruneLimits:
    """Structural limits on pruning inside one block.

    ``max_head_fraction`` / ``max_ffn_fraction`` cap the fraction of a block's heads / FFN groups
    that may be pruned (None: no cap). ``keep_one_head``: never prune every head of a block.
    """

    max_head_fraction: float | None = None
    max_ffn_fraction: float | None = None
    keep_one_head: bool = True


@dataclass(frozen=True)
class SearchSpace:
    """The groups of a model and the options each may take.

    ``options[i]`` are the allowed options of ``groups[i]`` (sorted, no duplicates).
    ``other_params`` counts the parameters left in float outside every group (embeddings,
    norms, biases, excluded layers), stored at ``other_bits``; ``other_macs_per_token`` counts the
    multiply-accumulates of excluded linear layers, run at ``other_bits``. These feed the cost
    models so that a size is the size of the whole model.
    """

    groups: tuple[Group, ...]
    options: tuple[tuple[BitOption, ...], ...]
    granularity: Granularity = "layer"
    other_params: int = 0
    other_bits: int = 32
    other_macs_per_token: int = 0
    n_blocks: int = 0
    prune_limits: PruneLimits = field(default_factory=PruneLimits)

    def __post_init__(self) -> None:
        if not self.groups:
            raise InvalidInputError("the search space has no groups: the selection matched no layer", field="include")
        if len(self.options) != len(self.groups):
            raise InvalidInputError("one option list per group is required", field="options")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise InvalidInputError("group names must be unique", field="groups")
        for g, opts in zip(self.groups, self.options, strict=True):
            if not opts:
                raise InvalidInputError(f"group {g.name} has no allowed option", field="bits")

    def __len__(self) -> int:
        return len(self.groups)

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise InvalidInputError(f"no group named {name!r} in the search space", field="precision_map") from None

    @property
    def _index(self) -> dict[str, int]:
        cache = self.__dict__.get("_index_cache")
        if cache is None:
            cache = {g.name: i for i, g in enumerate(self.groups)}
            object.__setattr__(self, "_index_cache", cache)
        return cache

    @property
    def n_params(self) -> int:
        """Parameters inside groups."""
        return sum(g.n_params for g in self.groups)

    def uniform(self, option: BitOption | int | str) -> PrecisionMap:
        """The map that gives every group ``option`` (groups that do not allow it keep their closest)."""
        opt = BitOption.parse(option)
        chosen = {}
        for g, opts in zip(self.groups, self.options, strict=True):
            if opt in opts:
                chosen[g.name] = opt
            else:
                chosen[g.name] = min(opts, key=lambda o: (abs(o.bits - opt.bits), o.symmetric != opt.symmetric))
        return PrecisionMap(chosen)

    def full_precision(self) -> PrecisionMap:
        return PrecisionMap({g.name: FULL_PRECISION for g in self.groups})

    def choices(self, pmap: PrecisionMap) -> list[int]:
        """The option index of every group under ``pmap`` (groups missing from the map: error)."""
        out = []
        for g, opts in zip(self.groups, self.options, strict=True):
            opt = pmap.get(g.name)
            if opt is None:
                raise InvalidInputError(f"the precision map has no entry for group {g.name}", field="precision_map")
            try:
                out.append(opts.index(opt))
            except ValueError:
                raise InvalidInputError(
                    f"option {opt.key()} is not allowed for group {g.name}", field="precision_map"
                ) from None
        return out

    def from_choices(self, choices: Iterable[int]) -> PrecisionMap:
        return PrecisionMap(
            {g.name: opts[int(c)] for g, opts, c in zip(self.groups, self.options, choices, strict=True)}
        )


class PrecisionMap(Mapping[str, BitOption]):
    """Group name → chosen option. Immutable, ordered, hashable; serialises keyed by group name."""

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[str, BitOption | int | str | Mapping[str, Any]] | None = None) -> None:
        self._data: dict[str, BitOption] = {str(k): BitOption.parse(v) for k, v in (data or {}).items()}
        self._hash: int | None = None

    def __getitem__(self, key: str) -> BitOption:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(tuple(sorted((k, v.bits, v.symmetric) for k, v in self._data.items())))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PrecisionMap):
            return self._data == other._data
        if isinstance(other, Mapping):
            return dict(self._data) == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for v in self._data.values():
            counts[v.key()] = counts.get(v.key(), 0) + 1
        return f"PrecisionMap({len(self)} groups: {counts})"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {k: v.to_dict() for k, v in self._data.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrecisionMap:
        if not isinstance(data, Mapping):
            raise InvalidInputError("a precision map is an object of group name to bit option", field="precision_map")
        return cls(data)

    def replace(self, **updates: BitOption) -> PrecisionMap:
        new = dict(self._data)
        new.update(updates)
        return PrecisionMap(new)


def space_to_dict(space: SearchSpace) -> dict[str, Any]:
    """JSON form of a search space (enough to cost maps and re-allocate without the model)."""
    return {
        "granularity": space.granularity,
        "other_params": space.other_params,
        "other_bits": space.other_bits,
        "other_macs_per_token": space.other_macs_per_token,
        "n_blocks": space.n_blocks,
        "prune_limits": {
            "max_head_fraction": space.prune_limits.max_head_fraction,
            "max_ffn_fraction": space.prune_limits.max_ffn_fraction,
            "keep_one_head": space.prune_limits.keep_one_head,
        },
        "groups": [
            {
                "name": g.name,
                "kind": g.kind,
                "block": g.block,
                "parent": g.parent,
                "index": g.index,
                "macs_per_token": g.macs_per_token,
                "bias_params": g.bias_params,
                "members": [
                    {"module": m.module, "shape": list(m.shape), "axis": m.axis, "start": m.start, "stop": m.stop}
                    for m in g.members
                ],
                "options": [o.key() for o in opts],
            }
            for g, opts in zip(space.groups, space.options, strict=True)
        ],
    }


def space_from_dict(data: Mapping[str, Any]) -> SearchSpace:
    try:
        groups = []
        options = []
        for g in data["groups"]:
            members = tuple(
                Member(m["module"], (int(m["shape"][0]), int(m["shape"][1])), m["axis"], int(m["start"]), m["stop"])
                for m in g["members"]
            )
            groups.append(
                Group(
                    name=g["name"],
                    kind=g["kind"],
                    members=members,
                    block=int(g["block"]),
                    parent=g["parent"],
                    index=g.get("index"),
                    macs_per_token=int(g.get("macs_per_token", 0)),
                    bias_params=int(g.get("bias_params", 0)),
                )
            )
            options.append(tuple(BitOption.parse(o) for o in g["options"]))
        pl = data.get("prune_limits") or {}
        return SearchSpace(
            groups=tuple(groups),
            options=tuple(options),
            granularity=data.get("granularity", "layer"),
            other_params=int(data.get("other_params", 0)),
            other_bits=int(data.get("other_bits", 32)),
            other_macs_per_token=int(data.get("other_macs_per_token", 0)),
            n_blocks=int(data.get("n_blocks", 0)),
            prune_limits=PruneLimits(
                max_head_fraction=pl.get("max_head_fraction"),
                max_ffn_fraction=pl.get("max_ffn_fraction"),
                keep_one_head=bool(pl.get("keep_one_head", True)),
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"not a serialised search space: {exc}", field="space") from exc
