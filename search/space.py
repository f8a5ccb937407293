"""The search vocabulary: bit options, groups, the search space and precision maps.

A :class:`Group` is the unit that gets one bit-width and its own scales. It spans one or more
*members*: slices of weight matrices addressed by module name. Every matrix is seen in the
``[out_features, in_features]`` layout of ``torch.nn.Linear`` (the model adapter transposes
GPT-2's ``Conv1D``), so a member is a block of rows (``axis="out"``), a block of columns
(``axis="in"``) or the whole matrix (``axis="all"``). Quantization is per output channel: each
row of a member's slice has its own scale (and zero point when asymmetric), or, with group-wise
scales (``BitOption.group_size = N``), one per ``N`` input columns of each row. Every member of
a group that may take ``N`` must have a multiple of ``N`` input columns, and a column slice
(``axis="in"``) must start on a multiple of ``N``, so that its groups are groups of the whole
matrix; :class:`SearchSpace` refuses an option that does not fit (field ``space.bits``).

A :class:`Tie` is a set of groups that must take one option: sibling projections that inference
engines fuse into one matrix (q/k/v, gate/up). The allocator sees one *decision* per tied set
(:attr:`SearchSpace.decisions`); untied groups are decisions of their own.

Group names are the keys of serialised precision maps:

* ``layer`` granularity: the module name, e.g. ``bert.encoder.layer.0.attention.self.query``;
* sub-layer groups: ``<parent module>/<kind><index>``, e.g. ``model.layers.3.self_attn/head5``
  or ``bert.encoder.layer.2/ffn7`` (``/`` never occurs in module names).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import total_ordering
from typing import Any, Literal

from bitscout import options as options_grammar
from search import tt_layout
from search.errors import InvalidInputError

#: Bit-widths a group may take. 0 prunes the group, 16 keeps it in half precision, 32 unchanged.
ALLOWED_BITS: tuple[int, ...] = options_grammar.ALLOWED_BITS
#: Bit-widths that are integer quantization (pruning and float excluded).
INTEGER_BITS: tuple[int, ...] = options_grammar.INTEGER_BITS

Granularity = Literal["layer", "group"]
GroupKind = Literal["layer", "head", "ffn"]
Axis = Literal["out", "in", "all"]
TieKind = Literal["attention_inputs", "ffn_inputs"]


@total_ordering
@dataclass(frozen=True)
class BitOption:
    """One choice for a group: a bit-width, whether the integer grid is symmetric, and how many
    input columns share one scale.

    ``bits == 0`` prunes the group (weights and biases zeroed, costed as nothing);
    16 keeps it in half precision; 32 leaves it unchanged. ``symmetric`` and ``group_size`` only
    matter for integer bit-widths: ``group_size`` None keeps one scale (and zero point) per row,
    ``N`` one per ``N`` input columns of each row (the grammar is :mod:`bitscout.options`).
    ``act_bits`` quantizes the input activations of the group's matrices (2-8 integer grids with
    per-token scales, 16 half precision; None leaves them as the model runs them: weight-only
    quantization); integer weight widths only.
    ``tt_rank`` set makes it a *tensor-train* option: the matrix is factorised into the cores of a
    TT-matrix of that TT rank (:mod:`search.tt_layout`, :mod:`search.tensor_train`) and the cores take
    ``bits`` (integer with per-row scales of each core, 16 or 32; never pruned, never group-wise,
    no activation width).
    Options sort by bits, then asymmetric before symmetric, then per row before group-wise (larger
    groups first), then weight-only before activation widths (narrower first), then plain before
    tensor-train (smaller ranks first).
    """

    bits: int
    symmetric: bool = True
    group_size: int | None = None
    act_bits: int | None = None
    tt_rank: int | None = None

    def __post_init__(self) -> None:
        try:
            f = options_grammar.parse_option(
                {
                    "bits": self.bits,
                    "symmetric": self.symmetric,
                    "group_size": self.group_size,
                    "act_bits": self.act_bits,
                    "tt_rank": self.tt_rank,
                }
            )
        except options_grammar.OptionSyntaxError as exc:
            raise InvalidInputError(str(exc), field="bits") from None
        if f.symmetric is not None and f.symmetric != self.symmetric:
            # Asymmetry means nothing for pruned or float groups; normalise so equal choices compare equal.
            object.__setattr__(self, "symmetric", True)

    def _sort_key(self) -> tuple[int, bool, int, int, int, int]:
        act = 0 if self.act_bits is None else self.act_bits
        return (self.bits, self.symmetric, self.group_size is not None, -(self.group_size or 0), act, self.tt_rank or 0)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, BitOption):
            return NotImplemented
        return self._sort_key() < other._sort_key()

    @property
    def pruned(self) -> bool:
        return self.bits == 0

    @property
    def is_tt(self) -> bool:
        """A tensor-train option (``tt_rank`` set)."""
        return self.tt_rank is not None

    @property
    def unchanged(self) -> bool:
        """The matrix as it is: 32 bits and no factorisation."""
        return self.bits == 32 and self.tt_rank is None

    @property
    def is_float(self) -> bool:
        """A plain float option (16 or 32 bits, no factorisation)."""
        return self.bits >= 16 and self.tt_rank is None

    @property
    def is_integer(self) -> bool:
        """A plain integer grid of the matrix (no factorisation)."""
        return self.bits in INTEGER_BITS and self.tt_rank is None

    @property
    def per_row(self) -> bool:
        """One scale per row (no group-wise scales)."""
        return self.group_size is None

    def key(self) -> str:
        """Short text form: ``"4"``, ``"4a"`` (asymmetric), ``"4g128"``, ``"4ag128"``, ``"4a8"``, ``"0"``,
        ``"16"``, ``"32"``, ``"tt16@4"``."""
        return options_grammar.option_key(self.bits, self.symmetric, self.group_size, self.act_bits, self.tt_rank)

    @property
    def weight_only(self) -> BitOption:
        """The same weights with the activations left alone (``act_bits`` None)."""
        return self if self.act_bits is None else BitOption(self.bits, self.symmetric, self.group_size, None, self.tt_rank)

    def to_dict(self) -> dict[str, Any]:
        """Every field named: ``{"bits", "symmetric", "group_size", "act_bits", "tt_rank"}``
        (``group_size`` None per row, ``act_bits`` None when the activations are not quantized,
        ``tt_rank`` None for a plain option)."""
        return {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "group_size": self.group_size,
            "act_bits": self.act_bits,
            "tt_rank": self.tt_rank,
        }

    @classmethod
    def parse(cls, value: BitOption | int | str | Mapping[str, Any], *, symmetric: bool = True) -> BitOption:
        """Accept ``4``, ``"4"``, ``"4a"``, ``"4g128"``, ``"4ag128"``, ``"4a8"``, ``{"bits": 4, "symmetric": False,
        "group_size": 128, "act_bits": 8}`` or a BitOption (the grammar of :mod:`bitscout.options`). ``symmetric`` is
        the grid of integer options whose spelling names none (ints, ``"4"``, ``"4g128"``)."""
        if isinstance(value, BitOption):
            return value
        try:
            f = options_grammar.parse_option(value)
        except options_grammar.OptionSyntaxError as exc:
            raise InvalidInputError(str(exc), field="bits") from None
        return cls(*f.resolved(symmetric), tt_rank=f.tt_rank)


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
class Tie:
    """Groups that must take one option: ``kind`` says what they are (:data:`bitscout.options.TIE_KINDS`:
    ``attention_inputs``, the q/k/v projections of one block; ``ffn_inputs``, its gate/up projections),
    ``groups`` names them (at least two, in the space's order)."""

    kind: TieKind
    groups: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "groups": list(self.groups)}


