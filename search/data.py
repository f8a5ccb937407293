"""Labeled text data: loading, a calibration/evaluation split, and tokenization into batches.

``load_text_data`` reads one of:

* a JSON-lines file (``.jsonl``, ``.json-lines``, ``.jsonlines``, ``.ndjson``; a ``.json`` file holding
  either JSON lines or one array of objects): one object per line, blank lines ignored;
* a CSV (``.csv``) or TSV (``.tsv``) file with a header row. CSV follows the usual quoting rules;
  TSV is read without quoting (one row per line, as GLUE-style TSVs are written), so quotes in
  the text are kept as they are;
* a Hugging Face ``datasets`` name, optionally ``"name:split"``, or a folder written by
  ``Dataset.save_to_disk``, when the ``datasets`` package is importable and the data is on this
  machine (nothing is downloaded when ``HF_HUB_OFFLINE=1``).

Labels become integers (or floats, for regression: ``numeric_labels=True``). Integer labels (and strings that spell integers, as every CSV value
is a string) are kept as they are. Other strings are mapped to the index of their name in
``label_names`` when given, else in the sorted list of the distinct labels found. **When the data
feeds a classifier, pass the model's label order** (``[config.id2label[i] for i in range(n)]``)
so that label ``i`` means what the model's output ``i`` means; the sorted order only happens to
match where the model was trained with sorted names.

``load_token_data`` reads token-classification data: JSON lines (or a local dataset) whose rows hold
a list of words (``tokens``) and a list of tags, one per word (``tags``): class names or indices,
``-100`` for a word no metric counts. Tags become integers the same way labels do.
:func:`tokenize` labels the first sub-word token of each word with its tag and every other token
(continuations, special tokens, padding) with :data:`IGNORE_INDEX`, as transformers' examples do;
it needs a fast tokenizer (one that maps tokens back to words).

For causal LMs, :func:`token_windows` cuts plain text into fixed-length token windows instead of
one sequence per row: calibration and evaluation windows from disjoint texts, no padding.

Every problem with the data raises :class:`search.errors.DataError` whose ``field`` names the
argument at fault (``source``, ``text_field``, ``label_field``, ``label_names``, ``data``) and whose
message names the file, the line or row and what was found instead.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.errors import DataError, InvalidInputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "IGNORE_INDEX",
    "TextExample",
    "TextData",
    "TokenizedBatch",
    "load_text_data",
    "load_token_data",
    "split_data",
    "tokenize",
    "token_windows",
    "Windows",
    "JSONL_SUFFIXES",
    "CSV_SUFFIXES",
]

JSONL_SUFFIXES: tuple[str, ...] = (".jsonl", ".json-lines", ".jsonlines", ".ndjson", ".json")
CSV_SUFFIXES: tuple[str, ...] = (".csv", ".tsv")

_INT_RE = re.compile(r"^[+-]?\d+$")

#: The label of a token (or a word) that no metric or loss counts.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TextExample:
    """One text and its label: an integer class, a float (regression), or ``None`` (unlabeled).

    Token classification examples hold the ``words`` (``text`` is them joined by spaces) and one
    integer ``tags`` entry per word (:data:`IGNORE_INDEX` where a word is not counted), or ``tags``
    ``None`` when unlabeled.
    """

    text: str
    label: int | float | None = None
    words: tuple[str, ...] | None = None
    tags: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TextData:
    """A list of examples; ``label_names[i]`` is the original label value of label ``i`` as text.

    ``label_names`` is ``None`` for unlabeled data and for integer labels loaded without names.
    """

    examples: list[TextExample]
    label_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.examples]

    @property
    def labels(self) -> list[int | float | None]:
        return [e.label for e in self.examples]

    @property
    def has_labels(self) -> bool:
        """Every example has a label (or, for token classification, its tags)."""
        return bool(self.examples) and (
            all(e.label is not None for e in self.examples) or all(e.tags is not None for e in self.examples)
        )


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    """One raw record and where it came from (for error messages)."""

    where: str  # "line 4" / "row 3 (line 4)" / "row 3"
    record: Mapping[str, Any]


def load_text_data(
    source: str | Path,
    *,
    text_field: str = "text",
    label_field: str | None = None,
    limit: int | None = None,
    label_names: Sequence[str] | None = None,
    numeric_labels: bool = False,
    name: str | None = None,
) -> TextData:
    """Load texts (and labels when ``label_field`` is given) from a file or a local HF dataset.

    ``limit`` keeps the first ``limit`` rows (in file order); only those are validated.
    ``numeric_labels``: labels are real numbers (regression targets), kept as floats. ``name`` is
    what error messages call a file or dataset folder (default: ``source`` as given), e.g. the name a
    user knows a file by when it is read from elsewhere.
    """
    if not isinstance(text_field, str) or not text_field:
        raise InvalidInputError("text_field must be a non-empty string", field="text_field")
    if label_field is not None and (not isinstance(label_field, str) or not label_field):
        raise InvalidInputError("label_field must be a non-empty string or None", field="label_field")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidInputError(f"limit must be a positive integer, got {limit!r}", field="limit")
    names = _check_label_names(label_names)

    rows, describe, class_names = _read_source(source, text_field=text_field, label_field=label_field, name=name)
    if names is None and class_names is not None:
        names = class_names

    texts: list[str] = []
    raw_labels: list[tuple[str, Any]] = []
    for row in rows:
        texts.append(_text_of(row, text_field, describe))
        if label_field is not None:
            read = _float_label_of if numeric_labels else _raw_label_of
            raw_labels.append((row.where, read(row, label_field, describe)))
        if limit is not None and len(texts) >= limit:
            break  # before the generator reads (and checks) the next row
    if not texts:
        raise DataError(f"{describe} has no rows", field="source")

    if label_field is None:
        return TextData([TextExample(t, None) for t in texts], None)
    if numeric_labels:
        return TextData([TextExample(t, float(v)) for t, (_, v) in zip(texts, raw_labels, strict=True)], None)
    labels, out_names = _map_labels(raw_labels, names, label_field, describe)
    return TextData([TextExample(t, lab) for t, lab in zip(texts, labels, strict=True)], out_names)


def _check_label_names(label_names: Sequence[str] | None) -> list[str] | None:
    if label_names is None:
        return None
    if isinstance(label_names, str) or not isinstance(label_names, Sequence):
        raise InvalidInputError("label_names must be a list of strings", field="label_names")
    names = [str(n) for n in label_names]
    if not names:
        raise InvalidInputError("label_names is empty", field="label_names")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidInputError(f"label_names repeats {', '.join(map(repr, dupes))}", field="label_names")
    return names


def _read_source(
    source: str | Path, *, text_field: str, label_field: str | None, name: str | None = None
) -> tuple[Iterator[_Row], str, list[str] | None]:
    """Open ``source``; return its rows (lazily), a description for messages (naming the source
    ``name``, default ``source``), class names if known."""
    if not isinstance(source, str | Path) or not str(source).strip():
        raise DataError("source must be a file path or a dataset name", field="source")
    path = Path(source)
    label = str(source) if name is None else name
    suffix = path.suffix.lower()
    if path.is_dir():
        return _read_hf(str(source), from_disk=True, text_field=text_field, label_field=label_field, label=label)
    if path.is_file():
        if suffix in JSONL_SUFFIXES:
            return _read_jsonl(path, label), f"file {label!r}", None
        if suffix in CSV_SUFFIXES:
            return _read_csv(path, text_field, label_field, label), f"file {label!r}", None
        raise DataError(
            f"file {label!r} has an unsupported extension {suffix or '(none)'!r}; "
            f"use one of {', '.join(JSONL_SUFFIXES + CSV_SUFFIXES)}",
            field="source",
        )
    if isinstance(source, Path) or suffix in JSONL_SUFFIXES + CSV_SUFFIXES or _looks_like_path(str(source)):
        raise DataError(f"file {label!r} not found", field="source")
    return _read_hf(str(source), from_disk=False, text_field=text_field, label_field=label_field)


def _looks_like_path(s: str) -> bool:
    """A string that is meant as a file, not a dataset name such as ``glue`` or ``owner/name:split``."""
    return (
        s.startswith((".", "/", "~"))
        or "\\" in s
        or s.count("/") > 1
        or re.fullmatch(r"\.[A-Za-z0-9]{1,5}", Path(s).suffix) is not None
    )


def _read_text_file(path: Path, label: str) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read file {label!r}: {exc.strerror or exc}", field="source") from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"file {label!r} is not UTF-8 text (undecodable byte on line {line})", field="source"
        ) from exc


def _read_jsonl(path: Path, label: str) -> Iterator[_Row]:
    content = _read_text_file(path, label)
    if not content.strip():
        raise DataError(f"file {label!r} is empty", field="source")
    stripped = content.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        yield from _read_json_array(label, content)
        return
    # Split on "\n" only: JSON strings may hold U+2028 and other characters str.splitlines() splits on.
    for lineno, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"file {label!r} line {lineno} is not valid JSON ({exc.msg} at column {exc.colno})",
                field="source",
            ) from exc
        if not isinstance(record, dict):
            raise DataError(
                f"file {label!r} line {lineno} is a JSON {_json_kind(record)}, not an object",
                field="source",
            )
        yield _Row(f"line {lineno}", record)


def _read_json_array(label: str, content: str) -> Iterator[_Row]:
    try:
        records = json.loads(content)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"file {label!r} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
            field="source",
        ) from exc
    if not isinstance(records, list):
        raise DataError(f"file {label!r} holds a JSON {_json_kind(records)}, not a list", field="source")
    for i, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(
                f"file {label!r} item {i} is a JSON {_json_kind(record)}, not an object", field="source"
            )
        yield _Row(f"item {i}", record)


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _read_csv(path: Path, text_field: str, label_field: str | None, label: str) -> Iterator[_Row]:
    content = _read_text_file(path, label)
    if not content.strip():
        raise DataError(f"file {label!r} is empty", field="source")
    tsv = path.suffix.lower() == ".tsv"
    # Long texts (whole articles) exceed csv's default field limit of 128 KiB.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    lines = io.StringIO(content, newline="")
    if tsv:
        reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(lines)
    try:
        header = next(reader)
    except csv.Error as exc:  # pragma: no cover - a header line alone rarely fails
        raise DataError(f"file {label!r} line 1 is not valid CSV ({exc})", field="source") from exc
    header = [h.strip() for h in header]
    kind = "TSV" if tsv else "CSV"
    for name, arg in ((text_field, "text_field"), (label_field, "label_field")):
        if name is not None and name not in header:
            found = ", ".join(repr(h) for h in header) or "(none)"
            raise DataError(
                f"{kind} file {label!r} has no column {name!r}; columns found: {found}", field=arg
            )
    index = {h: i for i, h in reversed(list(enumerate(header)))}  # first column wins on duplicates
    rowno = 0
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(
                f"{kind} file {label!r} line {reader.line_num} is malformed ({exc})", field="source"
            ) from exc
        if not values or all(not v.strip() for v in values):
            continue  # blank line
        rowno += 1
        record = {h: values[i] for h, i in index.items() if i < len(values)}
        yield _Row(f"row {rowno} (line {reader.line_num})", record)


def _read_hf(
    name: str, *, from_disk: bool, text_field: str, label_field: str | None, label: str | None = None
) -> tuple[Iterator[_Row], str, list[str] | None]:
    """Rows of a ``datasets`` dataset available on this machine; DataError if it cannot be had."""
    try:
        import datasets
    except ImportError as exc:
        what = f"folder {(label or name)!r}" if from_disk else f"{name!r}"
        raise DataError(
            f"{what} is not an existing data file (.jsonl, .csv, .tsv), and the 'datasets' package, "
            "needed to load it as a Hugging Face dataset, is not installed",
            field="source",
        ) from exc
    split: str | None = None
    if from_disk:
        describe = f"dataset folder {(label or name)!r}"
        try:
            ds = datasets.load_from_disk(name)
        except Exception as exc:
            raise DataError(f"cannot load {describe}: {exc}", field="source") from exc
    else:
        ds_name, _, split_part = name.partition(":")
        split = split_part or None
        describe = f"dataset {ds_name!r}" + (f" split {split!r}" if split else "")
        try:
            ds = datasets.load_dataset(ds_name, split=split)
        except Exception as exc:
            raise DataError(
                f"cannot load {describe} from this machine (nothing is downloaded offline): "
                f"{type(exc).__name__}: {exc}",
                field="source",
            ) from exc
    if isinstance(ds, Mapping):  # a DatasetDict: several splits
        splits = list(ds.keys())
        if split is None and len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise DataError(
                f"{describe} has splits {', '.join(map(repr, splits))}; name one as '{name}:SPLIT'",
                field="source",
            )
    columns = list(getattr(ds, "column_names", None) or [])
    for col, arg in ((text_field, "text_field"), (label_field, "label_field")):
        if col is not None and columns and col not in columns:
            raise DataError(
                f"{describe} has no column {col!r}; columns found: {', '.join(map(repr, columns))}", field=arg
            )
    class_names: list[str] | None = None
    features = getattr(ds, "features", None)
    if label_field is not None and features is not None:
        feat = features.get(label_field) if hasattr(features, "get") else None
        feat_names = getattr(feat, "names", None) or getattr(getattr(feat, "feature", None), "names", None)
        if feat_names:
            class_names = [str(n) for n in feat_names]

    def rows() -> Iterator[_Row]:
        for i, record in enumerate(ds, start=1):
            yield _Row(f"row {i}", record)

    return rows(), describe, class_names


def _text_of(row: _Row, text_field: str, describe: str) -> str:
    if text_field not in row.record:
        found = ", ".join(repr(k) for k in row.record) or "(none)"
        raise DataError(
            f"{describe} {row.where} has no field {text_field!r}; fields found: {found}", field="text_field"
        )
    text = row.record[text_field]
    if text is None:
        raise DataError(f"{describe} {row.where} has an empty {text_field!r}", field="text_field")
    if not isinstance(text, str):
        raise DataError(
            f"{describe} {row.where}: {text_field!r} is a {type(text).__name__}, not a string",
            field="text_field",
        )
    if not text.strip():
        raise DataError(f"{describe} {row.where} has an empty {text_field!r}", field="text_field")
    return text


def _raw_label_of(row: _Row, label_field: str, describe: str) -> Any:
    value = row.record.get(label_field)
    if label_field not in row.record or value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{describe} {row.where} has no label in {label_field!r}", field="label_field")
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise DataError(
                f"{describe} {row.where}: label {value!r} is not an integer or a class name",
                field="label_field",
            )
        return int(value)
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int):
        return value
    raise DataError(
        f"{describe} {row.where}: label {value!r} is a {type(value).__name__}, not an integer or a string",
        field="label_field",
    )


def _float_label_of(row: _Row, label_field: str, describe: str) -> float:
    value = row.record.get(label_field)
    if label_field not in row.record or value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{describe} {row.where} has no label in {label_field!r}", field="label_field")
    if isinstance(value, bool):
        value = None
    elif isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            value = None
    if not isinstance(value, int | float) or not math.isfinite(float(value)):
        raise DataError(
            f"{describe} {row.where}: label {row.record.get(label_field)!r} in {label_field!r} is not a number "
            "(a regression needs a real number per row)",
            field="label_field",
        )
    return float(value)


def load_token_data(
    source: str | Path,
    *,
    tokens_field: str = "tokens",
    tags_field: str | None = "tags",
    tag_names: Sequence[str] | None = None,
    limit: int | None = None,
    name: str | None = None,
) -> TextData:
    """Load token-classification data: a list of words and (when ``tags_field`` is given) a list of
    tags, one per word, from every row of a JSON-lines file or a local HF dataset (see the module
    docstring). Tag names are mapped to the index of their name in ``tag_names`` when given (pass
    the model's ``id2label`` order), else in the sorted list of the distinct names found. ``name``
    is what error messages call the source (as in :func:`load_text_data`)."""
    for fld, value in (("tokens_field", tokens_field), ("tags_field", tags_field)):
        if value is not None and (not isinstance(value, str) or not value):
            raise InvalidInputError(f"{fld} must be a non-empty string", field=fld)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidInputError(f"limit must be a positive integer, got {limit!r}", field="limit")
    names = _check_label_names(tag_names)
    rows, describe, class_names = _read_source(source, text_field=tokens_field, label_field=tags_field, name=name)
    if names is None and class_names is not None:
        names = class_names
    words_of: list[tuple[str, ...]] = []
    raw_tags: list[list[tuple[str, Any]]] = []
    for row in rows:
        words = row.record.get(tokens_field)
        if tokens_field not in row.record:
            found = ", ".join(repr(k) for k in row.record) or "(none)"
            raise DataError(f"{describe} {row.where} has no field {tokens_field!r}; fields found: {found}",
                            field="tokens_field")  # fmt: skip
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise DataError(
                f"{describe} {row.where}: {tokens_field!r} must be a non-empty list of non-empty strings, "
                f"not {_json_kind(words) if not isinstance(words, list) else 'a list holding ' + repr(words[:3])}",
                field="tokens_field",
            )
        words_of.append(tuple(words))
        if tags_field is not None:
            tags = row.record.get(tags_field)
            if not isinstance(tags, list):
                raise DataError(
                    f"{describe} {row.where}: {tags_field!r} must be a list of tags, one per word, not "
                    f"{_json_kind(tags)}",
                    field="tags_field",
                )
            if len(tags) != len(words):
                raise DataError(
                    f"{describe} {row.where}: {len(words)} words in {tokens_field!r} but {len(tags)} tags in "
                    f"{tags_field!r}",
                    field="tags_field",
                )
            raw_tags.append([
                (f"{row.where} tag {j + 1}", _raw_label_of(_Row(row.where, {tags_field: t}), tags_field, describe))
                for j, t in enumerate(tags)
            ])  # fmt: skip
        if limit is not None and len(words_of) >= limit:
            break
    if not words_of:
        raise DataError(f"{describe} has no rows", field="source")
    if tags_field is None:
        return TextData([TextExample(" ".join(w), None, w, None) for w in words_of], None)
    flat = [t for tags in raw_tags for t in tags if t[1] != IGNORE_INDEX]
    mapped, out_names = _map_labels(flat, names, tags_field, describe) if flat else ([], names)
    it = iter(mapped)
    examples = []
    for w, tags in zip(words_of, raw_tags, strict=True):
        ints = tuple(IGNORE_INDEX if v == IGNORE_INDEX else next(it) for _, v in tags)
        examples.append(TextExample(" ".join(w), None, w, ints))
    return TextData(examples, out_names)


def _map_labels(
    raw: list[tuple[str, Any]], names: list[str] | None, label_field: str, describe: str
) -> tuple[list[int], list[str] | None]:
    """Turn raw labels (ints and stripped strings) into indices; return them and the names."""
    if names is not None:
        lookup = {n: i for i, n in enumerate(names)}
        out: list[int] = []
        for where, value in raw:
            if isinstance(value, str) and value in lookup:
                out.append(lookup[value])
                continue
            as_int = value if isinstance(value, int) else (int(value) if _INT_RE.match(value) else None)
            if as_int is not None and 0 <= as_int < len(names):
                out.append(as_int)
                continue
            raise DataError(
                f"{describe} {where}: unknown label {value!r} in {label_field!r}; "
                f"known: {', '.join(map(repr, names))}",
                field="label_field",
            )
        return out, list(names)

    if all(isinstance(v, int) or _INT_RE.match(v) for _, v in raw):
        ints = [(w, v if isinstance(v, int) else int(v)) for w, v in raw]
        for where, v in ints:
            if v < 0:
                raise DataError(
                    f"{describe} {where}: label {v} in {label_field!r} is negative (unlabeled rows?); "
                    "labels must be class indices from 0",
                    field="label_field",
                )
        return [v for _, v in ints], None

    mixed = [(w, v) for w, v in raw if isinstance(v, int)]
    if mixed:
        where, v = mixed[0]
        raise DataError(
            f"{describe} {where}: label {v!r} in {label_field!r} is a number while other rows hold class names",
            field="label_field",
        )
    sorted_names = sorted({v for _, v in raw})
    lookup = {n: i for i, n in enumerate(sorted_names)}
    return [lookup[v] for _, v in raw], sorted_names


# ----------------------------------------------------------------------------------------------
# Splitting
# ----------------------------------------------------------------------------------------------


def split_data(
    data: TextData, *, calibration: int, evaluation: int, seed: int = 0
) -> tuple[TextData, TextData]:
    """Draw two disjoint subsets: ``calibration`` rows and ``evaluation`` rows.

    The draw is seeded and stratified by label when labels exist: both subsets hold each label in
    about the proportion of the whole data (within one row per label). Each subset's examples come
    in a mixed order (labels interleaved), the same for the same data and seed.
    """
    for name, value in (("calibration", calibration), ("evaluation", evaluation)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInputError(f"{name} must be a non-negative integer, got {value!r}", field=name)
    if not isinstance(data, TextData):
        raise InvalidInputError("data must be a TextData", field="data")
    n = len(data.examples)
    need = calibration + evaluation
    if need > n:
        raise DataError(
            f"not enough rows: the data has {n}, and {calibration} calibration + {evaluation} evaluation "
            f"= {need} are needed",
            field="data",
        )
    order = _stratified_order(data.examples, seed)
    cal = [data.examples[i] for i in order[:calibration]]
    ev = [data.examples[i] for i in order[calibration:need]]
    return TextData(cal, data.label_names), TextData(ev, data.label_names)


def _stratified_order(examples: Sequence[TextExample], seed: int) -> list[int]:
    """A seeded permutation whose every prefix holds each label in proportion (±1 per label).

    Each label's indices are shuffled, the r-th of a label of size n gets the position
    ``(r + offset) / n`` with one random offset per label in [0, 1); sorting by position interleaves
    the labels evenly. Without labels this is a plain shuffle.
    """
    rng = random.Random(seed)
    by_label: dict[int | None, list[int]] = {}
    for i, ex in enumerate(examples):
        by_label.setdefault(ex.label, []).append(i)
    keyed: list[tuple[float, float, int]] = []
    for label in sorted(by_label, key=lambda v: (v is None, v if v is not None else 0)):
        idx = by_label[label]
        rng.shuffle(idx)
        offset = rng.random()
        size = len(idx)
        for r, i in enumerate(idx):
            keyed.append(((r + offset) / size, rng.random(), i))
    keyed.sort()
    return [i for _, _, i in keyed]


# ----------------------------------------------------------------------------------------------
# Tokenizing
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedBatch:
    """``input_ids`` and ``attention_mask`` of shape [batch, length] (int64), right-padded."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None

    def to(self, device: Any) -> TokenizedBatch:
        return TokenizedBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            None if self.labels is None else self.labels.to(device),
        )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, start: int, stop: int) -> TokenizedBatch:
        """Rows ``start:stop`` of the batch (views; the padding width is kept)."""
        return TokenizedBatch(
            self.input_ids[start:stop],
            self.attention_mask[start:stop],
            None if self.labels is None else self.labels[start:stop],
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments for ``model(**batch.model_inputs())`` (labels excluded)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def tokenize(
    data: TextData, tokenizer: Any, *, max_length: int = 128, batch_size: int = 16
) -> list[TokenizedBatch]:
    """Tokenize ``data`` in order into batches of ``batch_size`` (the last may be smaller).

    Each batch is padded on the right to its longest sequence; sequences are truncated to
    ``max_length`` tokens (special tokens included). Examples with ``words`` (token
    classification) are tokenized as pre-split words, and their labels are ``[batch, length]``:
    each word's tag on its first token, :data:`IGNORE_INDEX` elsewhere. Padding is done here, not by the tokenizer,
    so the tokenizer object is never changed: a tokenizer without a pad token (GPT-2, Llama) pads
    with its eos token id, and a tokenizer configured to pad on the left is still padded on the
    right. Labels become an int64 tensor when every example has one, else ``labels`` is ``None``.
    """
    import torch

    for name, value in (("max_length", max_length), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"{name} must be a positive integer, got {value!r}", field=name)
    if not data.examples:
        raise DataError("no examples to tokenize", field="data")
    pad_id = _pad_id(tokenizer)
    with_labels = data.has_labels
    split_words = all(ex.words is not None for ex in data.examples)
    if split_words and not getattr(tokenizer, "is_fast", False):
        from search.errors import ModelLoadError

        raise ModelLoadError(
            "token classification needs a fast tokenizer (a tokenizer.json), which maps tokens back to words",
            field="model",
        )
    float_labels = any(isinstance(ex.label, float) for ex in data.examples)
    batches: list[TokenizedBatch] = []
    for start in range(0, len(data.examples), batch_size):
        chunk = data.examples[start : start + batch_size]
        try:
            enc = tokenizer(
                [list(ex.words or ()) for ex in chunk] if split_words else [ex.text for ex in chunk],
                truncation=True,
                max_length=max_length,
                padding=False,
                return_attention_mask=True,
                **({"is_split_into_words": True} if split_words else {}),
            )
        except Exception as exc:  # a tokenizer that rejects its input or its options
            raise DataError(
                f"the tokenizer failed on rows {start + 1}-{start + len(chunk)}: {type(exc).__name__}: {exc}",
                field="data",
            ) from exc
        ids_list: list[list[int]] = [list(map(int, ids)) for ids in enc["input_ids"]]
        masks: list[list[int]] = [list(map(int, m)) for m in enc["attention_mask"]]
        for j, ids in enumerate(ids_list):
            if not ids:
                raise DataError(f"row {start + j + 1} tokenizes to no tokens", field="data")
        width = max(len(ids) for ids in ids_list)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (ids, mask) in enumerate(zip(ids_list, masks, strict=True)):
            input_ids[j, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[j, : len(mask)] = torch.tensor(mask, dtype=torch.long)
        labels: torch.Tensor | None = None
        if with_labels and split_words:
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for j, ex in enumerate(chunk):
                previous = None
                for pos, word in enumerate(enc.word_ids(j)):
                    if word is not None and word != previous:
                        labels[j, pos] = (ex.tags or ())[word]
                    previous = word
        elif with_labels:
            labels = torch.tensor([ex.label for ex in chunk], dtype=torch.float32 if float_labels else torch.long)
        batches.append(TokenizedBatch(input_ids, attention, labels))
    return batches


def _pad_id(tokenizer: Any) -> int:
    """The pad token id, else the eos token id, else 0 (masked out either way)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, list | tuple):  # some configs list several eos ids
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


# ----------------------------------------------------------------------------------------------
# Token windows (causal LMs)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Windows:
    """Calibration and evaluation batches of fixed-length token windows (:func:`token_windows`) and
    which texts (indices into the data) fed each: the two sets of texts are disjoint."""

    calibration: list[TokenizedBatch]
    evaluation: list[TokenizedBatch]
    calibration_texts: list[int]
    evaluation_texts: list[int]
    length: int

    @property
    def tokens(self) -> tuple[int, int]:
        """Tokens in the calibration and in the evaluation windows."""
        return (sum(int(b.input_ids.numel()) for b in self.calibration),
                sum(int(b.input_ids.numel()) for b in self.evaluation))  # fmt: skip


def token_windows(
    data: TextData,
    tokenizer: Any,
    *,
    length: int,
    calibration: int,
    evaluation: int,
    batch_size: int = 16,
    seed: int = 0,
) -> Windows:
    """Cut plain text into windows of exactly ``length`` tokens, ``calibration`` windows and then
    ``evaluation`` windows, with no text in both.

    The texts are taken in a seeded shuffled order; each is tokenized without special tokens and
    followed by the tokenizer's eos token (when it has one), and the tokens run on from one text to
    the next into one stream that is cut into consecutive windows. Once the calibration windows are
    full, the rest of the text being read is dropped and the evaluation windows start with the next
    text, so no text (and no token) feeds both. Every window is full: no padding, every position is
    scored. Raises :class:`DataError` (``field="data"``) when the text runs out first.
    """
    import torch

    for name, value in (("max_length", length), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"{name} must be a positive integer, got {value!r}", field=name)
    if length < 2:
        raise InvalidInputError("max_length must be at least 2 for token windows", field="max_length")
    for name, value in (("calibration", calibration), ("evaluation", evaluation)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInputError(f"{name} must be a non-negative integer, got {value!r}", field=name)
    if not data.examples:
        raise DataError("no texts to cut into windows", field="data")
    order = list(range(len(data.examples)))
    random.Random(seed).shuffle(order)
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, list | tuple):
        eos = eos[0] if eos else None
    tail = [int(eos)] if isinstance(eos, int) and not isinstance(eos, bool) else []

    parts: list[list[list[int]]] = [[], []]
    texts: list[list[int]] = [[], []]
    wanted = (calibration, evaluation)
    part, buffer, pos = 0, [], 0
    while part < 2 and wanted[part] == 0:
        part += 1
    while part < 2 and pos < len(order):
        i = order[pos]
        pos += 1
        ids = list(map(int, tokenizer(data.examples[i].text, add_special_tokens=False)["input_ids"])) + tail
        texts[part].append(i)
        buffer.extend(ids)
        while len(buffer) >= length and len(parts[part]) < wanted[part]:
            parts[part].append(buffer[:length])
            buffer = buffer[length:]
        if len(parts[part]) == wanted[part]:
            buffer = []  # the rest of this text feeds nothing: the next part starts with a new text
            part += 1
            while part < 2 and wanted[part] == 0:
                part += 1
    if part < 2:
        have = [len(p) for p in parts]
        raise DataError(
            f"the data's {len(order)} texts hold {have[0]} calibration and {have[1]} evaluation windows of "
            f"{length} tokens; {calibration} and {evaluation} were asked for (fewer windows, shorter ones, "
            "or more text)",
            field="data",
        )

    def batches(windows: list[list[int]]) -> list[TokenizedBatch]:
        out = []
        for start in range(0, len(windows), batch_size):
            ids = torch.tensor(windows[start : start + batch_size], dtype=torch.long)
            out.append(TokenizedBatch(ids, torch.ones_like(ids)))
        return out

    return Windows(batches(parts[0]), batches(parts[1]), texts[0], texts[1], length)
