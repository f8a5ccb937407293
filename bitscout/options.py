"""The vocabulary of a search space that the wire, the search library and the service share:
the bit-option grammar and the tie kinds, written once.

A dependency-free leaf (standard library only): :mod:`bitscout.schemas` validates a job's
``space.bits`` and ``space.tie`` with it, ``search.space.BitOption.parse`` reads every option
through it, and the service's store normalises precision-map entries with it.

Bit options
===========

One grammar for every place a bit option is written (``--bits 4g128,8``, a job's ``space.bits``,
the option keys of a sensitivity table)::

    option  :=  <bits> [ "a" | "s" ] [ "g" <group columns> ] [ "a" <activation bits> ]

=============  =====================================================================================
part           meaning
=============  =====================================================================================
``<bits>``     the width: 0 prunes, 2-8 integer grids, 16 half precision, 32 unchanged
``a``          an asymmetric integer grid (a zero point per scale); ``s`` says symmetric explicitly;
               without either the space's default grid applies (symmetric unless asked otherwise)
``g<N>``       group-wise scales: one scale (and zero point) per ``N`` input columns of each row;
               without it, one per row. Integer widths only.
``a<A>``       the input activations of the group's matrices quantized to ``A`` bits (2-8 integer,
               16 half precision): ``4a8`` is W4A8, ``4g128a8`` W4A8 with group-wise weight
               scales; without it the activations stay as the model runs them. Integer weight
               widths only (float and pruned groups run at their own width).
=============  =====================================================================================

Examples: ``4`` (per row, symmetric), ``4a`` (per row, asymmetric), ``4g128`` (a scale per 128
columns), ``4ag128``, ``8a8``, ``4aa8`` (asymmetric weights, 8-bit activations). The *canonical
key* of an option (:func:`option_key`) is that spelling without ``s``: ``4``, ``4a``, ``4g128``,
``4ag128``, ``4a8``; sensitivity tables and precision maps use it. ``a`` directly followed by
digits always means activation bits; a bare ``a`` right after the width is the asymmetric grid.

Tensor-train options: ``tt<rank>@<bits>[a|s]`` (``tt16@4``, ``tt32@8a``) factorise the matrix into
the cores of a TT-matrix of TT rank ``<rank>`` (1 to :data:`MAX_TT_RANK`) and store the cores at
``<bits>`` (2-8 integer, 16, 32; not 0; no group-wise scales and no activation bits): see
``docs/methods/tensor_train.md``.

On the wire a precision-map entry names the option field by field:
``{"bits": 4, "symmetric": true, "group_size": 128, "act_bits": 8}`` (``group_size`` null per
row, ``act_bits`` null when the activations are not quantized),
``{"bits": 4, "symmetric": true, "tt_rank": 16}`` (``tt_rank`` absent or null for a plain option).

Ties
====

:data:`TIE_KINDS`: the kinds of sibling projections (matrices of one block that read the same
input) that inference engines fuse into one matrix and that a search can tie to one option:
``attention_inputs`` (the attention's input projections, q/k/v; short name ``qkv``) and
``ffn_inputs`` (the feed-forward input projections, gate/up; short name ``gate_up``).
:func:`parse_ties` reads ``"qkv,gate_up"``, ``["attention_inputs"]``, ``"none"``...

Example::

    >>> parse_option("4ag128")
    OptionFields(bits=4, symmetric=False, group_size=128, act_bits=None, tt_rank=None)
    >>> parse_option("4a8")
    OptionFields(bits=4, symmetric=None, group_size=None, act_bits=8, tt_rank=None)
    >>> option_key(4, True, 128)
    '4g128'
    >>> parse_ties("qkv,gate_up")
    ('attention_inputs', 'ffn_inputs')
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ACT_BITS",
    "ALLOWED_BITS",
    "INTEGER_BITS",
    "MAX_GROUP_SIZE",
    "MAX_TT_RANK",
    "OptionFields",
    "OptionSyntaxError",
    "TIE_ALIASES",
    "TIE_KINDS",
    "option_key",
    "parse_option",
    "parse_ties",
    "wire_option",
    "parse_act_bits",
    "with_activation_bits",
]

#: Bit-widths a group may take. 0 prunes the group, 16 keeps it in half precision, 32 unchanged.
ALLOWED_BITS: tuple[int, ...] = (0, 2, 3, 4, 5, 6, 8, 16, 32)
#: Bit-widths that are integer quantization (pruning and float excluded).
INTEGER_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
#: Activation widths an option may name (``a<A>``): integer grids and half precision.
ACT_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 16)
#: The largest group of input columns one scale may cover.
MAX_GROUP_SIZE = 1 << 20
#: The largest tensor-train rank an option may name.
MAX_TT_RANK = 4096

#: Tie kind -> what it ties.
TIE_KINDS: dict[str, str] = {
    "attention_inputs": "the attention's input projections (q, k, v) of one block",
    "ffn_inputs": "the feed-forward input projections (gate, up) of one block",
}
#: Short names of the tie kinds (``--tie qkv,gate_up``).
TIE_ALIASES: dict[str, str] = {"qkv": "attention_inputs", "gate_up": "ffn_inputs"}

_SYNTAX = "<bits>[a][g<N>][a<A>] or tt<rank>@<bits>[a], e.g. 4, 4a, 4g128, 4ag128, 4a8, tt16@4"
_OPTION_RE = re.compile(
    r"(?P<tt>tt(?P<rank>\d+)@)?"  # tensor-train prefix
    r"(?P<bits>\d+)"
    r"(?P<grid>[as](?!\d))?"  # a grid letter, unless it starts activation bits
    r"(?:g(?P<group>\d+))?"
    r"(?:a(?P<act>\d+))?"  # activation bits
)


class OptionSyntaxError(ValueError):
    """A bit option (or a tie list) that does not follow the grammar; the message says why."""


@dataclass(frozen=True)
class OptionFields:
    """A parsed bit option: ``bits``; ``symmetric`` (None: the spelling names no grid, the space's
    default applies); ``group_size`` (None: one scale per row); ``act_bits`` (None: activations
    not quantized); ``tt_rank`` (None: a plain option; else the TT rank of a tensor-train
    factorisation whose cores take ``bits``)."""

    bits: int
    symmetric: bool | None = None
    group_size: int | None = None
    act_bits: int | None = None
    tt_rank: int | None = None

    @property
    def is_integer(self) -> bool:
        return self.bits in INTEGER_BITS

    def resolved(self, symmetric: bool = True) -> tuple[int, bool, int | None, int | None]:
        """``(bits, symmetric, group_size, act_bits)`` with the default grid ``symmetric`` filled in
        (non-integer widths are always symmetric)."""
        sym = symmetric if self.symmetric is None else self.symmetric
        return self.bits, sym or not self.is_integer, self.group_size, self.act_bits

    def key(self, symmetric: bool = True) -> str:
        """The canonical key under the default grid ``symmetric`` (:func:`option_key`)."""
        return option_key(*self.resolved(symmetric), tt_rank=self.tt_rank)

    def text(self) -> str:
        """The spelling that keeps what was written: the canonical key, with ``s`` where a symmetric
        grid was named explicitly (so that a space-wide asymmetric default does not apply)."""
        grid = "" if self.symmetric is None or not self.is_integer else ("s" if self.symmetric else "a")
        group = f"g{self.group_size}" if self.group_size is not None else ""
        act = f"a{self.act_bits}" if self.act_bits is not None else ""
        tt = f"tt{self.tt_rank}@" if self.tt_rank is not None else ""
        return f"{tt}{self.bits}{grid}{group}{act}"


def option_key(
    bits: int,
    symmetric: bool = True,
    group_size: int | None = None,
    act_bits: int | None = None,
    tt_rank: int | None = None,
) -> str:
    """The canonical key: ``"4"``, ``"4a"`` (asymmetric), ``"4g128"``, ``"4ag128"``, ``"4a8"``,
    ``"4aa8"``, ``"0"``, ``"16"``, ``"tt16@4"`` (tensor-train, rank 16, 4-bit cores)."""
    asym = "a" if bits in INTEGER_BITS and not symmetric else ""
    group = f"g{group_size}" if group_size is not None else ""
    act = f"a{act_bits}" if act_bits is not None else ""
    tt = f"tt{tt_rank}@" if tt_rank is not None else ""
    return f"{tt}{bits}{asym}{group}{act}"


def _check_tt(fields: OptionFields, rank: Any, spelled: str | None) -> OptionFields:
    if rank is None:
        return fields
    what = spelled or f"tt{rank}@{fields.bits}"
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_TT_RANK:
        raise OptionSyntaxError(f"the tensor-train rank in {what} must be an integer from 1 to {MAX_TT_RANK}, got {rank!r}")
    if fields.bits == 0:
        raise OptionSyntaxError(f"tensor-train cores cannot be pruned (0 bits in {what})")
    if fields.group_size is not None:
        raise OptionSyntaxError(f"group-wise scales do not apply to tensor-train cores ({what})")
    if fields.act_bits is not None:
        raise OptionSyntaxError(f"activation bits do not apply to tensor-train options ({what})")
    return OptionFields(fields.bits, fields.symmetric, None, None, rank)


def _check(
    bits: Any, symmetric: Any, group_size: Any, spelled: str | None, act_bits: Any = None
) -> OptionFields:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        where = f" in {spelled}" if spelled is not None else ""
        raise OptionSyntaxError(f"unknown bit-width {bits!r}{where}; allowed: {', '.join(map(str, ALLOWED_BITS))}")
    if symmetric is not None and not isinstance(symmetric, bool):
        raise OptionSyntaxError(f"symmetric must be true or false, got {symmetric!r}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or not 1 <= group_size <= MAX_GROUP_SIZE:
            raise OptionSyntaxError(
                f"the group size in {spelled or bits} must be an integer from 1 to {MAX_GROUP_SIZE}, got {group_size!r}"
            )
        if bits not in INTEGER_BITS:
            raise OptionSyntaxError(
                f"group-wise scales apply to integer widths (2 to 8 bits) only, not to {bits} bits"
                + (f" ({spelled})" if spelled is not None else "")
            )
    if act_bits is not None:
        if isinstance(act_bits, bool) or not isinstance(act_bits, int) or act_bits not in ACT_BITS:
            where = f" in {spelled}" if spelled is not None else ""
            raise OptionSyntaxError(
                f"unknown activation width {act_bits!r}{where}; allowed: {', '.join(map(str, ACT_BITS))}"
            )
        if bits not in INTEGER_BITS:
            raise OptionSyntaxError(
                f"activation bits apply to integer weight widths (2 to 8 bits) only, not to {bits} bits"
                + (f" ({spelled})" if spelled is not None else "")
            )
    if bits not in INTEGER_BITS:
        symmetric = None if symmetric is None else True  # a grid means nothing for pruned or float groups
    return OptionFields(bits, symmetric, group_size, act_bits)


def parse_option(value: Any) -> OptionFields:
    """Read one bit option: an int (the width), a string in the grammar of the module docstring,
    a mapping ``{"bits", "symmetric"?, "group_size"?, "act_bits"?, "tt_rank"?}`` or an :class:`OptionFields`. Raises
    :class:`OptionSyntaxError` with a message that says what is wrong."""
    if isinstance(value, OptionFields):
        return value
    if isinstance(value, bool):
        raise OptionSyntaxError(f"cannot read bit option {value!r} (the syntax is {_SYNTAX})")
    if isinstance(value, int):
        return _check(value, None, None, None)
    if isinstance(value, Mapping):
        if "bits" not in value:
            raise OptionSyntaxError("a bit option needs a 'bits' entry")
        return _check_tt(
            _check(value["bits"], value.get("symmetric"), value.get("group_size"), None, value.get("act_bits")),
            value.get("tt_rank"),
            None,
        )
    if isinstance(value, str):
        text = value.strip().lower()
        m = _OPTION_RE.fullmatch(text)
        if m is None:
            raise OptionSyntaxError(f"cannot read bit option {value!r} (the syntax is {_SYNTAX})")
        grid = m["grid"]
        fields = _check(
            int(m["bits"]),
            None if grid is None else grid == "s",
            None if m["group"] is None else int(m["group"]),
            repr(value),
            None if m["act"] is None else int(m["act"]),
        )
        return _check_tt(fields, int(m["rank"]) if m["tt"] else None, repr(value))
    raise OptionSyntaxError(f"cannot read bit option {value!r} (the syntax is {_SYNTAX})")


def wire_option(value: Any) -> int | str:
    """The form a job spec stores an entry of ``space.bits`` in: an int for a bare width (the
    spec's ``symmetric`` applies to it, as always), else the spelling :meth:`OptionFields.text`."""
    f = parse_option(value)
    text = f.text()
    return int(text) if text.isdigit() else text


def parse_act_bits(value: Any) -> tuple[int, ...]:
    """Activation widths (``--act-bits 8,16``, a job's ``space.act_bits``): a comma-separated string
    or a list of widths from :data:`ACT_BITS`; sorted, without duplicates."""
    items = value.split(",") if isinstance(value, str) else list(value or ())
    out = set()
    for item in items:
        text = item.strip() if isinstance(item, str) else item
        if text == "":
            continue
        if isinstance(text, str) and text.isdigit():
            text = int(text)
        if isinstance(text, bool) or not isinstance(text, int) or text not in ACT_BITS:
            raise OptionSyntaxError(f"unknown activation width {item!r}; allowed: {', '.join(map(str, ACT_BITS))}")
        out.add(text)
    return tuple(sorted(out))


def with_activation_bits(bits: Iterable[Any], act_bits: Iterable[int]) -> list[int | str]:
    """The options of ``bits`` with activation widths: every integer option that names none is
    replaced by one option per width of ``act_bits`` (``4`` with ``(8, 16)``: ``4a8``, ``4a16``);
    options that name their own width, float and pruned options stay as they are. No widths: the
    options unchanged. Entries in the form of :func:`wire_option`."""
    widths = parse_act_bits(list(act_bits))
    out: list[int | str] = []
    for b in bits:
        f = parse_option(b)
        if not widths or not f.is_integer or f.act_bits is not None or f.tt_rank is not None:
            out.append(wire_option(f))
            continue
        for a in widths:
            out.append(OptionFields(f.bits, f.symmetric, f.group_size, a).text())
    return list(dict.fromkeys(out))


def parse_ties(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """The tie kinds of ``value``: a comma-separated string or a list of kinds (``attention_inputs``,
    ``ffn_inputs``) or their short names (``qkv``, ``gate_up``); ``"none"`` (alone) or an empty list
    ties nothing. Sorted, without duplicates."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = []
    for item in items:
        if not isinstance(item, str):
            raise OptionSyntaxError(f"a tie kind is a name, got {item!r}")
        name = item.strip().lower()
        if name:
            names.append(name)
    if "none" in names:
        if len(names) > 1:
            raise OptionSyntaxError("'none' ties nothing and cannot be combined with tie kinds")
        return ()
    out = set()
    for name in names:
        kind = TIE_ALIASES.get(name, name)
        if kind not in TIE_KINDS:
            known = ", ".join([*TIE_ALIASES, *TIE_KINDS, "none"])
            raise OptionSyntaxError(f"unknown tie kind {name!r}; known: {known}")
        out.add(kind)
    return tuple(sorted(out))
