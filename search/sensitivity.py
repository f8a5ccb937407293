"""Sensitivity methods: a score per (group, option) saying how much quantizing that group alone hurts.

Every method implements :class:`SensitivityMethod`; the pipeline finds them by name in
:data:`search.methods.REGISTRY` (``kl`` here, ``hessian`` in :mod:`search.hessian`, ``fisher`` in
:mod:`search.fisher`). A method

* reads the model, the adapter, the search space and the calibration batches from a
  :class:`SensitivityContext`, and leaves the model exactly as it found it;
* reports progress through ``on_progress(stage, fraction, message)`` and calls
  ``should_stop()`` between probes, raising :class:`~search.errors.CanceledError` when it says so;
* returns a :class:`~search.result.SensitivityTable` whose scores are non-negative and whose
  full-precision option (32) scores 0.

KL sensitivity (this module): for every (group, option), the mean discrepancy (KL of the output
distribution, or ``1 - cosine`` for embeddings; :func:`search.tasks.discrepancy`) between the
full-precision model and the model with only that group quantized (for causal LMs the KL per real
token over all calibration windows, :func:`search.tasks.discrepancy_sum`). A probe of a group in
block ``i`` replays only the blocks from ``i`` on (the blocks before it are swapped for stubs that
return the cached input of block ``i``), so its cost is about ``(n_blocks - i) / n_blocks`` of a
forward pass. An option with activation bits (``4a8``) is probed with its weights *and* the inputs
of the group's matrices quantized (:mod:`search.actquant`), so the score is that of the whole W/A
option.

Memory is bounded by design: the probes run block by block, and the cache (:class:`BlockCache`)
holds the inputs of one block only, one entry per calibration batch; moving on to block ``j``
replaces each batch's entry by running the real blocks between the two (with the same stubs) and
stopping at block ``j - 1``. That costs at most one more forward pass per batch in all, and the
cache never holds more than one block's inputs (``cache_peak_bytes`` in the table's ``extra``), where
keeping every block's outputs would hold ``n_blocks`` times as much.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from bitscout.methods import KLOptions, MethodOptions
from search.actquant import StaticScales, quantize_activations_of
from search.adapter import ModelAdapter, WeightCache
from search.data import TokenizedBatch
from search.errors import CanceledError, InvalidInputError
from search.memory import OutputStore
from search.methods import parse_options
from search.result import SensitivityTable
from search.space import FULL_PRECISION, PrecisionMap, SearchSpace
from search.tasks import Task, discrepancy_sum, eval_mode, model_output, reference_outputs

ProgressFn = Callable[[str, float, str], None]
StopFn = Callable[[], bool]


@dataclass
class SensitivityContext:
    """What a sensitivity method reads. ``batches`` are calibration batches already on ``device``."""

    model: nn.Module
    adapter: ModelAdapter
    space: SearchSpace
    task: Task
    batches: Sequence[TokenizedBatch]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    clip: str = "mse"
    #: static activation scales of options with activation bits (None: per-token dynamic scales)
    act_static: StaticScales | None = None
    #: where quantized weight blocks are kept for the search's later measurements (None: nowhere)
    weight_cache: WeightCache | None = None

    @property
    def n_samples(self) -> int:
        return sum(int(b.input_ids.shape[0]) for b in self.batches)


class SensitivityMethod(abc.ABC):
    """Base of every sensitivity method (see the module docstring for the contract).

    A method is built from its options model (:mod:`bitscout.methods`, validated by
    :func:`search.methods.parse_options`), given as the model, a mapping, or keywords:
    ``HessianSensitivity(max_probes=32)``; it reads them from :attr:`options`.
    """

    #: the method's name in job specs, results and :data:`search.methods.REGISTRY`
    name: str = ""
    #: whether the method scores disjoint sets of calibration batches apart (:meth:`partial`, one
    #: per worker) and combines them into the table :meth:`compute` gives (:meth:`combine`)
    splits: bool = False

    def __init__(self, options: MethodOptions | Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("give the options as one object or as keywords, not both")
        self.options = parse_options(self.name, options if options is not None else kwargs)

    @abc.abstractmethod
    def compute(
        self,
        ctx: SensitivityContext,
        *,
        on_progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
    ) -> SensitivityTable:
        """Score every (group, option) of ``ctx.space``; see the module docstring."""

    def partial(
        self,
        ctx: SensitivityContext,
        batch_ids: Sequence[int],
        *,
        on_progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
    ) -> Any:
        """What the method measures on the calibration batches ``batch_ids`` (methods that
        :attr:`splits`)."""
        raise NotImplementedError(f"the {self.name} method is not scored in parts")

    def combine(self, ctx: SensitivityContext, parts: Sequence[Any], *, seconds: float = 0.0) -> SensitivityTable:
        """The table of :meth:`partial`'s parts over disjoint batch sets that cover every batch."""
        raise NotImplementedError(f"the {self.name} method is not scored in parts")


