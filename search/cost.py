"""Cost models: what a precision map costs in bytes, bits, bit operations and latency.

A :class:`CostModel` prices every (group, option) of a :class:`~search.space.SearchSpace` once
(:meth:`CostModel.group_costs`) plus a constant part (:meth:`CostModel.offsets`); the cost of a
map is the offsets plus the chosen options' contributions, so every metric is *additive* over
groups, which is what the allocators need. ``cost(pmap)`` is computed exactly that way. A tie
(``SearchSpace.ties``) changes no price: a tied set costs the sum of its groups, each counted once.

Definitions
===========

Notation: a group ``g`` has members ``m`` (``m.n_params`` weights in ``m.out_channels`` rows),
``n_g = g.n_params``, ``c_g = g.macs_per_token``; ``b`` is the chosen option's bits; ``T = seq_len
* batch`` tokens; ``a = act_bits``; ``o = space.other_bits``.

**size_bytes** (exact; the whole model's storage):

==============  ==========================================================================
option          bytes of group ``g``
==============  ==========================================================================
integer ``b``   ``sum over members m of ceil(m.n_params * b / 8) + 2 * s_m``, plus ``s_m``
                more when asymmetric, where ``s_m`` is the number of scales of the slice:
                ``m.out_channels`` per row, ``m.out_channels * m.in_features / N`` with
                group-wise scales of ``N`` columns. Each member slice is packed on its own
                (``search.quant.pack``), with one float16 scale (2 bytes) and, when
                asymmetric, one uint8 zero point (1 byte) per row (per group) of the slice.
16              ``2 * n_g``
32              ``4 * n_g``
0 (pruned)      ``- g.bias_params * o / 8``: the weights cost nothing and the group's bias,
                which is counted in ``space.other_params``, is removed from it.
``tt<r>@b``     the cores of the matrix's TT-matrix at rank ``r`` (:mod:`search.tt_layout`):
                ``sum over cores k of ceil(p_k * b / 8) + 2 * s_k`` (``+ s_k`` asymmetric) for
                integer ``b``, with ``p_k`` the core's entries and ``s_k = r_{k-1} * m_k`` its
                rows (one float16 scale per row of ``[r_{k-1} * m_k, n_k * r_k]``); ``p_k * b / 8``
                for 16- and 32-bit cores.
==============  ==========================================================================

Offset: ``space.other_params * o / 8`` (embeddings, norms, *all* biases, excluded layers).

**avg_bits** = ``sum_g n_g * b_g / sum_g n_g`` over the groups of the space: pruned groups count
0 bits, float groups 16 or 32, and scales / zero points are not included. The contribution of
``g`` is ``n_g * b_g / sum n``; the offset is 0. A tensor-train option contributes its cores'
bits, ``P * b / sum n`` with ``P`` the cores' entries (an equivalent ``b * P / n_g`` bits a weight).

**bops** (bit operations of one forward pass over ``T`` tokens; BOPs = MACs × weight bits ×
activation bits): group contribution ``T * c_g * b * a_g`` for integer ``b``, where ``a_g`` is the
option's searched activation width (``4a8``: 8, ``4a16``: 16) and, for a weight-only option
(``4``), the cost model's ``act_bits``; ``T * c_g * b * b`` for float options (16 × 16, 32 × 32:
activations run at the weights' float width); 0 when pruned. A tensor-train option counts the MACs
of the TT forward (:meth:`search.tt_layout.TTLayout.macs_per_token`, zero for an embedding's row
lookup) in place of ``c_g``, at its cores' bits. Offset: ``T * space.other_macs_per_token * o * o``.

**latency_ms** (a roofline per group): ``max(bytes_g / bandwidth, ops_g / throughput) * 1e3``,
where ``bytes_g`` is the group's weight storage above *without* the bias term (weights are read
once per forward pass), ``ops_g = 2 * T * c_g`` (one MAC is two operations), and the throughput is
the profile's for the option's compute class (:meth:`DeviceProfile.throughput_tops`, with the
option's activation width ``a_g`` as above: W4A16 runs fp16 kernels, W4A8 int8); a pruned
group costs 0. Offset: the same roofline for the excluded part (``space.other_params * o / 8``
bytes, ``2 * T * space.other_macs_per_token`` operations at ``o`` bits). Groups are costed
separately so the cost stays additive; a sum of per-group maxima upper-bounds the max of the
summed traffic and compute, and is the usual per-layer model of kernels that run one after
another.

**latency_ms from a measured table** (``CostModel(latency_table=...)``, a
:class:`LatencyTable` that ``bitscout profile`` measured; format in :mod:`bitscout.latency`):
the group's contribution is the sum over its members of the table's time for the member's
``(out_channels, in_features)`` at the option's key and ``T`` tokens; a member slice whose own
shape the table lacks takes its whole matrix's time scaled by its share of the matrix's weights.
A pruned group costs 0, and the offset is 0: the table times the searched matrices only, the
part no map changes (embeddings, norms, attention scores, excluded layers) is left out. A map
whose (shape, option, tokens) the table lacks is refused when the cost model is built
(``latency_table``), never guessed.

Device profiles
===============

Dense (no 2:4 sparsity) peak figures from the vendors' public specifications; the int4 column
falls back to int8 where the hardware has no faster int4 path. Bandwidth in GB/s (10^9 bytes/s),
throughput in TOPS / TFLOPS (10^12 operations/s).

=============  ==========  =======  =======  =======  =======  =============================================
profile        bandwidth   int8     int4     fp16     fp32     source
=============  ==========  =======  =======  =======  =======  =============================================
a100           2039        624      1248     312      19.5     NVIDIA A100 80GB SXM datasheet (tensor cores)
h100           3350        1979     1979     989      67       NVIDIA H100 SXM datasheet (no int4 mode on
                                                               Hopper: int4 = int8)
rtx4090        1008        660.6    1321.2   165.2    82.6     NVIDIA Ada whitepaper, RTX 4090 (fp16 with
                                                               fp32 accumulate)
cpu-avx512     204.8       23.6     23.6     5.9      5.9      Intel Xeon Platinum 8380: 40 cores x 2.3 GHz
                                                               x 2 AVX-512 FMA units (fp32: 32 FLOP/cycle,
                                                               VNNI int8: 256 OP/cycle); no fp16 or int4
                                                               path; 8 x DDR4-3200
jetson-orin    204.8       85       170      42.5     5.3      Jetson AGX Orin 64GB technical brief: GPU 170
                                                               sparse int8 TOPS (85 dense), 2048 CUDA cores
                                                               5.3 FP32 TFLOPS, LPDDR5 204.8 GB/s
=============  ==========  =======  =======  =======  =======  =============================================

The default profile is ``a100``. Custom hardware: ``DeviceProfile(...)`` or
``DeviceProfile.from_dict({...})`` / ``get_profile({...})`` with the figures of
:data:`bitscout.latency.DEVICE_PROFILE_FIELDS` (``--device-profile profile.json`` on the command
line, an object as a job's ``budget.device_profile``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

import numpy as np

from bitscout import latency as latency_format
from search import tt_layout
from search.errors import InvalidInputError
from search.result import COST_METRICS, Cost
from search.space import BitOption, Group, Member, PrecisionMap, SearchSpace

__all__ = [
    "DEFAULT_PROFILE",
    "PROFILES",
    "CostModel",
    "DeviceProfile",
    "LatencyTable",
    "get_profile",
    "n_scales",
    "option_macs_per_token",
    "tt_core_bytes",
    "tt_params",
    "weight_bytes",
]

_METRICS: tuple[str, ...] = tuple(COST_METRICS)


@dataclass(frozen=True)
class DeviceProfile:
    """Peak memory bandwidth and dense throughput per compute class of one device.

    ``memory_bandwidth_gbs`` in GB/s; ``int8_tops`` / ``int4_tops`` in TOPS; ``fp16_tflops`` /
    ``fp32_tflops`` in TFLOPS. All must be positive and finite.
    """

    name: str
    memory_bandwidth_gbs: float
    int8_tops: float
    int4_tops: float
    fp16_tflops: float
    fp32_tflops: float
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidInputError("a device profile needs a name", field="device_profile")
        for f in fields(self):
            if f.name in ("name", "description"):
                continue
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise InvalidInputError(
                    f"device profile {f.name} must be a positive number, got {v!r}", field="device_profile"
                )
            object.__setattr__(self, f.name, float(v))

    def compute_class(self, bits: int, act_bits: int) -> str:
        """The kernel class an option runs in: ``int4`` / ``int8`` for integer weights (by the wider
        of weight and activation bits: W4A8 runs int8 kernels), ``fp16`` or ``fp32`` for float ones."""
        if 0 < bits <= 8:
            width = max(bits, act_bits)
            if width <= 4:
                return "int4"
            if width <= 8:
                return "int8"
            return "fp16" if width <= 16 else "fp32"
        return "fp16" if bits == 16 else "fp32"

    def throughput_tops(self, bits: int, act_bits: int = 8) -> float:
        """Peak operations per second (in 10^12) for weights of ``bits`` with ``act_bits`` activations."""
        return {
            "int4": self.int4_tops,
            "int8": self.int8_tops,
            "fp16": self.fp16_tflops,
            "fp32": self.fp32_tflops,
        }[self.compute_class(bits, act_bits)]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceProfile:
        """A profile from its figures (:func:`bitscout.latency.check_device_profile`: a bad one is
        refused naming the field, ``device_profile.int8_tops``)."""
        try:
            checked = latency_format.check_device_profile(data)
        except latency_format.LatencyTableError as exc:
            where = f"device_profile.{exc.field}" if exc.field else "device_profile"
            raise InvalidInputError(str(exc), field=where) from None
        return cls(**checked)


#: Named profiles (figures and sources in the module docstring).
PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile("a100", 2039, 624, 1248, 312, 19.5, "NVIDIA A100 80GB SXM"),
        DeviceProfile("h100", 3350, 1979, 1979, 989, 67, "NVIDIA H100 SXM"),
        DeviceProfile("rtx4090", 1008, 660.6, 1321.2, 165.2, 82.6, "NVIDIA GeForce RTX 4090"),
        DeviceProfile("cpu-avx512", 204.8, 23.6, 23.6, 5.9, 5.9, "Intel Xeon Platinum 8380, AVX-512 VNNI"),
        DeviceProfile("jetson-orin", 204.8, 85, 170, 42.5, 5.3, "NVIDIA Jetson AGX Orin 64GB (GPU)"),
    )
}
DEFAULT_PROFILE = "a100"


def get_profile(name_or_dict: str | Mapping[str, Any] | DeviceProfile | None) -> DeviceProfile:
    """A named profile (case-insensitive), a custom one from a mapping, a profile as is, or the
    default for None. Unknown names raise :class:`InvalidInputError` (``device_profile``)."""
    if name_or_dict is None:
        return PROFILES[DEFAULT_PROFILE]
    if isinstance(name_or_dict, DeviceProfile):
        return name_or_dict
    if isinstance(name_or_dict, str):
        profile = PROFILES.get(name_or_dict.strip().lower())
        if profile is None:
            raise InvalidInputError(
                f"unknown device profile {name_or_dict!r}; known: {', '.join(PROFILES)}",
                field="device_profile",
            )
        return profile
    if isinstance(name_or_dict, Mapping):
        return DeviceProfile.from_dict(name_or_dict)
    raise InvalidInputError(f"cannot read device profile {name_or_dict!r}", field="device_profile")


def _check_positive_int(value: Any, name: str, upper: int | None = None) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < 1
        or (upper is not None and value > upper)
    ):
        bound = f" at most {upper}" if upper is not None else ""
        raise InvalidInputError(f"{name} must be a positive integer{bound}, got {value!r}", field=name)


def weight_bytes(group: Group, option: BitOption) -> int:
    """Storage of a group's weights (with scales and zero points, without its bias) at ``option``."""
    b = option.bits
    if b == 0:
        return 0
    if option.tt_rank is not None:
        return tt_core_bytes(group.members[0].shape, option)
    if option.is_float:
        return group.n_params * (b // 8)
    per_scale = 2 if option.symmetric else 3
    return sum(math.ceil(m.n_params * b / 8) + per_scale * n_scales(m, option) for m in group.members)


def tt_core_bytes(shape: tuple[int, int], option: BitOption) -> int:
    """Storage of the TT-matrix cores of an ``[out, in]`` matrix at a tensor-train ``option``: every
    core packed on its own at ``option.bits``, with a float16 scale (and a uint8 zero point when
    asymmetric) per row of its ``[r_{k-1} * m_k, n_k * r_k]`` matrix for integer cores."""
    if option.tt_rank is None:
        raise InvalidInputError(f"option {option.key()} is not a tensor-train option", field="bits")
    lay = tt_layout.layout(*shape)
    b = option.bits
    total = 0
    for core, rows in zip(lay.core_shapes(option.tt_rank), lay.core_rows(option.tt_rank), strict=True):
        n = math.prod(core)
        if b >= 16:
            total += n * (b // 8)
        else:
            total += math.ceil(n * b / 8) + (2 if option.symmetric else 3) * rows
    return total


def tt_params(group: Group, option: BitOption) -> int:
    """Entries of the cores of ``group``'s matrix at a tensor-train ``option``."""
    return tt_layout.layout(*group.members[0].shape).core_params(int(option.tt_rank or 0))


def option_macs_per_token(group: Group, option: BitOption) -> int:
    """The multiply-accumulates of one token through ``group`` at ``option``: the group's own for a
    plain option, the TT forward's for a tensor-train option of a linear matrix (0 for an embedding)."""
    if option.tt_rank is None or group.macs_per_token == 0:
        return group.macs_per_token
    return tt_layout.layout(*group.members[0].shape).macs_per_token(option.tt_rank)


def n_scales(member: Member, option: BitOption) -> int:
    """Scales (and zero points) of one member slice at an integer ``option``: one per row, or one
    per ``group_size`` input columns of each row."""
    if option.group_size is None:
        return member.out_channels
    return member.out_channels * (member.in_features // option.group_size)


class LatencyTable:
    """Measured times of matrix shapes at options (format: :mod:`bitscout.latency`), what
    ``CostModel(latency_table=...)`` prices latency with. Built from the JSON object
    (:meth:`from_dict`; a bad table is refused naming the field, ``latency_table.entries.3.ms``)."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        try:
            self.data = latency_format.parse_latency_table(data)
        except latency_format.LatencyTableError as exc:
            where = f"latency_table.{exc.field}" if exc.field else "latency_table"
            raise InvalidInputError(f"latency table: {exc}", field=where) from None
        self._ms: dict[tuple[int, int, int, str], float] = {
            (e["tokens"], e["shape"][0], e["shape"][1], e["option"]): e["ms"] for e in self.data["entries"]
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | LatencyTable) -> LatencyTable:
        return data if isinstance(data, LatencyTable) else cls(data)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.data)

    @property
    def device(self) -> str:
        return str(self.data["device"])

    def tokens(self) -> list[int]:
        return sorted({k[0] for k in self._ms})

    def ms(self, tokens: int, shape: tuple[int, int], option: str) -> float | None:
        """The measured time of ``shape`` at ``option`` (a key) over ``tokens`` rows, None when absent."""
        return self._ms.get((tokens, int(shape[0]), int(shape[1]), option))

    def member_ms(self, tokens: int, member: Member, option: BitOption) -> float:
        """A member slice's time: its own shape's, else its matrix's scaled by its share of the weights."""
        key = option.key()
        own = self.ms(tokens, (member.out_channels, member.in_features), key)
        if own is not None:
            return own
        whole = self.ms(tokens, member.shape, key)
        if whole is None:
            have = ", ".join(map(str, self.tokens()))
            raise InvalidInputError(
                f"the latency table ({self.device}) has no time for {member.module} {list(member.shape)} at option "
                f"{key} over {tokens} tokens (it holds {have} tokens); profile the model with that option and "
                "token count (bitscout profile --bits ... --tokens ...)",
                field="latency_table",
            )
        return whole * member.n_params / (member.shape[0] * member.shape[1])


@dataclass(frozen=True)
class CostModel:
    """Prices precision maps of ``space`` (definitions in the module docstring).

    ``seq_len`` tokens per sequence and ``batch`` sequences make one forward pass (BOPs and
    latency); ``act_bits`` is the activation width assumed for integer options that name none
    (weight-only ``4``; an option's own width, ``4a8``, always wins); ``profile`` is a
    :class:`DeviceProfile`, a profile name or a mapping (read by :func:`get_profile`);
    ``latency_table`` (a :class:`LatencyTable` or its JSON object) replaces the roofline for
    latency, and must hold every group's (shape, option) at ``seq_len * batch`` tokens.
    """

    space: SearchSpace
    seq_len: int = 128
    act_bits: int = 8
    batch: int = 1
    profile: DeviceProfile = field(default_factory=lambda: PROFILES[DEFAULT_PROFILE])
    latency_table: LatencyTable | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.space, SearchSpace):
            raise InvalidInputError("a cost model needs a SearchSpace", field="space")
        _check_positive_int(self.seq_len, "seq_len")
        _check_positive_int(self.batch, "batch")
        _check_positive_int(self.act_bits, "act_bits", upper=32)
        object.__setattr__(self, "profile", get_profile(self.profile))
        if self.latency_table is not None:
            object.__setattr__(self, "latency_table", LatencyTable.from_dict(self.latency_table))
            _ = self._tables  # every (shape, option) of the space is looked up now: a gap fails here

    def option_act_bits(self, option: BitOption) -> int:
        """The activation width ``option`` runs at: its own, the weights' float width, or ``act_bits``."""
        if option.bits >= 16:  # float weights (plain or tensor-train cores) run at their own width
            return option.bits
        return self.act_bits if option.act_bits is None else option.act_bits

    @property
    def tokens(self) -> int:
        """Tokens in one forward pass: ``seq_len * batch``."""
        return self.seq_len * self.batch

    def _latency_ms(self, n_bytes: float, macs_per_token: int, bits: int, act_bits: int | None = None) -> float:
        act = self.act_bits if act_bits is None else act_bits
        memory_s = n_bytes / (self.profile.memory_bandwidth_gbs * 1e9)
        compute_s = 2 * self.tokens * macs_per_token / (self.profile.throughput_tops(bits, act) * 1e12)
        return max(memory_s, compute_s) * 1e3

    def option_cost(self, group: Group, option: BitOption) -> dict[str, float]:
        """The additive contribution of ``group`` at ``option`` to every metric."""
        b = option.bits
        if b == 0:
            return {
                "size_bytes": -group.bias_params * self.space.other_bits / 8,
                "avg_bits": 0.0,
                "bops": 0.0,
                "latency_ms": 0.0,
            }
        n_bytes = weight_bytes(group, option)
        act = self.option_act_bits(option)
        total = self.space.n_params
        n_weights = tt_params(group, option) if option.is_tt else group.n_params
        macs = option_macs_per_token(group, option)
        if self.latency_table is not None:
            latency = sum(self.latency_table.member_ms(self.tokens, m, option) for m in group.members)
        else:
            latency = self._latency_ms(n_bytes, macs, b, act)
        return {
            "size_bytes": float(n_bytes),
            "avg_bits": n_weights * b / total if total else 0.0,
            "bops": float(self.tokens * macs * b * act),
            "latency_ms": float(latency),
        }

    @cached_property
    def _tables(self) -> dict[str, list[np.ndarray]]:
        tables: dict[str, list[np.ndarray]] = {m: [] for m in _METRICS}
        for group, options in zip(self.space.groups, self.space.options, strict=True):
            per_option = [self.option_cost(group, o) for o in options]
            for m in _METRICS:
                arr = np.array([c[m] for c in per_option], dtype=np.float64)
                arr.flags.writeable = False
                tables[m].append(arr)
        return tables

    def group_costs(self) -> dict[str, list[np.ndarray]]:
        """Per metric, per group (in ``space.groups`` order), per option (in ``space.options``
        order): the additive contribution. The arrays are read-only and computed once."""
        return {m: list(v) for m, v in self._tables.items()}

    @cached_property
    def _offsets(self) -> dict[str, float]:
        sp = self.space
        other_bytes = sp.other_params * sp.other_bits / 8
        return {
            "size_bytes": float(other_bytes),
            "avg_bits": 0.0,
            "bops": float(self.tokens * sp.other_macs_per_token * sp.other_bits * sp.other_bits),
            "latency_ms": 0.0
            if self.latency_table is not None
            else self._latency_ms(other_bytes, sp.other_macs_per_token, sp.other_bits),
        }

    def offsets(self) -> dict[str, float]:
        """The constant part of every metric (float parameters and excluded layers)."""
        return dict(self._offsets)

    def cost_of_choices(self, choices: Sequence[int]) -> Cost:
        """The cost of the map that picks option ``choices[i]`` for group ``i``."""
        choices = list(choices)
        if len(choices) != len(self.space.groups):
            raise InvalidInputError(
                f"{len(choices)} choices for {len(self.space.groups)} groups", field="precision_map"
            )
        idx = []
        for c, options in zip(choices, self.space.options, strict=True):
            if isinstance(c, bool) or not isinstance(c, int | np.integer) or not 0 <= c < len(options):
                raise InvalidInputError(f"option index {c!r} out of range", field="precision_map")
            idx.append(int(c))
        totals = {}
        for m in _METRICS:
            total = self._offsets[m]
            for arr, c in zip(self._tables[m], idx, strict=True):
                total += float(arr[c])
            totals[m] = total
        return Cost(**totals)

    def cost(self, pmap: PrecisionMap | Mapping[str, Any]) -> Cost:
        """The cost of ``pmap``: offsets plus every group's contribution at its chosen option.

        The map must name every group of the space with an allowed option and nothing else
        (:class:`InvalidInputError`, ``precision_map``).
        """
        if not isinstance(pmap, PrecisionMap):
            pmap = PrecisionMap.from_dict(pmap)
        for name in pmap:
            self.space.index(name)  # a group outside the space: InvalidInputError
        return self.cost_of_choices(self.space.choices(pmap))
