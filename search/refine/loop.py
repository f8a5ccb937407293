"""The refinement loop: :func:`refine` (see :mod:`search.refine`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from search import quant
from search.attention import eager_attention
from search.data import TokenizedBatch
from search.errors import CanceledError, InvalidInputError
from search.refine.checkpoint import (
    _fingerprint,
    _latest_checkpoint,
    _load_checkpoint,
    _restore_optimizer,
    _save_checkpoint,
)
from search.refine.config import RefineConfig, _parts_of
from search.refine.losses import _loss
from search.refine.result import RefineResult
from search.refine.student import _build_student, _check_pmap, _finalize, _qparams
from search.space import FULL_PRECISION, PrecisionMap
from search.tasks import (
    DEFAULT_METRIC,
    Reference,
    Task,
    check_task,
    evaluate,
    higher_is_better,
    reference_outputs,
)

__all__ = ["ProgressFn", "StopFn", "refine"]

ProgressFn = Callable[[str, float, str], None]
StopFn = Callable[[], bool]


def refine(
    search_or_parts: Any,
    pmap: PrecisionMap | Mapping[str, Any],
    *,
    config: RefineConfig | None = None,
    train_batches: Sequence[TokenizedBatch] | None = None,
    validation_batches: Sequence[TokenizedBatch] | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    checkpoint_dir: str | Path | None = None,
) -> RefineResult:
    """Fine-tune a quantized student of the search's model under ``pmap`` (see :mod:`search.refine`).

    ``search_or_parts``: a :class:`~search.pipeline.Search` or :class:`RefineParts`; its model is the
    teacher and is never changed. ``train_batches`` default to the calibration batches;
    ``validation_batches`` (early stopping) to the evaluation batches, on which the result's metrics
    are always measured. ``on_progress("refine", fraction, message)`` is called after every step;
    ``should_stop()`` is checked between steps and raises :class:`CanceledError`. With
    ``checkpoint_dir``, checkpoints are written there and a run resumes from the latest one found.
    The map, the costs and the teacher are unchanged; pruned slices stay exactly zero.
    """
    t_start = time.perf_counter()
    config = config if config is not None else RefineConfig()
    if not isinstance(config, RefineConfig):
        raise InvalidInputError("config must be a RefineConfig", field="config")
    parts = _parts_of(search_or_parts)
    task = check_task(parts.task)
    space = parts.space
    pmap = _check_pmap(pmap, space)
    device = torch.device(parts.device)
    metric = parts.metric or DEFAULT_METRIC[task]
    hib = higher_is_better(metric)
    train = list(train_batches) if train_batches is not None else list(parts.calibration)
    if not train:
        raise InvalidInputError("no training batches for refinement", field="train_batches")
    if not parts.evaluation:
        raise InvalidInputError("no evaluation batches", field="evaluation_size")
    train = [b.to(device) for b in train]
    evaluation = [b.to(device) for b in parts.evaluation]
    validation = [b.to(device) for b in validation_batches] if validation_batches is not None else evaluation
    report = on_progress or (lambda stage, frac, msg: None)
    teacher = parts.model
    notes: list[str] = []
    if all(pmap.get(g.name, FULL_PRECISION).unchanged for g in space.groups):
        notes.append("the map is full precision: only the weights were fine-tuned")

    ref_eval = parts.reference if parts.reference is not None else reference_outputs(teacher, evaluation, task)
    ref_val = ref_eval if validation_batches is None else reference_outputs(teacher, validation, task)

    student = _build_student(teacher, space, pmap, parts.clip, config)
    model = student.model.to(device)
    trainable = student.trainable()
    step_ids = student.step_params()
    core_ids = student.core_params()
    weights = [p for p in trainable.values() if id(p) not in step_ids and id(p) not in core_ids]
    scales = [p for p in trainable.values() if id(p) in step_ids]
    cores = [p for p in trainable.values() if id(p) in core_ids]
    groups: list[dict[str, Any]] = []
    if cores:
        groups.append({"params": cores, "lr": config.lr_cores, "weight_decay": 0.0})
    if weights:
        groups.append({"params": weights, "lr": config.lr_weights, "weight_decay": config.weight_decay})
    if scales:
        groups.append({"params": scales, "lr": config.lr_scales, "weight_decay": 0.0})
    if not groups:
        raise InvalidInputError("nothing to train: every parameter is frozen", field="float_groups")
    base_lrs = [g["lr"] for g in groups]
    optimizer = torch.optim.AdamW(groups, lr=config.lr_weights)
    fingerprint = _fingerprint(pmap, config, trainable, len(train))

    want_hidden = config.kd_hidden > 0
    want_attn = config.kd_attention > 0
    teacher_modes = [(m, m.training) for m in teacher.modules()]
    ckpt_folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    devices = [device.index or 0] if device.type == "cuda" else []

    with eager_attention([teacher, model] if want_attn else []) as attn_mode, torch.random.fork_rng(devices=devices):
        if want_attn and not attn_mode.ok:
            want_attn = False
            notes.append("attention-map distillation skipped: the model cannot use eager attention")
        teacher.eval()
        step = 0
        best_key: tuple[float, float] | None = None
        best_step = 0
        best_state: dict[str, torch.Tensor] = {}
        stale = 0
        finished = False
        history: list[dict[str, Any]] = []
        initial: dict[str, float] = {}
        resumed_from: int | None = None

        latest = _latest_checkpoint(ckpt_folder) if ckpt_folder is not None else None
        if latest is not None:
            tensors, meta = _load_checkpoint(latest)
            if meta.get("fingerprint") != fingerprint:
                raise InvalidInputError(
                    f"checkpoint {str(latest)!r} belongs to another map, model or configuration", field="checkpoint_dir"
                )
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(tensors[f"param::{n}"].to(p.device))
            best_state = {k[len("best::") :]: v.to(device) for k, v in tensors.items() if k.startswith("best::")}
            _restore_optimizer(optimizer, tensors, meta)
            torch.set_rng_state(tensors["rng::cpu"])
            step = int(meta["step"])
            best_key = (float(meta["best_key"][0]), float(meta["best_key"][1])) if meta.get("best_key") else None
            best_step = int(meta["best_step"])
            stale = int(meta["stale"])
            finished = bool(meta["finished"])
            history = list(meta["history"])
            initial = dict(meta["initial_metrics"])
            want_attn = bool(meta["attention"])
            notes = list(meta["notes"])
            resumed_from = step
        else:
            initial = _evaluate_student(model, validation, task, ref_val)
            best_key = _selection_key(initial, metric, hib)
            best_state = {n: p.detach().clone() for n, p in trainable.items()}
            history.append({"step": 0, "metrics": dict(initial)})

        def checkpoint() -> None:
            if ckpt_folder is None:
                return
            _save_checkpoint(
                ckpt_folder,
                step,
                trainable,
                optimizer,
                best_state,
                {
                    "fingerprint": fingerprint,
                    "best_key": list(best_key) if best_key is not None else None,
                    "best_step": best_step,
                    "stale": stale,
                    "finished": finished,
                    "history": history,
                    "initial_metrics": initial,
                    "attention": want_attn,
                    "notes": notes,
                },
            )

        model.train(config.dropout)
        n_train = len(train)
        try:
            while step < config.steps and not finished:
                if should_stop is not None and should_stop():
                    raise CanceledError("refinement canceled")
                torch.manual_seed(_step_seed(config.seed, step))
                frac = step / config.steps if config.schedule == "linear" else 0.0
                for g, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                    g["lr"] = lr * (1.0 - frac)
                optimizer.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for a in range(config.accumulate):
                    batch = train[_batch_index(config.seed, step * config.accumulate + a, n_train)]
                    loss = _loss(model, teacher, batch, task, config, want_hidden, want_attn)
                    (loss / config.accumulate).backward()  # type: ignore[no-untyped-call]
                    loss_sum += float(loss.detach())
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.grad_clip)
                optimizer.step()
                step += 1
                message = f"step {step}/{config.steps}, loss {loss_sum / config.accumulate:.4g}"
                if step % config.eval_every == 0 or step == config.steps:
                    metrics = _evaluate_student(model, validation, task, ref_val)
                    key = _selection_key(metrics, metric, hib)
                    history.append({"step": step, "metrics": dict(metrics), "loss": loss_sum / config.accumulate})
                    if best_key is None or key > best_key:
                        best_key, best_step, stale = key, step, 0
                        best_state = {n: p.detach().clone() for n, p in trainable.items()}
                    else:
                        stale += 1
                        if config.patience is not None and stale >= config.patience:
                            finished = True
                    message += f", {metric} {metrics.get(metric, float('nan')):.4g} (best at step {best_step})"
                if step % config.checkpoint_every == 0 or finished:
                    checkpoint()
                report("refine", step / config.steps, message)
        finally:
            for m, t in teacher_modes:
                m.training = t

        stopped_early = finished and step < config.steps
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(best_state[n])
        qparams = {key: _qparams(q.steps[s.step_index], q.zero_point(s.step_index), s.bits, s.symmetric, s.group_size,
                                 dtype=q.dtype)
                   for key, (_, q, s) in student.int_slots.items()}
        qparams = {k: quant.QParams(v.scale.cpu(), v.zero_point.cpu(), v.bits, v.symmetric, v.group_size)
                   for k, v in qparams.items()}
        tt_cores = _finalize(student)
        tt_cores = {k: type(v)(v.bits, v.symmetric, tuple(c.cpu() for c in v.cores),
                               None if v.qparams is None else tuple(
                                   quant.QParams(q.scale.cpu(), q.zero_point.cpu(), q.bits, q.symmetric)
                                   for q in v.qparams))
                    for k, v in tt_cores.items()}
        model.eval()
        metrics = _evaluate_student(model, evaluation, task, ref_eval)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    report("refine", 1.0, f"refined: {metric} {metrics.get(metric, float('nan')):.4g} (best step {best_step})")
    return RefineResult(
        precision_map=pmap,
        metric=metric,
        higher_is_better=hib,
        metrics=metrics,
        initial_metrics=initial,
        steps=step,
        best_step=best_step,
        stopped_early=stopped_early,
        qparams=qparams,
        state_dict=state,
        model=model,
        history=history,
        notes=notes,
        resumed_from=resumed_from,
        seconds=time.perf_counter() - t_start,
        config=config,
        tt_cores=tt_cores,
    )



def _step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))


def _batch_index(seed: int, micro: int, n: int) -> int:
    """Index of the ``micro``-th micro-batch of the endless seeded stream over ``n`` batches."""
    epoch, pos = divmod(micro, n)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return int(perm[pos])


def _selection_key(metrics: Mapping[str, float], metric: str, hib: bool) -> tuple[float, float]:
    primary = metrics.get(metric, float("nan"))
    primary = primary if hib else -primary
    kl = metrics.get("kl")
    secondary = -kl if kl is not None else 0.0
    if not math.isfinite(primary):
        primary = -math.inf
    if not math.isfinite(secondary):
        secondary = -math.inf
    return (primary, secondary)


@torch.no_grad()
def _evaluate_student(model: nn.Module, batches: Sequence[TokenizedBatch], task: Task, ref: Reference) -> dict[str, float]:
    was = model.training
    model.eval()
    try:
        return evaluate(model, batches, task, reference=ref)
    finally:
        model.train(was)