def _check_stop(should_stop: StopFn | None) -> None:
    if should_stop is not None and should_stop():
        raise CanceledError("sensitivity computation canceled")


class _Replay(nn.Module):
    """Stands in for transformer block ``index`` (before the block a probe starts at) and returns the
    cached input of that block for the current batch: the stub just before it hands it on (a copy, so
    that a block writing into its input leaves the cache as it was); the stubs before that return the
    same object, which the next stub ignores."""

    def __init__(self, state: _ReplayState, index: int) -> None:
        super().__init__()
        self.state = state
        self.index = index

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.state.cache.inputs[self.state.batch]
        if self.index == self.state.start - 1:
            return _clone(out)
        return out


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, tuple):
        return type(obj)(_clone(o) for o in obj) if not hasattr(obj, "_fields") else type(obj)(*map(_clone, obj))
    return obj


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, tuple | list):
        return [t for o in obj for t in _tensors(o)]
    return []


class BlockCache:
    """The inputs of one transformer block (what the block before it returned), one entry per
    calibration batch, and the peak of what it held: at most one block's inputs are ever stored.

    :meth:`put` replaces a batch's entry; ``peak_bytes`` / ``peak_tensors`` are the most bytes and
    tensors held at once over the cache's life (what the memory test reads)."""

    def __init__(self, n_batches: int) -> None:
        self.block = 0  # the inputs held are those of this block (0: none, the embeddings feed block 0)
        self.inputs: list[Any] = [None] * n_batches
        self._bytes = [0] * n_batches
        self._tensors = [0] * n_batches
        self.peak_bytes = 0
        self.peak_tensors = 0

    def put(self, batch: int, value: Any) -> None:
        ts = _tensors(value)
        self.inputs[batch] = value
        self._bytes[batch] = sum(t.numel() * t.element_size() for t in ts)
        self._tensors[batch] = len(ts)
        self.peak_bytes = max(self.peak_bytes, sum(self._bytes))
        self.peak_tensors = max(self.peak_tensors, sum(self._tensors))


@dataclass
class _ReplayState:
    cache: BlockCache
    batch: int = 0
    start: int = 0


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the block whose output is wanted has run."""


class _BlockCounter:
    """Counts calls of the real blocks (forward-pass accounting)."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        self.count = 0
        self._handles = [b.register_forward_pre_hook(self._hook) for b in blocks]

    def _hook(self, module: nn.Module, args: Any) -> None:
        self.count += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _stubbed(block_list: nn.ModuleList, state: _ReplayState, start: int) -> list[nn.Module]:
    """Swap blocks ``0 .. start - 1`` for :class:`_Replay` stubs; returns the original blocks."""
    originals = list(block_list)
    state.start = start
    for j in range(start):
        block_list[j] = _Replay(state, j)
    return originals


