"""What a refinement is told: :class:`RefineConfig` (how to train) and :class:`RefineParts` (what to
train from when there is no :class:`~search.pipeline.Search`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import nn

from search.data import TokenizedBatch
from search.errors import InvalidInputError
from search.space import SearchSpace
from search.tasks import Reference

__all__ = ["RefineConfig", "RefineParts"]


@dataclass(frozen=True)
class RefineConfig:
    """How to refine (see :mod:`search.refine`).

    ``steps``: optimizer steps at most; ``accumulate``: micro-batches (training batches) per step;
    ``lr_weights`` / ``lr_scales``: AdamW learning rates of the weights and of the step sizes,
    ``lr_cores``: that of the tensor-train cores of tensor-train groups (TT-QAT),
    ``schedule``: ``"constant"`` or ``"linear"`` decay to 0 at ``steps``; ``weight_decay`` of the
    weights; ``grad_clip``: max global gradient norm (None: no clipping); ``temperature`` of the output
    KL; loss weights ``kd_logits``, ``kd_hidden``, ``kd_attention``, ``task``; ``eval_every`` steps
    between evaluations; ``patience`` evaluations without improvement before stopping (None: never);
    ``checkpoint_every`` steps between checkpoints (used only with a ``checkpoint_dir``); ``seed``;
    ``dropout``: train with the model's dropout (False: the student runs in eval mode);
    ``float_groups``: ``"train"`` or ``"freeze"`` the 16/32-bit groups; ``train_other``: train the
    parameters outside the space (norms, biases, ...).
    """

    steps: int = 200
    lr_weights: float = 2e-5
    lr_scales: float = 1e-4
    lr_cores: float = 2e-4
    schedule: Literal["constant", "linear"] = "linear"
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    temperature: float = 2.0
    kd_logits: float = 1.0
    kd_hidden: float = 1.0
    kd_attention: float = 1.0
    task: float = 1.0
    accumulate: int = 1
    eval_every: int = 25
    patience: int | None = 4
    checkpoint_every: int = 50
    seed: int = 0
    dropout: bool = True
    float_groups: Literal["train", "freeze"] = "train"
    train_other: bool = True

    def __post_init__(self) -> None:
        def positive_int(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {v!r}", field=name)

        def number(name: str, *, positive: bool, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise InvalidInputError(f"{name} must be a finite number, got {v!r}", field=name)
            if (positive and v <= 0) or v < 0:
                kind = "positive" if positive else "non-negative"
                raise InvalidInputError(f"{name} must be {kind}, got {v!r}", field=name)

        for name in ("steps", "accumulate", "eval_every", "checkpoint_every"):
            positive_int(name)
        positive_int("patience", allow_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidInputError(f"seed must be a non-negative integer, got {self.seed!r}", field="seed")
        for name in ("lr_weights", "lr_scales", "lr_cores", "temperature"):
            number(name, positive=True)
        number("grad_clip", positive=True, allow_none=True)
        for name in ("weight_decay", "kd_logits", "kd_hidden", "kd_attention", "task"):
            number(name, positive=False)
        if self.kd_logits + self.kd_hidden + self.kd_attention + self.task <= 0:
            raise InvalidInputError("at least one loss weight must be positive", field="kd_logits")
        if self.schedule not in ("constant", "linear"):
            raise InvalidInputError(f"schedule must be 'constant' or 'linear', got {self.schedule!r}", field="schedule")
        if self.float_groups not in ("train", "freeze"):
            raise InvalidInputError(
                f"float_groups must be 'train' or 'freeze', got {self.float_groups!r}", field="float_groups"
            )
        for name in ("dropout", "train_other"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be true or false", field=name)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RefineConfig:
        data = dict(data or {})
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise InvalidInputError(f"unknown refine option(s): {', '.join(sorted(unknown))}", field="refine")
        return cls(**data)


@dataclass
class RefineParts:
    """What :func:`refine` needs when there is no :class:`~search.pipeline.Search`: the full-precision
    model (the teacher; never changed), its space, the task, the evaluation batches (the refined
    point's metrics), the calibration batches (the default training batches), the metric (the task's
    default when None) and the clip rule of the post-training quantizer."""

    model: nn.Module
    space: SearchSpace
    task: str
    evaluation: Sequence[TokenizedBatch]
    calibration: Sequence[TokenizedBatch] = ()
    metric: str | None = None
    clip: str = "mse"
    device: str | torch.device = "cpu"
    reference: Reference | None = None


def _parts_of(obj: Any) -> RefineParts:
    if isinstance(obj, RefineParts):
        return obj
    needed = ("model", "space", "task", "evaluation", "calibration")
    if all(hasattr(obj, n) for n in needed):  # a search.pipeline.Search
        options = getattr(obj, "options", None)
        ref = obj.reference() if callable(getattr(obj, "reference", None)) else None
        return RefineParts(
            model=obj.model,
            space=obj.space,
            task=obj.task,
            evaluation=obj.evaluation,
            calibration=obj.calibration,
            metric=getattr(obj, "metric", None),
            clip=getattr(options, "clip", "mse"),
            device=getattr(obj, "device", "cpu"),
            reference=ref,
        )
    raise InvalidInputError("refine needs a Search or RefineParts", field="search")

