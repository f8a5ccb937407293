"""The search methods by name: the one registry the pipeline, the job runner and the CLIs use.

A method is one of two kinds:

* ``sensitivity``: a :class:`~search.sensitivity.SensitivityMethod` that scores every
  (group, option); the planning core (:mod:`search.plan`) turns its table into maps with the
  exact allocator. Its table is stored, so a new budget is answered without the model.
* ``proposer``: a function ``fn(search, *, options, on_progress, should_stop, evaluate_many,
  **process_settings) -> list[Candidate]`` that proposes maps itself (DNAS, NSGA-II); a candidate
  that carries ``metrics`` was evaluated already and is not evaluated again.

Each entry names its implementation as ``"module:attribute"``, imported on first use, so this
module (like the planning core) loads no torch. A method's options are defined once, by its model
in :mod:`bitscout.methods` (the wire validates a job's ``method_options`` with the same model);
:func:`parse_options` turns a mapping into that model, naming a bad field as
``method_options.<method>.<option>``. Adding a method: its module, its options model and
:class:`~bitscout.methods.Method` member in :mod:`bitscout.methods`, and one entry here.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from bitscout.methods import ACTIVATION_METHODS, MethodOptions, options_model
from search.errors import InvalidInputError

MethodKind = Literal["sensitivity", "proposer"]


@dataclass(frozen=True)
class MethodEntry:
    """One registered method: its name, kind, implementation (``"module:attribute"``) and a
    one-line summary."""

    name: str
    kind: MethodKind
    implementation: str
    summary: str

    @property
    def activations(self) -> bool:
        """Whether the method scores or proposes options with activation bits (``4a8``) with their
        activations quantized (:data:`bitscout.methods.ACTIVATION_METHODS`)."""
        return self.name in ACTIVATION_METHODS

    @property
    def options(self) -> type[MethodOptions]:
        """The method's options model (:mod:`bitscout.methods`)."""
        return options_model(self.name)

    def load(self) -> Any:
        """The implementation: a sensitivity-method class or a proposer function."""
        module, _, attr = self.implementation.partition(":")
        return getattr(importlib.import_module(module), attr)


#: Every method, by name.
REGISTRY: dict[str, MethodEntry] = {
    e.name: e
    for e in (
        MethodEntry("kl", "sensitivity", "search.sensitivity:KLSensitivity",
                    "output KL (or 1 - cosine) of each group quantized alone, with block replay"),
        MethodEntry("hessian", "sensitivity", "search.hessian:HessianSensitivity",
                    "Hutchinson Hessian curvature weighing each option's quantization error"),
        MethodEntry("fisher", "sensitivity", "search.fisher:FisherSensitivity",
                    "diagonal Fisher of one forward and backward pass per batch weighing each weight's error"),
        MethodEntry("dnas", "proposer", "search.dnas:dnas_candidates",
                    "differentiable search over a supernet of every group's options (0 bits prunes)"),
        MethodEntry("nsga2", "proposer", "search.nsga2:nsga2_candidates",
                    "Optuna's NSGA-II over whole maps at a fixed evaluation budget (the black-box baseline)"),
    )
}


def get(name: str) -> MethodEntry:
    """The entry of ``name``; an unknown name is an :class:`InvalidInputError` on ``methods``."""
    entry = REGISTRY.get(str(name))
    if entry is None:
        raise InvalidInputError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}", field="methods")
    return entry


def is_sensitivity(name: str) -> bool:
    """Whether ``name`` is a sensitivity method (its candidates come from a table)."""
    return get(name).kind == "sensitivity"


def parse_options(name: str, options: MethodOptions | Mapping[str, Any] | None = None) -> MethodOptions:
    """The validated options of method ``name`` from a mapping (or the model itself); a bad or
    unknown option is an :class:`InvalidInputError` whose ``field`` is
    ``method_options.<name>.<option>``."""
    model = get(name).options
    if isinstance(options, model):
        return options
    raw = {} if options is None else options.model_dump(exclude_unset=True) if isinstance(options, MethodOptions) \
        else dict(options)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        where = f"method_options.{name}" + (f".{loc}" if loc else "")
        known = ", ".join(model.model_fields)
        hint = f" (known: {known})" if err["type"] == "extra_forbidden" else ""
        raise InvalidInputError(f"{err['msg']}{hint}", field=where) from None


def sensitivity_method(name: str, options: MethodOptions | Mapping[str, Any] | None = None) -> Any:
    """An instance of the sensitivity method ``name`` with ``options``."""
    entry = get(name)
    if entry.kind != "sensitivity":
        raise InvalidInputError(f"{name!r} is not a sensitivity method", field="methods")
    return entry.load()(parse_options(name, options))


__all__ = ["REGISTRY", "MethodEntry", "MethodKind", "get", "is_sensitivity", "parse_options", "sensitivity_method"]