def _unstub(block_list: nn.ModuleList, originals: Sequence[nn.Module]) -> None:
    for j, blk in enumerate(originals):
        if block_list[j] is not blk:
            block_list[j] = blk


def _advance(
    model: nn.Module,
    block_list: nn.ModuleList,
    state: _ReplayState,
    batches: Sequence[TokenizedBatch],
    task: Task,
    to: int,
    should_stop: StopFn | None,
) -> None:
    """Move the cache from the inputs of block ``state.cache.block`` to those of block ``to`` (full
    precision): per batch, replay up to the cached block, run the real blocks up to ``to - 1`` and
    stop there; each batch's entry is replaced as soon as its new one is known."""
    cache = state.cache
    if to <= cache.block:
        return
    last = block_list[to - 1]
    captured: list[Any] = []

    def grab(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output)
        raise _StopForward

    handle = last.register_forward_hook(grab)
    originals = _stubbed(block_list, state, cache.block)
    try:
        for bi, b in enumerate(batches):
            _check_stop(should_stop)
            state.batch = bi
            captured.clear()
            try:
                model_output(model, b, task)
            except _StopForward:
                pass
            cache.put(bi, captured[0])
    finally:
        _unstub(block_list, originals)
        handle.remove()
    cache.block = to


class KLSensitivity(SensitivityMethod):
    """KL (or 1 - cosine) sensitivity with block replay; ``replay=False`` reruns the whole model per
    probe (the naive reference the tests compare against). Options: :class:`bitscout.methods.KLOptions`."""

    name = "kl"
    options: KLOptions

    @property
    def replay(self) -> bool:
        return self.options.replay

    #: the table can be scored in parts (disjoint calibration batches) and combined exactly
    splits = True

    def compute(
        self,
        ctx: SensitivityContext,
        *,
        on_progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
    ) -> SensitivityTable:
        t0 = time.perf_counter()
        part = self.partial(ctx, range(len(ctx.batches)), on_progress=on_progress, should_stop=should_stop)
        return self.combine(ctx, [part], seconds=time.perf_counter() - t0)

    @torch.no_grad()
    def partial(
        self,
        ctx: SensitivityContext,
        batch_ids: Sequence[int],
        *,
        on_progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
    ) -> KLPart:
        """Every probe on the calibration batches ``batch_ids`` only: per (group, option) the summed
        discrepancy of each of those batches and what it is summed over (:class:`KLPart`).
        :meth:`combine` of the parts of disjoint batch sets that cover every batch is the table
        :meth:`compute` gives, to the last bit: the sums are added in batch order either way."""
        ids = list(batch_ids)
        batches = [ctx.batches[i] for i in ids]
        adapter, space, model = ctx.adapter, ctx.space, ctx.model
        block_list = adapter.module(adapter.block_list_name)
        if not isinstance(block_list, nn.ModuleList):  # pragma: no cover - guaranteed by the adapter
            raise InvalidInputError("transformer blocks are not a ModuleList", field="model")
        n_blocks = len(block_list)
        counter = _BlockCounter(block_list)
        refs = OutputStore()  # a causal LM's reference logits are spilled to disk, read back per batch
        state = _ReplayState(cache=BlockCache(len(batches)))
        sums: dict[str, dict[str, list[tuple[float, int]]]] = {g.name: {} for g in space.groups}
        try:
            # Reference pass: the full-precision outputs, per batch (no block is cached here).
            for b in batches:
                _check_stop(should_stop)
                refs.append(model_output(model, b, ctx.task))
            ref_forwards = counter.count
            probes = [
                (min(max(g.block, 0), n_blocks) if self.replay else 0, gi, opt)
                for gi, (g, opts) in enumerate(zip(space.groups, space.options, strict=True))
                for opt in opts
                if not opt.unchanged
            ]
            probes.sort(key=lambda p: p[0])  # block by block: the cache only ever moves forward
            total = max(1, len(probes))
            last_report = 0.0
            for done, (start, gi, opt) in enumerate(probes):
                _check_stop(should_stop)
                group = space.groups[gi]
                _advance(model, block_list, state, batches, ctx.task, start, should_stop)
                saved = adapter.snapshot(group.modules)
                originals = _stubbed(block_list, state, start)
                act_hooks = quantize_activations_of(
                    adapter._modules, space, {group.name: opt}, static=ctx.act_static, groups=(gi,)
                )
                try:
                    adapter._write_group(group, opt, ctx.clip, ctx.weight_cache)
                    cell: list[tuple[float, int]] = []
                    for bi, b in enumerate(batches):
                        state.batch = bi
                        cell.append(discrepancy_sum(refs[bi], model_output(model, b, ctx.task), b, ctx.task))
                finally:
                    for h in act_hooks:
                        h.remove()
                    _unstub(block_list, originals)
                    adapter.restore(saved)
                sums[group.name][opt.key()] = cell
                now = time.perf_counter()
                if on_progress is not None and (now - last_report > 0.5 or done + 1 == total):
                    last_report = now
                    on_progress("sensitivity:kl", (done + 1) / total, f"probe {done + 1}/{total}: {group.name} @ {opt.key()}")
            block_forwards = counter.count
        finally:
            counter.remove()
        return KLPart(
            batch_ids=ids, sums=sums, probes=len(probes), n_blocks=n_blocks, block_forwards=block_forwards,
            reference_block_forwards=ref_forwards, cache_peak_bytes=state.cache.peak_bytes,
            cache_peak_tensors=state.cache.peak_tensors,
        )  # fmt: skip

    def combine(self, ctx: SensitivityContext, parts: Sequence[KLPart], *, seconds: float = 0.0) -> SensitivityTable:
        """The table of :meth:`partial`'s parts, whose batch sets must be disjoint and cover every
        calibration batch: each score is the sum over batches, in batch order, over the count."""
        order = sorted((i, k, pi) for pi, part in enumerate(parts) for k, i in enumerate(part.batch_ids))
        if [i for i, _, _ in order] != list(range(len(ctx.batches))):
            raise InvalidInputError("the parts do not cover every calibration batch once", field="calibration")
        space = ctx.space
        scores: dict[str, dict[str, float]] = {}
        for g, opts in zip(space.groups, space.options, strict=True):
            row: dict[str, float] = {}
            for opt in opts:
                if opt.unchanged:
                    row[opt.key()] = 0.0
                    continue
                total_disc, count = 0.0, 0
                for _, k, pi in order:
                    d_sum, d_n = parts[pi].sums[g.name][opt.key()][k]
                    total_disc += d_sum
                    count += d_n
                row[opt.key()] = max(0.0, total_disc / max(1, count))
            scores[g.name] = row
        n_blocks = max((p.n_blocks for p in parts), default=1)
        probes = max((p.probes for p in parts), default=0)
        block_forwards = sum(p.block_forwards for p in parts)
        n_batches = len(ctx.batches)
        return SensitivityTable(
            method=self.name,
            scores=scores,
            samples=ctx.n_samples,
            extra={
                "replay": self.replay,
                "probes": probes,
                "batches": n_batches,
                "parts": len(parts),
                "block_forwards": block_forwards,
                "reference_block_forwards": sum(p.reference_block_forwards for p in parts),
                "forward_units": block_forwards / max(1, n_blocks),
                "naive_forward_units": n_batches * (1 + probes),
                "cache_peak_bytes": max(p.cache_peak_bytes for p in parts),
                "cache_peak_tensors": max(p.cache_peak_tensors for p in parts),
                "seconds": seconds,
            },
        )


