"""Running a whole search in-process from a model directory and a data file.

:func:`prepare` does every check that needs no long computation (model loads, data fits, budget is
feasible) and returns a live :class:`~search.pipeline.Search`; :func:`run_local` runs it. The
``bitscout search`` command and the workers' job runner both go through :func:`prepare`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from search.data import TextData, load_text_data, split_data, tokenize
from search.errors import DataError, InvalidInputError, ModelLoadError
from search.pipeline import Search, SearchOptions
from search.result import SearchResult
from search.sensitivity import ProgressFn, StopFn
from search.tasks import TASKS, Task, load_model


@dataclass(frozen=True)
class DataOptions:
    """Where the data are and how much of them to use. ``name`` is what error messages call the
    source (default: ``source`` itself), e.g. the file name a user uploaded when ``source`` is
    where a server keeps it."""

    source: str
    text_field: str = "text"
    label_field: str | None = None
    calibration: int = 64
    evaluation: int = 256
    max_length: int = 128
    batch_size: int = 16
    name: str | None = None


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (or None) picks CUDA when a GPU is present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise InvalidInputError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}", field="device")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError("device 'cuda' was asked for but no GPU is available", field="device")
    return torch.device(device)


def detect_task_from_dir(model_dir: str | Path) -> Task:
    """The task a checkpoint was saved for, from ``config.json``'s ``architectures``."""
    cfg_file = Path(model_dir) / "config.json"
    try:
        archs = json.loads(cfg_file.read_text()).get("architectures") or []
    except FileNotFoundError:
        raise ModelLoadError(f"{str(model_dir)!r} is not a transformers model: it has no config.json", field="model") from None
    except ValueError as exc:
        raise ModelLoadError(f"config.json in {str(model_dir)!r} is not valid JSON: {exc}", field="model") from exc
    for a in archs:
        if str(a).endswith("ForSequenceClassification"):
            return "sequence_classification"
        if str(a).endswith("ForCausalLM") or str(a).endswith("LMHeadModel"):
            return "causal_lm"
    return "embeddings"


def _model_label_names(model_dir: Path) -> list[str] | None:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    id2label = cfg.get("id2label") or {}
    names = [str(id2label.get(str(i), id2label.get(i, ""))) for i in range(len(id2label))]
    if not names or any(not n or n.startswith("LABEL_") for n in names):
        return None
    return names


def load_data(data: DataOptions, *, label_names: Sequence[str] | None = None) -> TextData:
    return load_text_data(
        data.source, text_field=data.text_field, label_field=data.label_field, label_names=label_names,
        name=data.name,
    )


def prepare(
    model_dir: str | Path,
    data: DataOptions,
    options: SearchOptions,
    *,
    task: str | None = None,
    device: str | None = "auto",
) -> Search:
    """Load the model and the data, split and tokenize the data, build the search; every check
    that can fail fast fails here."""
    model_dir = Path(model_dir)
    if task in (None, "auto"):
        task = detect_task_from_dir(model_dir)
    if task not in TASKS:
        raise InvalidInputError(f"unknown task {task!r}; known: {', '.join(TASKS)}", field="task")
    dev = resolve_device(device)
    label_names = None
    if task == "sequence_classification" and data.label_field is not None:
        label_names = _model_label_names(model_dir)
    text = load_data(data, label_names=label_names)
    if task == "sequence_classification" and data.label_field is not None and text.label_names:
        n_labels = len(text.label_names)
    else:
        n_labels = None
    lm = load_model(
        model_dir, task, num_labels=n_labels, label_names=text.label_names if n_labels else None, device=dev
    )
    calib, evald = split_data(text, calibration=data.calibration, evaluation=data.evaluation, seed=options.seed)
    if data.max_length < 2:
        raise DataError("max_length must be at least 2", field="max_length")
    cal_b = tokenize(calib, lm.tokenizer, max_length=data.max_length, batch_size=data.batch_size)
    ev_b = tokenize(evald, lm.tokenizer, max_length=data.max_length, batch_size=data.batch_size)
    search = Search(lm.model, task, cal_b, ev_b, options, device=dev)
    search.model_path = str(model_dir)
    search.label_names = list(text.label_names) if text.label_names else None
    return search


def run_local(
    model_dir: str | Path,
    data: DataOptions,
    options: SearchOptions,
    *,
    task: str | None = None,
    device: str | None = "auto",
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> SearchResult:
    """The whole search in-process; the result's ``info`` names the model path and the task."""
    search = prepare(model_dir, data, options, task=task, device=device)
    result = search.run(on_progress=on_progress, should_stop=should_stop)
    result.info.update(
        {
            "model_path": str(Path(model_dir).resolve()),
            "task": search.task,
            "data": data.source,
            "clip": options.clip,
            "device": str(search.device),
            "label_names": search.label_names,
        }
    )
    return result
