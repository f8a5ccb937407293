"""The activation rounding an exported point carries: :class:`ActivationSteps` (what the native
artifact stores in its ``activations`` metadata) and :func:`install_activation_hooks` (what
:func:`search.export.artifact.load_artifact` and :func:`search.export.apply.apply_precision_map` put
on the model), so that a reloaded W/A point (``4a8``) computes exactly what the search measured.

What is stored
==============

The precision map already names every group's activation width (``act_bits``). Per matrix input
the artifact adds the scale the search or the refinement froze, when there is one:

* ``steps``: module name -> the learned static step of a whole-matrix group of a refined point (LSQ
  on the activation scale, the module's ``act_step`` parameter in :mod:`search.refine.student`),
  applied by :func:`search.actquant.quantize_with_step`;
* ``amax``: member key (:func:`search.actquant.member_key`) -> the calibrated range of a search with
  static scales (:class:`search.actquant.StaticScales`), applied as ``scale = amax / qmax``.

Every other input of a group with an activation width is rounded per token at run time (dynamic
scales need nothing stored). Values are float32 numbers written as JSON numbers (a float32 survives
the round trip through a JSON double exactly), so the reload is bit-identical.

Hooks
=====

:func:`install_activation_hooks` registers forward (pre-)hooks on the model's matrices
(:func:`search.actquant.quantize_activations_of` for per-token and static scales, a pre-hook with
:func:`search.actquant.quantize_with_step` for learned steps) and remembers them per model: a second
install (loading another artifact onto the same model) removes the first one's hooks first, and
:func:`remove_activation_hooks` removes them.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from search.actquant import StaticScales, quantize_activations_of, quantize_with_step
from search.errors import InvalidInputError
from search.space import FULL_PRECISION, PrecisionMap, SearchSpace

__all__ = [
    "ACT_STEP",
    "ActivationSteps",
    "activation_steps_of",
    "install_activation_hooks",
    "remove_activation_hooks",
]

#: the parameter name of a learned activation step on a refined student's module
ACT_STEP = "act_step"

_INSTALLED: weakref.WeakKeyDictionary[nn.Module, list[Any]] = weakref.WeakKeyDictionary()


def _finite_positive(v: Any, where: str, field_name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v)) or float(v) <= 0:
        raise InvalidInputError(f"{where} must be a positive finite number, got {v!r}", field=field_name)
    return float(v)


@dataclass(frozen=True)
class ActivationSteps:
    """The frozen activation scales of an exported point (see the module docstring); empty: every
    quantized input rounds per token."""

    steps: dict[str, float] = field(default_factory=dict)
    amax: dict[str, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.steps or self.amax)

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {"steps": dict(sorted(self.steps.items())), "amax": dict(sorted(self.amax.items()))}

    @classmethod
    def from_dict(cls, data: Any, *, field_name: str = "artifact") -> ActivationSteps:
        """Read :meth:`to_dict`'s form; anything else is refused naming ``field_name``."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping) or set(data) - {"steps", "amax"}:
            raise InvalidInputError("activations must be an object with 'steps' and 'amax'", field=field_name)
        out: dict[str, dict[str, float]] = {}
        for part in ("steps", "amax"):
            raw = data.get(part) or {}
            if not isinstance(raw, Mapping):
                raise InvalidInputError(f"activations.{part} must be an object", field=field_name)
            out[part] = {str(k): _finite_positive(v, f"activations.{part}[{k!r}]", field_name) for k, v in raw.items()}
        return cls(out["steps"], out["amax"])


def activation_steps_of(model: nn.Module, static: StaticScales | None = None) -> ActivationSteps:
    """What ``model`` freezes: the learned ``act_step`` of each of its modules (a refined student)
    and the search's ``static`` ranges."""
    steps = {
        name: float(p.detach().reshape(-1)[0])
        for name, module in model.named_modules()
        if isinstance(p := module._parameters.get(ACT_STEP), torch.Tensor) and float(p.detach().reshape(-1)[0]) > 0
    }
    return ActivationSteps(steps, {} if static is None else static.to_dict())


def remove_activation_hooks(model: nn.Module) -> None:
    """Remove the hooks :func:`install_activation_hooks` put on ``model`` (none: nothing happens)."""
    for h in _INSTALLED.pop(model, []):
        h.remove()


def install_activation_hooks(
    model: nn.Module,
    space: SearchSpace,
    pmap: PrecisionMap,
    acts: ActivationSteps | None = None,
) -> int:
    """Round the inputs of every group of ``pmap`` with an activation width as the exported point
    did: a whole matrix with a learned step by that step, the others by ``acts.amax`` when it holds
    ranges, else per token. Replaces the hooks an earlier call put on ``model``; returns the number
    of groups whose inputs are rounded. Raises :class:`InvalidInputError` (``field="artifact"``)
    when a stored range or step names a matrix input the map quantizes but the model lacks."""
    acts = acts or ActivationSteps()
    remove_activation_hooks(model)
    modules = dict(model.named_modules())
    learned: list[tuple[str, int, float]] = []
    rest: list[int] = []
    for gi, g in enumerate(space.groups):
        opt = pmap.get(g.name, FULL_PRECISION)
        if opt.act_bits is None or opt.pruned:
            continue
        whole = len(g.members) == 1 and g.members[0].axis == "all"
        if whole and g.members[0].module in acts.steps:
            learned.append((g.members[0].module, opt.act_bits, acts.steps[g.members[0].module]))
        else:
            rest.append(gi)
    missing = [n for n, _, _ in learned if n not in modules]
    if missing:
        raise InvalidInputError(f"the artifact's activation steps name modules the model lacks: {missing[:3]}",
                                field="artifact")
    static = StaticScales(acts.amax) if acts.amax else None
    try:
        handles = quantize_activations_of(modules, space, pmap, static=static, groups=rest) if rest else []
    except KeyError as exc:
        raise InvalidInputError(f"the artifact's activation ranges lack an input: {exc.args[0]}", field="artifact") from None
    for name, bits, value in learned:
        module = modules[name]
        ref = next(iter(module.parameters()), None)
        step = torch.tensor([value], dtype=torch.float32, device=None if ref is None else ref.device)

        def pre(mod: nn.Module, args: tuple[Any, ...], bits: int = bits, step: torch.Tensor = step) -> Any:
            return (quantize_with_step(args[0], bits, step), *args[1:])

        handles.append(module.register_forward_pre_hook(pre))
    if handles:
        _INSTALLED[model] = handles
    return len(learned) + len(rest)