@dataclass
class KLPart:
    """What :meth:`KLSensitivity.partial` measured on some calibration batches: ``sums[group][option]``
    holds, per batch of ``batch_ids`` (in that order), the summed discrepancy and its count; the
    rest is accounting (block forwards, the cache's peak)."""

    batch_ids: list[int]
    sums: dict[str, dict[str, list[tuple[float, int]]]]
    probes: int
    n_blocks: int
    block_forwards: int
    reference_block_forwards: int
    cache_peak_bytes: int
    cache_peak_tensors: int


# ---------------------------------------------------------------------------------- calibration


def calibration_factors(measured: dict[int, float], predicted: dict[int, float]) -> dict[int, float]:
    """The factor of every integer bit-width (keys: bits) from the measured and the predicted
    discrepancy of its uniform map, and of pruning (key 0): see "Calibration" in :mod:`search.hessian`.

    Widths with a non-positive measurement or prediction get no ratio; with fewer than two ratios
    every factor is 1 (nothing to compare against).
    """
    widths = sorted(b for b in predicted if b > 0)
    ratios = {b: measured[b] / predicted[b] for b in widths if measured.get(b, 0.0) > 0 and predicted[b] > 0}
    if len(ratios) < 2:
        return {**dict.fromkeys(widths, 1.0), 0: 1.0}
    ref = float(np.median(list(ratios.values())))
    factors: dict[int, float] = {}
    running = 1.0
    for b in sorted(widths, reverse=True):  # widest first: a narrower width never gets a smaller factor
        if b in ratios:
            running = max(running, ratios[b] / ref)
        factors[b] = running
    factors[0] = running  # pruning: the factor of the narrowest integer width
    return factors


