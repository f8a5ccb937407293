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

from bitscout.architectures import task_of
from search.data import TextData, load_text_data, load_token_data, split_data, token_windows, tokenize
from search.errors import DataError, InvalidInputError, ModelLoadError
from search.pipeline import Search, SearchOptions
from search.result import SearchResult
from search.sensitivity import ProgressFn, StopFn
from search.tasks import TASKS, Task, check_supported, check_task, load_model


@dataclass(frozen=True)
class DataOptions:
    """Where the data are and how much of them to use.

    ``label_field`` is read by the tasks that have one label per row (``sequence_classification``:
    class names or indices; ``regression``: numbers) and ignored by the others;
    ``token_classification`` reads ``tokens_field`` (a list of words) and ``tags_field`` (a list
    of tags, one per word; None: unlabeled). ``name`` is what error messages call the source
    (default: ``source`` itself), e.g. the file name a user uploaded when ``source`` is where a
    server keeps it.

    ``windows`` (causal LMs): the texts are cut into windows of exactly ``max_length`` tokens
    (:func:`search.data.token_windows`) and ``calibration`` / ``evaluation`` count windows, from
    disjoint texts; otherwise each row is one sequence, cut at ``max_length``.
    """

    source: str
    text_field: str = "text"
    label_field: str | None = None
    tokens_field: str = "tokens"
    tags_field: str | None = "tags"
    calibration: int = 64
    evaluation: int = 256
    max_length: int = 128
    batch_size: int = 16
    name: str | None = None
    windows: bool = False


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (or None) picks CUDA when a GPU is present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise InvalidInputError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}", field="device")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError("device 'cuda' was asked for but no GPU is available", field="device")
    return torch.device(device)


def _read_config(model_dir: str | Path) -> dict[str, object]:
    if not Path(model_dir).exists():
        raise ModelLoadError(f"model directory {str(model_dir)!r} does not exist", field="model")
    if not Path(model_dir).is_dir():
        raise ModelLoadError(f"{str(model_dir)!r} is not a directory", field="model")
    cfg_file = Path(model_dir) / "config.json"
    try:
        data = json.loads(cfg_file.read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise ModelLoadError(f"{str(model_dir)!r} is not a transformers model: it has no config.json", field="model") from None
    except ValueError as exc:
        raise ModelLoadError(f"config.json in {str(model_dir)!r} is not valid JSON: {exc}", field="model") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"config.json in {str(model_dir)!r} is not a JSON object", field="model")
    return data


def detect_task_from_dir(model_dir: str | Path) -> Task:
    """The task a checkpoint was saved for, from ``config.json`` (:func:`bitscout.architectures.task_of`)."""
    return check_task(task_of(_read_config(model_dir)))


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


def load_data(data: DataOptions, task: str = "sequence_classification", *,
              label_names: Sequence[str] | None = None) -> TextData:
    """The rows of ``data`` as ``task`` reads them (see :class:`DataOptions`)."""
    if task == "token_classification":
        return load_token_data(data.source, tokens_field=data.tokens_field, tags_field=data.tags_field,
                               tag_names=label_names, name=data.name)  # fmt: skip
    label_field = data.label_field if task in ("sequence_classification", "regression") else None
    return load_text_data(data.source, text_field=data.text_field, label_field=label_field,
                          label_names=label_names, numeric_labels=task == "regression",
                          name=data.name)  # fmt: skip


def _check_classes(text: TextData, task: str, n_classes: int, data: DataOptions) -> None:
    """Every class index of the data is an output of the model's head."""
    if task == "token_classification":
        found = [t for e in text.examples for t in (e.tags or ()) if t >= 0]
        what = f"tag in {data.tags_field!r}"
        fld = "tags_field"
    else:
        found = [int(e.label) for e in text.examples if isinstance(e.label, int)]
        what = f"label in {data.label_field!r}"
        fld = "label_field"
    if found and max(found) >= n_classes:
        raise DataError(
            f"the data has the {what} {max(found)}, but the model's head has {n_classes} classes (0-{n_classes - 1})",
            field=fld,
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
    config = _read_config(model_dir)
    asked = None if task in (None, "auto") else task
    if asked is not None and asked not in TASKS:
        raise InvalidInputError(f"unknown task {asked!r}; known: {', '.join(TASKS)}", field="task")
    check_supported(config, asked)  # before any work: a model that cannot be searched is refused here
    task = asked or detect_task_from_dir(model_dir)
    if data.windows and task != "causal_lm":
        raise InvalidInputError(f"token windows are for causal LMs; this is a {task} search", field="windows")
    dev = resolve_device(device)
    classifies = task in ("sequence_classification", "token_classification")
    labeled = data.tags_field is not None if task == "token_classification" else data.label_field is not None
    label_names = _model_label_names(model_dir) if classifies and labeled else None
    text = load_data(data, task, label_names=label_names)
    n_labels = len(text.label_names) if classifies and labeled and text.label_names else None
    lm = load_model(
        model_dir, task, num_labels=n_labels, label_names=text.label_names if n_labels else None, device=dev
    )
    if classifies and labeled and n_labels is None:
        _check_classes(text, task, int(getattr(lm.model.config, "num_labels", 0) or 0), data)
    if data.max_length < 2:
        raise DataError("max_length must be at least 2", field="max_length")
    if data.windows:
        win = token_windows(text, lm.tokenizer, length=data.max_length, calibration=data.calibration,
                            evaluation=data.evaluation, batch_size=data.batch_size, seed=options.seed)  # fmt: skip
        cal_b, ev_b = win.calibration, win.evaluation
    else:
        calib, evald = split_data(text, calibration=data.calibration, evaluation=data.evaluation, seed=options.seed)
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
    result.info.update(run_info(search, model_dir, data))
    return result


def run_info(search: Search, model_dir: str | Path, data: DataOptions) -> dict[str, object]:
    """What an in-process result's ``info`` records about the run: model path, task, data, device."""
    return {
        "model_path": str(Path(model_dir).resolve()),
        "task": search.task,
        "data": data.source,
        "windows": data.max_length if data.windows else None,
        "clip": search.options.clip,
        "act_scales": search.options.act_scales,
        # the static activation ranges the evaluation used, for an export of a point to carry
        "act_static": None if search.act_static is None else search.act_static.to_dict(),
        "device": str(search.device),
        "label_names": search.label_names,
    }
