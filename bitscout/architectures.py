"""Which saved transformers models bitscout can search, and for which task: the rule, once, read
from a model's ``config.json`` (standard library only: the SDK checks a local model before
uploading it, the search library before loading it).

=====================================================  ==============================================
``architectures`` in config.json                       task
=====================================================  ==============================================
``...ForSequenceClassification``, one output or        ``regression``
``problem_type: "regression"``
``...ForSequenceClassification`` (two or more classes)  ``sequence_classification``
``...ForTokenClassification``                          ``token_classification``
``...ForCausalLM``, ``...LMHeadModel``                 ``causal_lm``
a base model (``BertModel``), ``...ForMaskedLM``,       ``embeddings`` (mean-pooled hidden states)
``...ForPreTraining``, or no ``architectures``
=====================================================  ==============================================

Refused before any work, with one line that names what is supported: encoder-decoder models
(``is_encoder_decoder``: T5, BART, Marian...), whose two stacks of blocks the search does not
cover; regression heads with more than one output; and heads no task evaluates (question
answering, multiple choice, image or audio classification...) unless the task is given
explicitly (``embeddings`` then searches the model's encoder by its hidden states).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["SUPPORTED", "num_labels", "read_config", "task_of", "unsupported"]

#: What bitscout can search, for messages.
SUPPORTED = (
    "bitscout searches encoder-only and decoder-only transformers: ...ForSequenceClassification "
    "(classification, or regression with one output), ...ForTokenClassification, ...ForCausalLM, "
    "or a base model (embeddings)"
)

_HEADS: tuple[tuple[str, str], ...] = (
    ("ForSequenceClassification", "sequence_classification"),
    ("ForTokenClassification", "token_classification"),
    ("ForCausalLM", "causal_lm"),
    ("LMHeadModel", "causal_lm"),
)
_ENCODER_SUFFIXES: tuple[str, ...] = ("ForMaskedLM", "ForPreTraining", "Model")
_ENCODER_DECODER_SUFFIXES: tuple[str, ...] = ("ForConditionalGeneration", "Seq2SeqLM", "EncoderDecoderModel")


def read_config(model_dir: str | Path) -> dict[str, Any] | None:
    """``config.json`` of a model directory as a dict, or None when it is missing or unreadable."""
    try:
        data = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _architectures(config: Mapping[str, Any]) -> list[str]:
    archs = config.get("architectures")
    return [str(a) for a in archs] if isinstance(archs, list) else []


def num_labels(config: Mapping[str, Any]) -> int:
    """The number of outputs of a classification head (``num_labels``, else the size of ``id2label``,
    else transformers' default of 2)."""
    n = config.get("num_labels")
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    id2label = config.get("id2label")
    if isinstance(id2label, Mapping) and id2label:
        return len(id2label)
    return 2


def _is_regression(config: Mapping[str, Any]) -> bool:
    return config.get("problem_type") == "regression" or num_labels(config) == 1


def _head_task(arch: str, config: Mapping[str, Any]) -> str | None:
    for suffix, task in _HEADS:
        if arch.endswith(suffix):
            if task == "sequence_classification" and _is_regression(config):
                return "regression"
            return task
    if arch.endswith(_ENCODER_SUFFIXES):
        return "embeddings"
    return None


def task_of(config: Mapping[str, Any]) -> str:
    """The task a checkpoint was saved for (see the module table); ``embeddings`` when no
    architecture names a head this library evaluates."""
    for arch in _architectures(config):
        task = _head_task(arch, config)
        if task is not None:
            return task
    return "embeddings"


def unsupported(config: Mapping[str, Any], task: str | None = None) -> str | None:
    """Why a model with this config cannot be searched (for ``task``, or the task it was saved for
    when None), in one line that names what is supported; None when it can be."""
    archs = _architectures(config)
    name = archs[0] if archs else str(config.get("model_type") or "the model")
    if config.get("is_encoder_decoder") is True or any(a.endswith(_ENCODER_DECODER_SUFFIXES) for a in archs):
        return f"{name} is an encoder-decoder model, which cannot be searched; {SUPPORTED}"
    saved = task_of(config)
    heads = ("sequence_classification", "regression")
    if saved == "regression" and num_labels(config) > 1:
        return (
            f"{name} is a regression head with {num_labels(config)} outputs; only one output is supported "
            f"({SUPPORTED})"
        )
    if task in heads and saved in heads and task != saved:
        what = "a regression head (one output)" if saved == "regression" else f"a classifier of {num_labels(config)} classes"
        return f"{name} is {what}: search it with the task {saved!r}, not {task!r}"
    if task is None and archs and all(_head_task(a, config) is None for a in archs):
        return (
            f"{name} has a head no task evaluates; {SUPPORTED}; give the task 'embeddings' to search its "
            "encoder by its hidden states"
        )
    return None
