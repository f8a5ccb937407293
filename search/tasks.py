"""Tasks: loading a model for a task, reading its outputs, and the quality metrics.

Five tasks are supported (:mod:`bitscout.architectures` says which a checkpoint was saved for):

==========================  ==========================================  ===================================
task                        output read from the model                  metrics
==========================  ==========================================  ===================================
``sequence_classification``  ``logits`` ``[B, C]``                       accuracy (labels), kl
``token_classification``     ``logits`` ``[B, T, C]``                    accuracy on labeled tokens, kl
``regression``               ``logits`` ``[B, 1]``                       mse, pearson (against the labels)
``embeddings``               mean of ``last_hidden_state`` over tokens   cosine (to full precision)
``causal_lm``                ``logits`` ``[B, T, V]``                    perplexity, kl
==========================  ==========================================  ===================================

The *discrepancy* of a perturbed model is what sensitivity probes measure: the KL divergence of the
full-precision output distribution to the perturbed one (per token for causal LMs, over real tokens,
and for token classification, over the scored tokens of :func:`scored_tokens`), the squared error to
the full-precision output for regression, or ``1 - cosine`` for embeddings.

Token classification labels only the first sub-word token of each word (the others, the special
tokens and the padding carry :data:`IGNORE_INDEX`, as in transformers' examples): token accuracy
and the task loss count the labeled tokens only. The Pearson correlation of a constant prediction
(or of constant labels) is reported as 0: such a model explains none of the labels' variation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bitscout.architectures import task_of, unsupported
from search.data import IGNORE_INDEX, TokenizedBatch
from search.errors import CanceledError, InvalidInputError, ModelLoadError, UnsupportedModelError

Task = Literal["sequence_classification", "token_classification", "regression", "embeddings", "causal_lm"]
TASKS: tuple[str, ...] = ("sequence_classification", "token_classification", "regression", "embeddings", "causal_lm")

#: metric name -> (tasks it applies to, higher is better)
METRICS: dict[str, tuple[tuple[str, ...], bool]] = {
    "accuracy": (("sequence_classification", "token_classification"), True),
    "kl": (("sequence_classification", "token_classification", "causal_lm"), False),
    "cosine": (("embeddings",), True),
    "perplexity": (("causal_lm",), False),
    "mse": (("regression",), False),
    "pearson": (("regression",), True),
}
#: the metrics measured against the data's labels
LABEL_METRICS: tuple[str, ...] = ("accuracy", "mse", "pearson")
DEFAULT_METRIC: dict[str, str] = {
    "sequence_classification": "accuracy",
    "token_classification": "accuracy",
    "regression": "mse",
    "embeddings": "cosine",
    "causal_lm": "perplexity",
}


def check_task(task: str) -> Task:
    if task not in TASKS:
        raise InvalidInputError(f"unknown task {task!r}; known: {', '.join(TASKS)}", field="task")
    return task  # type: ignore[return-value]


def check_metric(metric: str | None, task: str, *, has_labels: bool) -> str:
    """The metric to report for ``task`` (its default when None), validated."""
    metric = metric or DEFAULT_METRIC[task]
    if metric not in METRICS:
        raise InvalidInputError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}", field="metric")
    if task not in METRICS[metric][0]:
        raise InvalidInputError(f"metric {metric!r} does not apply to task {task!r}", field="metric")
    if metric in LABEL_METRICS and not has_labels:
        what = "tags_field" if task == "token_classification" else "label_field"
        raise InvalidInputError(f"metric {metric!r} needs labels in the data ({what})", field=what)
    return metric


def higher_is_better(metric: str) -> bool:
    return METRICS[metric][1]


def detect_task(model: nn.Module) -> Task:
    """The task of a loaded model, from its class (``...ForSequenceClassification``,
    ``...ForTokenClassification``, ``...ForCausalLM``...) and its config (a one-output sequence
    head is a regression); the rule of :func:`bitscout.architectures.task_of`."""
    cfg = getattr(model, "config", None)
    data: dict[str, object] = dict(cfg.to_dict()) if hasattr(cfg, "to_dict") else {}
    data["architectures"] = [type(model).__name__]
    if cfg is not None and hasattr(cfg, "num_labels"):
        data["num_labels"] = int(cfg.num_labels)
    return check_task(task_of(data))


def check_supported(config: Mapping[str, object], task: str | None = None) -> None:
    """Raise :class:`UnsupportedModelError` (field ``model``) when a model with ``config`` cannot be
    searched for ``task`` (see :func:`bitscout.architectures.unsupported`)."""
    reason = unsupported(config, task)
    if reason is not None:
        raise UnsupportedModelError(reason, field="model")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    task: Task
    path: str


def load_model(
    path: str | Path,
    task: str,
    *,
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = "eager",
) -> LoadedModel:
    """Load a transformers model directory for ``task`` (never with remote code).

    ``num_labels`` sizes a classification head when the checkpoint has none (a head that is
    newly initialised must be fine-tuned before its accuracy means anything). Raises
    :class:`ModelLoadError` naming what is wrong.
    """
    import transformers

    task = check_task(task)
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model directory {str(p)!r} does not exist", field="model")
    if not p.is_dir():
        raise ModelLoadError(f"{str(p)!r} is not a directory", field="model")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{str(p)!r} is not a transformers model: it has no config.json", field="model")
    try:
        raw_config = json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"config.json in {str(p)!r} is not valid JSON: {exc}", field="model") from exc
    if isinstance(raw_config, dict):
        check_supported(raw_config, task)
    if not any(p.glob("*.safetensors")):
        raise ModelLoadError(
            f"{str(p)!r} has no *.safetensors weights (pickled weights are never loaded)", field="model"
        )
    kwargs: dict[str, object] = {"trust_remote_code": False, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        config = transformers.AutoConfig.from_pretrained(str(p), trust_remote_code=False)
        if task in ("sequence_classification", "token_classification"):
            if num_labels is not None and getattr(config, "num_labels", None) != num_labels:
                kwargs["num_labels"] = num_labels
            if label_names is not None:
                kwargs["id2label"] = dict(enumerate(label_names))
                kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
            cls = (
                transformers.AutoModelForSequenceClassification
                if task == "sequence_classification"
                else transformers.AutoModelForTokenClassification
            )
        elif task == "regression":
            if getattr(config, "num_labels", None) != 1:
                kwargs["num_labels"] = 1
            kwargs["problem_type"] = "regression"
            cls = transformers.AutoModelForSequenceClassification
        elif task == "causal_lm":
            cls = transformers.AutoModelForCausalLM
        else:
            cls = transformers.AutoModel
        model = cls.from_pretrained(str(p), **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(p), trust_remote_code=False)
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many types; name the cause in one line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load {str(p)!r} as a {task} model: {msg}", field="model") from exc
    model.eval()
    model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, task=task, path=str(p))


def _forward(model: nn.Module, batch: TokenizedBatch) -> object:
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    return model(**kwargs, use_cache=False) if _accepts_use_cache(model) else model(**kwargs)


def _accepts_use_cache(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return cfg is not None and hasattr(cfg, "use_cache")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every module of ``model`` in eval mode; on exit each module's own training flag is restored
    (``model.train(flag)`` would overwrite submodules that the caller had set differently)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def model_output(model: nn.Module, batch: TokenizedBatch, task: Task) -> torch.Tensor:
    """The task's output tensor for one batch, in float32 (see the module table)."""
    out = _forward(model, batch)
    if task == "embeddings":
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).float()
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()