def tt_fit_problem(group: Group, rank: int) -> str | None:
    """Why a tensor-train option of ``rank`` does not fit ``group`` (None when it does): it factorises
    a whole matrix (a group of one member spanning it), at a rank no larger than the matrix's full TT
    rank (:meth:`search.tt_layout.TTLayout.full_rank`; above it the factorisation is the same)."""
    if len(group.members) != 1 or group.members[0].axis != "all":
        return f"group {group.name} is not a whole matrix (tensor-train options factorise whole matrices)"
    m = group.members[0]
    full = tt_layout.layout(*m.shape).full_rank()
    if rank > full:
        return f"rank {rank} exceeds the full TT rank {full} of {m.module} {m.shape[0]}x{m.shape[1]}"
    return None


def check_option_fits(group: Group, option: BitOption) -> str | None:
    """Why ``option`` does not fit ``group`` (None when it does): group-wise scales need a multiple of
    ``group_size`` input columns in every member, and a column slice must start on one; a tensor-train
    option needs :func:`tt_fit_problem` to find nothing."""
    if option.tt_rank is not None:
        return tt_fit_problem(group, option.tt_rank)
    n = option.group_size
    if n is None or not option.is_integer:
        return None
    for m in group.members:
        if m.in_features % n:
            what = f"columns [{m.start}:{m.stop}] of {m.module}" if m.axis == "in" else m.module
            return f"{what} has {m.in_features} input columns, not a multiple of {n}"
        if m.axis == "in" and m.start % n:
            return (
                f"columns [{m.start}:{m.stop}] of {m.module} (group {group.name}) do not start on a group of "
                f"{n} columns"
            )
    return None


