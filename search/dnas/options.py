"""The options of the DNAS search (``SearchOptions.method_options["dnas"]``): the model defined
once in :mod:`bitscout.methods` (the wire validates a job's options with it)."""

from __future__ import annotations

from typing import Literal

from bitscout.methods import DNASOptions

__all__ = ["DNASOptions", "LossKind"]

LossKind = Literal["auto", "task", "kd", "task+kd"]