def scored_tokens(batch: TokenizedBatch, task: Task) -> torch.Tensor:
    """The ``[B, T]`` mask of the tokens a per-token discrepancy averages over: for token
    classification with labels, the labeled tokens (first sub-word of each word); otherwise the
    real (not padding) tokens."""
    if task == "token_classification" and batch.labels is not None and batch.labels.dim() == 2:
        return batch.labels != IGNORE_INDEX
    return batch.attention_mask.bool()


#: tokens whose float64 KL is computed at once (a causal LM's vocabulary makes each row wide)
KL_CHUNK = 256


def _kl(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(out)) over the last axis, in float64 (confident classifiers
    saturate the softmax, and float32 KL then rounds to 0)."""
    logp_ref = F.log_softmax(ref.double(), dim=-1)
    logp = F.log_softmax(out.double(), dim=-1)
    return (logp_ref.exp() * (logp_ref - logp)).sum(-1)


def _kl_tokens(ref: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> float:
    """The summed KL of the tokens of ``[..., T, V]`` outputs that ``mask`` (``[..., T]``) selects, in
    float64 chunks of :data:`KL_CHUNK` selected tokens: no temporary is wider than a chunk."""
    width = int(ref.shape[-1])
    r, o = ref.reshape(-1, width), out.reshape(-1, width)  # views of contiguous outputs
    idx = mask.reshape(-1).nonzero().squeeze(1)
    total = 0.0
    for i in range(0, int(idx.shape[0]), KL_CHUNK):
        sel = idx[i : i + KL_CHUNK]
        total += float(_kl(r.index_select(0, sel), o.index_select(0, sel)).sum())
    return total


def discrepancy(ref: torch.Tensor, out: torch.Tensor, batch: TokenizedBatch, task: Task) -> torch.Tensor:
    """Per-example discrepancy of ``out`` to the full-precision ``ref`` (see the module docstring);
    for the per-token tasks each example's mean KL over its scored tokens, computed as
    :func:`discrepancy_sum` does (chunks of tokens, never a whole float64 ``[B, T, V]``)."""
    if task in ("causal_lm", "token_classification"):
        mask = scored_tokens(batch, task)
        rows = [_kl_tokens(ref[i], out[i], mask[i]) / max(1, int(mask[i].sum())) for i in range(int(ref.shape[0]))]
        return torch.tensor(rows, dtype=torch.float64)
    ref, out = ref.double(), out.double()
    if task == "embeddings":
        return 1.0 - F.cosine_similarity(ref, out, dim=-1)
    if task == "regression":
        return (out - ref).square().sum(-1)
    return _kl(ref, out)


def discrepancy_sum(ref: torch.Tensor, out: torch.Tensor, batch: TokenizedBatch, task: Task) -> tuple[float, int]:
    """The discrepancy of one batch *summed*, and what it is summed over, so that batches of any
    shape combine into one exact mean: for a causal LM the KL of every real token's next-token
    distribution and the number of real tokens (the mean is KL per token, each token weighing the
    same whatever the length of its window); for the other tasks :func:`discrepancy` of every
    example and the number of examples."""
    if task == "causal_lm":
        mask = scored_tokens(batch, task)
        # float64 in chunks of KL_CHUNK real tokens: the temporaries stay a few vocabulary-wide rows
        return _kl_tokens(ref, out, mask), int(mask.sum())
    d = discrepancy(ref, out, batch, task)
    return float(d.sum()), int(d.shape[0])


def next_token_nll(out: torch.Tensor, batch: TokenizedBatch) -> tuple[float, int]:
    """A causal LM's summed negative log-likelihood of every real next token (token ``t + 1`` of a
    window from its logits at ``t``; padding excluded) and how many there are, in chunks of
    :data:`KL_CHUNK` tokens (no copy of the ``[B, T, V]`` logits), summed in float64."""
    n_rows, length, width = (int(s) for s in out.shape)
    valid = torch.zeros(n_rows, length, dtype=torch.bool, device=out.device)
    valid[:, :-1] = batch.attention_mask[:, 1:].bool()
    idx = valid.reshape(-1).nonzero().squeeze(1)
    logits, ids = out.reshape(-1, width), batch.input_ids.reshape(-1)
    total = 0.0
    for i in range(0, int(idx.shape[0]), KL_CHUNK):
        sel = idx[i : i + KL_CHUNK]
        total += float(F.cross_entropy(logits.index_select(0, sel).float(), ids[sel + 1], reduction="sum"))
    return total, int(idx.shape[0])


def has_task_loss(task: Task, batches: Sequence[TokenizedBatch]) -> bool:
    """Whether :func:`task_loss` applies: a causal LM always (next-token prediction), classification
    and regression when every batch has labels, embeddings never."""
    if task == "causal_lm":
        return True
    if task == "embeddings":
        return False
    return bool(batches) and all(b.labels is not None for b in batches)


def task_loss(out: torch.Tensor, batch: TokenizedBatch, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """The supervised loss of one batch, *summed*, and what it is summed over (examples, labeled
    tokens, or predicted tokens): cross-entropy for classification (per labeled token for token
    classification), squared error for regression, next-token cross-entropy for a causal LM.
    Divide the two for the mean. Raises :class:`InvalidInputError` when the task has none here."""
    if task == "causal_lm":
        logits, target = out[:, :-1], batch.input_ids[:, 1:]
        mask = batch.attention_mask[:, 1:].reshape(-1).to(logits.dtype)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        return (nll * mask).sum(), mask.sum()
    if batch.labels is None or task == "embeddings":
        raise InvalidInputError(f"the task {task!r} has no loss without labels", field="label_field")
    if task == "regression":
        err = (out.reshape(-1) - batch.labels.reshape(-1).to(out.dtype)).square()
        return err.sum(), out.new_tensor(float(err.numel()))
    if task == "token_classification":
        labels = batch.labels.reshape(-1)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, (labels != IGNORE_INDEX).sum().to(out.dtype)
    return F.cross_entropy(out, batch.labels, reduction="sum"), out.new_tensor(float(out.shape[0]))


def pearson(pred: torch.Tensor, target: torch.Tensor) -> float:
    """The Pearson correlation of two 1-d series (0 when either is constant)."""
    x, y = pred.double() - pred.double().mean(), target.double() - target.double().mean()
    den = float(x.square().sum().sqrt() * y.square().sum().sqrt())
    return float((x * y).sum()) / den if den > 0 else 0.0


@dataclass
class Reference:
    """Full-precision outputs of the evaluation batches, computed once: ``outputs[i]`` is batch
    ``i``'s (an :class:`search.memory.OutputStore`: a causal LM's logits are spilled to disk and
    read back a run of rows at a time)."""

    outputs: Sequence[torch.Tensor]


def output_row_bytes(model: nn.Module, batch: TokenizedBatch, task: Task) -> int | None:
    """The bytes of one row of a causal LM's float32 output on ``batch`` (``length x vocabulary x 4``,
    the vocabulary read from the output embeddings or the config), None for the other tasks (their
    outputs are a few values per row or token) or when the vocabulary cannot be read."""
    if task != "causal_lm":
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    cfg = getattr(model, "config", None)
    vocab = int(weight.shape[0]) if isinstance(weight, torch.Tensor) else int(getattr(cfg, "vocab_size", 0) or 0)
    return int(batch.input_ids.shape[1]) * vocab * 4 if vocab > 0 else None


def output_passes(
    model: nn.Module, batches: Sequence[TokenizedBatch], task: Task, *, budget: int | None = None
) -> Iterator[tuple[int, int, TokenizedBatch, torch.Tensor]]:
    """:func:`model_output` over ``batches`` in runs of rows sized to ``budget`` bytes
    (:func:`search.memory.pass_budget_bytes` when None; :func:`search.memory.rows_per_pass` of
    :func:`output_row_bytes`; whole batches where that is None): yields ``(batch index, first row,
    the rows' batch, their output)``, every row of every batch once, in order."""
    from search.memory import pass_budget_bytes, rows_per_pass

    for i, b in enumerate(batches):
        n, start = len(b), 0
        row_bytes = output_row_bytes(model, b, task)
        step = n if row_bytes is None else rows_per_pass(row_bytes, pass_budget_bytes() if budget is None else budget)
        while start < n:
            sub = b if start == 0 and step >= n else b.rows(start, min(n, start + step))
            yield i, start, sub, model_output(model, sub, task)
            start += len(sub)


@torch.no_grad()
def reference_outputs(
    model: nn.Module, batches: Sequence[TokenizedBatch], task: Task, *, budget: int | None = None,
    memory_bytes: int | None = None,
) -> Reference:
    """The outputs of ``model`` on ``batches`` (passes of :func:`output_passes`), in an
    :class:`~search.memory.OutputStore` that keeps ``memory_bytes`` of them in memory
    (:data:`search.memory.STORE_MEMORY_BYTES` when None) and spills the rest to disk."""
    from search.memory import STORE_MEMORY_BYTES, OutputStore

    store = OutputStore(STORE_MEMORY_BYTES if memory_bytes is None else memory_bytes)
    for i, start, _sub, out in output_passes(model, batches, task, budget=budget):
        if start == 0:
            store.reserve(len(batches[i]), out.shape[1:], out.dtype, out.device)
        store.write(i, start, out)
    return Reference(store)


def _reference_rows(reference: Reference, index: int, start: int, stop: int, device: torch.device) -> torch.Tensor:
    outputs = reference.outputs
    if hasattr(outputs, "read"):
        return outputs.read(index, start, stop, device=device)  # type: ignore[no-any-return,attr-defined]
    return outputs[index][start:stop].to(device)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Sequence[TokenizedBatch],
    task: Task,
    *,
    reference: Reference | None = None,
    should_stop: Callable[[], bool] | None = None,
    budget: int | None = None,
) -> dict[str, float]:
    """Every metric that applies to ``task`` on ``batches`` (KL / cosine need ``reference``).

    Causal LMs: ``perplexity`` is ``exp`` of the mean negative log-likelihood over every predicted
    token of every window (token ``t + 1`` from tokens ``<= t``, padding excluded), each token weighing
    the same; not a mean of per-window perplexities, so a short window counts for its tokens only.
    ``tokens`` is how many tokens that mean is over, and ``kl`` is the mean KL per real token.
    Every map of a search is evaluated on the same ``batches``, so their figures compare.

    The passes take runs of rows sized to ``budget`` (:func:`output_passes`), reading the matching
    rows of ``reference`` only: the resident memory of an evaluation does not grow with the
    batch size or the number of batches."""
    correct = n_cls = 0
    preds: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    disc_sum = 0.0
    disc_n = 0
    n_ex = 0
    nll_sum = 0.0
    n_tok = 0
    for i, start, b, out in output_passes(model, batches, task, budget=budget):
        if should_stop is not None and should_stop():
            raise CanceledError("evaluation canceled")
        if reference is not None:
            ref = _reference_rows(reference, i, start, start + len(b), out.device)
            d_sum, d_n = discrepancy_sum(ref, out, b, task)
            del ref
            disc_sum += d_sum
            disc_n += d_n
        n_ex += out.shape[0]
        if task == "sequence_classification" and b.labels is not None:
            correct += int((out.argmax(-1) == b.labels).sum())
            n_cls += int(b.labels.numel())
        if task == "token_classification" and b.labels is not None:
            labeled = b.labels != IGNORE_INDEX
            correct += int((out.argmax(-1)[labeled] == b.labels[labeled]).sum())
            n_cls += int(labeled.sum())
        if task == "regression" and b.labels is not None:
            preds.append(out.reshape(-1).double().cpu())
            targets.append(b.labels.reshape(-1).double().cpu())
        if task == "causal_lm":
            nll, count = next_token_nll(out, b)
            nll_sum += nll
            n_tok += count
    metrics: dict[str, float] = {}
    if n_cls:
        metrics["accuracy"] = correct / n_cls
    if preds:
        p, t = torch.cat(preds), torch.cat(targets)
        metrics["mse"] = float((p - t).square().mean())
        metrics["pearson"] = pearson(p, t)
    if reference is not None and n_ex:
        if task == "embeddings":
            metrics["cosine"] = 1.0 - disc_sum / n_ex
        elif task != "regression":
            metrics["kl"] = disc_sum / max(1, disc_n)
    if task == "causal_lm" and n_tok:
        metrics["perplexity"] = math.exp(min(nll_sum / n_tok, 50.0))
        metrics["tokens"] = float(n_tok)
    return metrics
