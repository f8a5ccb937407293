"""The torchao mapping: which part of a precision map torchao's own int4/int8 weight-only kernels
can run, as per-module torchao configs (:func:`to_torchao_config`), and why the rest cannot
(:func:`torchao_unsupported`). torchao is imported only to build real config objects."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from search.errors import InvalidInputError
from search.export.common import _as_pmap, _as_space, _fully_covered, _members_by_module
from search.space import FULL_PRECISION, Group, PrecisionMap, SearchSpace

__all__ = ["TORCHAO_INT4_GROUP_SIZES", "TorchaoConfig", "to_torchao_config", "torchao_unsupported"]


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
        if opt.unchanged:
            continue
        if opt.is_tt:
            reasons[g.name] = "tensor-train cores: torchao has no TT-matrix kernels; export the native artifact"
        elif opt.pruned:
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
        candidates = [g for g, _, _ in members if g.name not in reasons and not pmap.get(g.name, FULL_PRECISION).unchanged]
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
        if opt.group_size is not None:
            width = math.gcd(width, opt.group_size)  # group-wise scales: a group of ours is a whole number of these
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
