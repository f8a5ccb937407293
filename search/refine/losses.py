"""The distillation losses of refinement: output KL (or ``1 - cosine``), hidden-state and
attention-map MSE over real tokens, and the task's own loss (see :mod:`search.refine`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from search.data import TokenizedBatch
from search.refine.config import RefineConfig
from search.tasks import Task, has_task_loss, scored_tokens, task_loss


def _forward(model: nn.Module, batch: TokenizedBatch, *, hidden: bool, attentions: bool) -> Any:
    kwargs: dict[str, Any] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if hidden:
        kwargs["output_hidden_states"] = True
    if attentions:
        kwargs["output_attentions"] = True
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "use_cache"):
        kwargs["use_cache"] = False
    return model(**kwargs)


def _task_output(out: Any, batch: TokenizedBatch, task: Task) -> torch.Tensor:
    if task == "embeddings":
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
        return cast(torch.Tensor, ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).float())
    logits = out.logits if hasattr(out, "logits") else out[0]
    return cast(torch.Tensor, logits.float())


def _output_kd(s: torch.Tensor, t: torch.Tensor, batch: TokenizedBatch, task: Task, temperature: float) -> torch.Tensor:
    if task == "embeddings":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    if task == "regression":  # the squared error to the teacher's output (no distribution to soften)
        return (s - t).square().sum(-1).mean()
    logp_t = F.log_softmax(t / temperature, dim=-1)
    logp_s = F.log_softmax(s / temperature, dim=-1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1) * temperature**2
    if task in ("causal_lm", "token_classification"):
        mask = scored_tokens(batch, task).to(kl.dtype)
        return (kl * mask).sum() / mask.sum().clamp_min(1.0)
    return kl.mean()


def _task_loss(s: torch.Tensor, batch: TokenizedBatch, task: Task) -> torch.Tensor | None:
    """The mean supervised loss of the batch (:func:`search.tasks.task_loss`), None without one."""
    if not has_task_loss(task, [batch]):
        return None
    total, count = task_loss(s, batch, task)
    return total / count.clamp_min(1.0)


def _hidden_mse(hs: Sequence[torch.Tensor], ht: Sequence[torch.Tensor], batch: TokenizedBatch) -> torch.Tensor:
    mask = batch.attention_mask.unsqueeze(-1).float()
    total = hs[0].new_zeros((), dtype=torch.float32)
    for a, b in zip(hs, ht, strict=True):
        d = (a.float() - b.float()).square() * mask
        total = total + d.sum() / (mask.sum() * a.shape[-1]).clamp_min(1.0)
    return total / max(1, len(hs))


def _attention_mse(as_: Sequence[torch.Tensor], at: Sequence[torch.Tensor], batch: TokenizedBatch) -> torch.Tensor:
    m = batch.attention_mask.float()
    pair = (m[:, :, None] * m[:, None, :])[:, None]  # [B, 1, T, T]
    total = as_[0].new_zeros((), dtype=torch.float32)
    for a, b in zip(as_, at, strict=True):
        d = (a.float() - b.float()).square() * pair
        total = total + d.sum() / (pair.sum() * a.shape[1]).clamp_min(1.0)
    return total / max(1, len(as_))


def _loss(
    student: nn.Module,
    teacher: nn.Module,
    batch: TokenizedBatch,
    task: Task,
    config: RefineConfig,
    hidden: bool,
    attentions: bool,
) -> torch.Tensor:
    with torch.no_grad():
        t_out = _forward(teacher, batch, hidden=hidden, attentions=attentions)
    s_out = _forward(student, batch, hidden=hidden, attentions=attentions)
    s_main, t_main = _task_output(s_out, batch, task), _task_output(t_out, batch, task)
    loss = s_main.new_zeros(())
    if config.kd_logits > 0:
        loss = loss + config.kd_logits * _output_kd(s_main, t_main, batch, task, config.temperature)
    if hidden:
        hs, ht = getattr(s_out, "hidden_states", None), getattr(t_out, "hidden_states", None)
        if hs is not None and ht is not None and len(hs) == len(ht):
            loss = loss + config.kd_hidden * _hidden_mse(hs, ht, batch)
    if attentions:
        as_, at = getattr(s_out, "attentions", None), getattr(t_out, "attentions", None)
        if as_ and at and len(as_) == len(at) and all(isinstance(a, torch.Tensor) for a in as_):
            loss = loss + config.kd_attention * _attention_mse(as_, at, batch)
    if config.task > 0:
        tl = _task_loss(s_main, batch, task)
        if tl is not None:
            loss = loss + config.task * tl
    return loss
