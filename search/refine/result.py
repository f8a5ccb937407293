"""What a refinement produced: :class:`RefineResult`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from search import quant
from search.errors import InvalidInputError
from search.refine.config import RefineConfig
from search.result import ParetoPoint
from search.space import PrecisionMap
from search.tensor_train import StoredCores

__all__ = ["RefineResult"]


@dataclass
class RefineResult:
    """What :func:`refine` produced.

    ``metrics``: the refined point's metrics on the evaluation batches; ``initial_metrics``: the
    post-training point's metrics on the validation batches (step 0); ``steps``: steps run;
    ``best_step``: the step whose state was kept (0: refinement never beat the post-training point);
    ``qparams``: the learned step sizes (float16 values; ``[rows]`` per row, ``[rows, cols / N]`` with
    group-wise scales) and zero points of every integer
    member slice, keyed :func:`member_key`; ``state_dict``: the refined student's state dict with the
    quantized-then-dequantized weights the metrics were measured with; ``model``: the refined student
    itself (those weights loaded); ``history``: one entry per evaluation; ``notes``: what was skipped
    and why.
    """

    precision_map: PrecisionMap
    metric: str
    higher_is_better: bool
    metrics: dict[str, float]
    initial_metrics: dict[str, float]
    steps: int
    best_step: int
    stopped_early: bool
    qparams: dict[str, quant.QParams]
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    model: nn.Module = field(repr=False)
    history: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    resumed_from: int | None = None
    seconds: float = 0.0
    config: RefineConfig = field(default_factory=RefineConfig)
    #: the trained cores of every tensor-train group (TT-QAT), by group name, as an artifact stores them
    tt_cores: dict[str, StoredCores] = field(default_factory=dict, repr=False)

    @property
    def scales(self) -> dict[str, torch.Tensor]:
        """The learned step sizes (float32 holding float16 values) per member slice."""
        return {k: qp.scale for k, qp in self.qparams.items()}

    def point(self, origin: ParetoPoint) -> ParetoPoint:
        """The refined point of ``origin``: same map and costs, the refined metrics, ``refined=True``."""
        if origin.precision_map != self.precision_map:
            raise InvalidInputError("the point's precision map is not the refined one", field="precision_map")
        return replace(origin, metrics=dict(self.metrics), refined=True, label="refined")

    def info(self) -> dict[str, Any]:
        """JSON-serialisable summary (for a job's events or an artifact's metadata)."""
        return {
            "metric": self.metric,
            "metrics": dict(self.metrics),
            "initial_metrics": dict(self.initial_metrics),
            "steps": self.steps,
            "best_step": self.best_step,
            "stopped_early": self.stopped_early,
            "resumed_from": self.resumed_from,
            "seconds": self.seconds,
            "notes": list(self.notes),
            "config": self.config.to_dict(),
        }