@torch.no_grad()
def calibrate_scores(
    ctx: SensitivityContext,
    scores: dict[str, dict[str, float]],
    *,
    should_stop: StopFn | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Measure the uniform map of every integer bit-width on the calibration batches and rescale the
    scores by :func:`calibration_factors`; returns the new scores and what was measured."""
    space, model, adapter = ctx.space, ctx.model, ctx.adapter
    opts = sorted({o for row in space.options for o in row if o.is_integer}, key=lambda o: (o.bits, o.key()))
    if not opts:
        return scores, {"applied": False, "reason": "no integer bit-width"}
    measured: dict[int, float] = {}
    predicted: dict[int, float] = {}
    with eval_mode(model):
        refs = reference_outputs(model, ctx.batches, ctx.task).outputs
        for opt in opts:
            _check_stop(should_stop)
            pmap = PrecisionMap(
                {g.name: (opt if opt in row else FULL_PRECISION) for g, row in zip(space.groups, space.options, strict=True)}
            )
            pred = sum(scores[g.name][opt.key()] for g, row in zip(space.groups, space.options, strict=True) if opt in row)
            total, count = 0.0, 0
            with adapter.quantized(pmap, space, clip=ctx.clip, cache=ctx.weight_cache):
                for ref, b in zip(refs, ctx.batches, strict=True):
                    d_sum, d_n = discrepancy_sum(ref, model_output(model, b, ctx.task), b, ctx.task)
                    total += d_sum
                    count += d_n
            n = max(1, count)
            # an asymmetric and a symmetric grid of one width: the larger measurement counts
            if opt.bits not in measured or total / n > measured[opt.bits]:
                measured[opt.bits], predicted[opt.bits] = total / n, pred
    factors = calibration_factors(measured, predicted)
    out: dict[str, dict[str, float]] = {}
    for g, row in zip(space.groups, space.options, strict=True):
        new: dict[str, float] = {}
        for opt in row:
            v = scores[g.name][opt.key()]
            f = factors.get(opt.bits, 1.0) if (opt.is_integer or opt.pruned) else 1.0
            new[opt.key()] = v * f
        out[g.name] = new
    info = {
        "applied": True,
        "measured": {str(b): v for b, v in measured.items()},
        "predicted": {str(b): v for b, v in predicted.items()},
        "factors": {str(b): v for b, v in factors.items()},
        "forwards": len(ctx.batches) * (1 + len(opts)),
    }
    return out, info