@dataclass(frozen=True)
class SearchSpace:
    """The groups of a model and the options each may take.

    ``options[i]`` are the allowed options of ``groups[i]`` (sorted, no duplicates).
    ``other_params`` counts the parameters left in float outside every group (embeddings,
    norms, biases, excluded layers), stored at ``other_bits``; ``other_macs_per_token`` counts the
    multiply-accumulates of excluded linear layers, run at ``other_bits``. These feed the cost
    models so that a size is the size of the whole model. ``ties`` are the sets of groups that
    must take one option (tied groups allow the same options; a group is in one tie at most).

    Choices: :meth:`choices` gives an option index per group; :attr:`decisions` are the free
    decisions (a tied set, or an untied group); :meth:`from_choices` reads an index per decision
    or per group.
    """

    groups: tuple[Group, ...]
    options: tuple[tuple[BitOption, ...], ...]
    granularity: Granularity = "layer"
    other_params: int = 0
    other_bits: int = 32
    other_macs_per_token: int = 0
    n_blocks: int = 0
    prune_limits: PruneLimits = field(default_factory=PruneLimits)
    ties: tuple[Tie, ...] = ()

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
            for o in opts:
                why = check_option_fits(g, o)
                if why is not None:
                    if o.is_tt:
                        raise InvalidInputError(f"option {o.key()} does not fit: {why}", field="space.tt_ranks")
                    raise InvalidInputError(
                        f"option {o.key()} does not fit: {why}; choose a group size that divides it", field="space.bits"
                    )
        seen: set[str] = set()
        for t in self.ties:
            if len(t.groups) < 2:
                raise InvalidInputError(f"a tie needs at least two groups, got {list(t.groups)}", field="tie")
            for name in t.groups:
                if name not in self._index:
                    raise InvalidInputError(f"the tie names no group of the space: {name!r}", field="tie")
                if name in seen:
                    raise InvalidInputError(f"group {name} is in more than one tie", field="tie")
                seen.add(name)
            first = self.options[self._index[t.groups[0]]]
            for name in t.groups[1:]:
                if self.options[self._index[name]] != first:
                    raise InvalidInputError(
                        f"tied groups {t.groups[0]} and {name} allow different options", field="tie"
                    )

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

    # -- decisions ----------------------------------------------------------------------------
    @property
    def decisions(self) -> tuple[tuple[int, ...], ...]:
        """The free decisions: group indices of each tied set and of each untied group alone, in the
        order of their first group."""
        cache = self.__dict__.get("_decisions_cache")
        if cache is None:
            tied = {self._index[n]: tuple(sorted(self._index[m] for m in t.groups)) for t in self.ties for n in t.groups}
            out: list[tuple[int, ...]] = []
            done: set[int] = set()
            for i in range(len(self.groups)):
                if i in done:
                    continue
                members = tied.get(i, (i,))
                done.update(members)
                out.append(members)
            cache = tuple(out)
            object.__setattr__(self, "_decisions_cache", cache)
        return cache

    @property
    def decision_of(self) -> tuple[int, ...]:
        """The decision of every group (an index into :attr:`decisions`)."""
        cache = self.__dict__.get("_decision_of_cache")
        if cache is None:
            of = [0] * len(self.groups)
            for d, members in enumerate(self.decisions):
                for i in members:
                    of[i] = d
            cache = tuple(of)
            object.__setattr__(self, "_decision_of_cache", cache)
        return cache

    @property
    def decision_options(self) -> tuple[tuple[BitOption, ...], ...]:
        """The options of every decision (those of its groups, which a tie makes equal)."""
        return tuple(self.options[members[0]] for members in self.decisions)

    def decision_names(self) -> list[str]:
        """A name per decision for messages: the group's, or the tied groups' joined by ``+``."""
        return ["+".join(self.groups[i].name for i in members) for members in self.decisions]

    def respects_ties(self, pmap: Mapping[str, BitOption]) -> bool:
        """True when every tied set has one option under ``pmap`` (groups it omits count as full precision)."""
        for t in self.ties:
            if len({pmap.get(n, FULL_PRECISION) for n in t.groups}) > 1:
                return False
        return True

    def uniform(self, option: BitOption | int | str) -> PrecisionMap:
        """The map that gives every group ``option`` (groups that do not allow it keep their closest:
        the nearest width, then the same grid, then the nearest group size, then the nearest activation
        width)."""
        opt = BitOption.parse(option)
        chosen = {}
        for g, opts in zip(self.groups, self.options, strict=True):
            if opt in opts:
                chosen[g.name] = opt
            else:
                chosen[g.name] = min(
                    opts,
                    key=lambda o: (
                        abs(o.bits - opt.bits),
                        o.symmetric != opt.symmetric,
                        o.group_size != opt.group_size,
                        abs((o.group_size or 0) - (opt.group_size or 0)),
                        o.act_bits != opt.act_bits,
                        abs((o.act_bits or 32) - (opt.act_bits or 32)),
                    ),
                )
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

    def decision_choices(self, pmap: PrecisionMap) -> list[int]:
        """The option index of every decision under ``pmap``; a map that gives one tied set two
        options is refused (``precision_map``)."""
        per_group = self.choices(pmap)
        out = []
        for members in self.decisions:
            picked = {per_group[i] for i in members}
            if len(picked) > 1:
                names = ", ".join(self.groups[i].name for i in members)
                raise InvalidInputError(f"tied groups {names} take different options", field="precision_map")
            out.append(per_group[members[0]])
        return out

    def from_choices(self, choices: Iterable[int]) -> PrecisionMap:
        """The map of an option index per decision (``len(decisions)`` entries: tied sets expand to
        their groups) or per group (``len(groups)`` entries; tied groups must agree)."""
        picks = [int(c) for c in choices]
        if len(picks) == len(self.decisions):
            per_group = [0] * len(self.groups)
            for members, c in zip(self.decisions, picks, strict=True):
                for i in members:
                    per_group[i] = c
        elif len(picks) == len(self.groups):
            per_group = picks
            for members in self.decisions:
                if len({per_group[i] for i in members}) > 1:
                    names = ", ".join(self.groups[i].name for i in members)
                    raise InvalidInputError(f"tied groups {names} take different options", field="precision_map")
        else:
            raise InvalidInputError(
                f"{len(picks)} choices for {len(self.decisions)} decisions ({len(self.groups)} groups)",
                field="precision_map",
            )
        return PrecisionMap(
            {g.name: opts[c] for g, opts, c in zip(self.groups, self.options, per_group, strict=True)}
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
            self._hash = hash(tuple(sorted((k, v.key()) for k, v in self._data.items())))
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
        **({"ties": [t.to_dict() for t in space.ties]} if space.ties else {}),
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
            ties=tuple(Tie(t["kind"], tuple(str(n) for n in t["groups"])) for t in data.get("ties") or ()),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"not a serialised search space: {exc}", field="space") from exc
