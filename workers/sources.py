"""Where a job's model and data are on the machine that runs it.

* A model is a directory under the server's model root (``model.path``), an uploaded archive
  (``model.upload_id``: extracted once per checksum into the work directory, with every check of
  :func:`service.uploads.extract_model_archive`), or a Hugging Face id at a pinned revision that
  is already in the local Hugging Face cache (nothing is ever downloaded).
* Data are a file under the data root (``data.path``), an uploaded file (``data.upload_id``: linked
  into the work directory under its original extension, which tells the reader its format), or a
  ``datasets`` name available on this machine.

Failures raise the search library's :class:`~search.errors.ModelLoadError` /
:class:`~search.errors.DataError`, so the runner reports ``model_load_failed`` / ``data_invalid``.

What a job's user reads never shows the server's paths: :func:`model_name` and :func:`data_name`
are the user's own names for the job's model and data (the upload's file name, the path as the
user gave it, the Hugging Face id), which the search library's messages use, and
:class:`ServerPaths` rewrites whatever path still reaches a message (the located model and data
to those names; the work directory, the file store, the data directory, the roots and the
Hugging Face cache to ``<work dir>``, ``<file store>``...).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bitscout.errors import BitscoutError, NotFound
from bitscout.schemas import JobSpec
from search.errors import DataError, ModelLoadError
from service.store import Store
from service.uploads import extract_model_archive, resolve_under
from workers.settings import RunnerConfig
from workers.spec import data_source_name


def _root(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def model_dir(spec: JobSpec, store: Store, config: RunnerConfig) -> Path:
    """The local directory of the job's model. Raises :class:`ModelLoadError`."""
    m = spec.model
    try:
        if m.path is not None:
            p = resolve_under(_root(config.model_root), m.path, what="model", field="model.path")
            if not p.is_dir():
                raise ModelLoadError(f"model.path {m.path!r} is not a directory", field="model.path")
            return p
        if m.upload_id is not None:
            return _extracted_upload(m.upload_id, store, config)
    except BitscoutError as exc:
        field = exc.field or ("model.path" if m.path is not None else "model.upload_id")
        raise ModelLoadError(exc.message, field=field) from None
    assert m.hf_id is not None  # noqa: S101 - the schema requires exactly one source
    return _hf_cached(m.hf_id, m.revision)


def _extracted_upload(upload_id: str, store: Store, config: RunnerConfig) -> Path:
    up = store.get_upload(upload_id=upload_id)
    archive = store.upload_path(upload_id=upload_id)
    base = Path(config.work_dir) / "models"
    target = base / up.sha256
    if not target.is_dir():
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{up.sha256[:12]}-", dir=base))
        try:
            extract_model_archive(
                archive,
                tmp,
                max_files=config.max_archive_files,
                max_unpacked_bytes=config.max_archive_unpacked_bytes,
            )
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():  # not another runner that got there first
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    configs = sorted(target.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise ModelLoadError(
            f"the uploaded archive {up.filename!r} holds no config.json: it is not a transformers model",
            field="model.upload_id",
        )
    return configs[0].parent


def _hf_cached(hf_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - installed with transformers
        raise ModelLoadError("huggingface_hub is not installed on the worker", field="model.hf_id") from None
    try:
        return Path(snapshot_download(repo_id=hf_id, revision=revision, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any miss means "not in the cache"
        raise ModelLoadError(
            f"{hf_id}@{(revision or '')[:12]} is not in the server's Hugging Face cache and the server does not "
            f"download models ({type(exc).__name__}); upload the model as an archive or ask the operator to "
            "place it under the model root",
            field="model.hf_id",
        ) from None


def data_source(spec: JobSpec, store: Store, config: RunnerConfig) -> str:
    """What :func:`search.local.prepare` reads the job's data from. Raises :class:`DataError`."""
    d = spec.data
    try:
        if d.path is not None:
            p = resolve_under(_root(config.data_root), d.path, what="data", field="data.path")
            if not p.is_file() and not p.is_dir():
                raise DataError(f"data.path {d.path!r} is not a file", field="data.path")
            return str(p)
        if d.upload_id is not None:
            return str(_linked_upload(d.upload_id, store, config))
    except BitscoutError as exc:
        field = exc.field or ("data.path" if d.path is not None else "data.upload_id")
        raise DataError(exc.message, field=field) from None
    name = data_source_name(spec)
    assert name is not None  # noqa: S101 - the schema requires exactly one source
    return name


def _linked_upload(upload_id: str, store: Store, config: RunnerConfig) -> Path:
    up = store.get_upload(upload_id=upload_id)
    blob = store.upload_path(upload_id=upload_id)
    suffix = "".join(Path(up.filename).suffixes[-1:]).lower() or ".jsonl"
    base = Path(config.work_dir) / "data"
    base.mkdir(parents=True, exist_ok=True)
    target = base / f"{up.sha256}{suffix}"
    if not target.is_file():
        tmp = base / f".{up.sha256}.{os.getpid()}{suffix}"
        try:
            os.link(blob, tmp)
        except OSError:
            shutil.copyfile(blob, tmp)
        os.replace(tmp, target)
    return target


def latency_table(spec: JobSpec, store: Store) -> dict[str, Any] | None:
    """The latency table the job's ``budget.latency_table`` names (an upload of kind
    ``latency_table``), read as JSON; None when the budget names none. Raises :class:`DataError`
    (``budget.latency_table``) for a missing upload or one of another kind."""
    upload_id = spec.budget.latency_table
    if upload_id is None:
        return None
    try:
        up = store.get_upload(upload_id=upload_id)
        if up.kind != "latency_table":
            raise DataError(
                f"upload {upload_id} is a {up.kind} upload, not a latency table (upload it with kind=latency_table)",
                field="budget.latency_table",
            )
        data = json.loads(store.upload_path(upload_id=upload_id).read_text(encoding="utf-8"))
    except BitscoutError as exc:
        raise DataError(exc.message, field="budget.latency_table") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the latency table {upload_id}: {exc}", field="budget.latency_table") from None
    return data if isinstance(data, dict) else {"entries": data}


# --------------------------------------------------------------------------- what the user calls them


def _upload_name(store: Store, upload_id: str) -> str:
    try:
        return store.get_upload(upload_id=upload_id).filename
    except NotFound:
        return f"upload {upload_id}"


def model_name(spec: JobSpec, store: Store) -> str:
    """What the job's user calls its model: the uploaded archive's file name, ``model.path`` as
    given, or ``hf_id@revision``."""
    m = spec.model
    if m.upload_id is not None:
        return _upload_name(store, m.upload_id)
    if m.path is not None:
        return m.path
    return f"{m.hf_id}@{(m.revision or '')[:12]}"


def data_name(spec: JobSpec, store: Store) -> str | None:
    """What the job's user calls its data file: the upload's file name or ``data.path`` as given
    (None for a dataset, which is called by its own name)."""
    d = spec.data
    if d.upload_id is not None:
        return _upload_name(store, d.upload_id)
    return d.path


class ServerPaths:
    """Rewrites the server's paths in a message into what the job's user knows.

    It starts with the server's own places (``<work dir>``, ``<file store>``, ``<data dir>``,
    ``<model root>``, ``<data root>``, ``<Hugging Face cache>``); :meth:`name` adds a located
    model or data path with the user's name for it. :meth:`scrub` replaces the longest known path
    first, only where it ends at a path boundary (``/srv/work`` is not rewritten in
    ``/srv/workspace``), its resolved form (links followed) as well as the given one.
    """

    def __init__(self, config: RunnerConfig) -> None:
        self._names: dict[str, str] = {}
        self._pattern: re.Pattern[str] | None = None
        blob = Path(config.blob_dir)
        places = [
            (blob.parent, "<data dir>"),
            (blob, "<file store>"),
            (Path(config.work_dir), "<work dir>"),
            (_root(config.model_root), "<model root>"),
            (_root(config.data_root), "<data root>"),
            (_hf_cache(), "<Hugging Face cache>"),
        ]
        for path, shown in places:
            if path is not None:
                self.name(path, shown)

    def name(self, path: str | os.PathLike[str], shown: str) -> None:
        """Call ``path`` (and everything under it) ``shown`` in messages."""
        forms = {str(path)}
        try:
            forms.add(str(Path(path).resolve()))
        except (OSError, RuntimeError):  # pragma: no cover - a loop of links
            pass
        for form in forms:
            if len(form) > 1:  # never "/" itself
                self._names[form.rstrip("/") or form] = shown
        self._pattern = None

    def scrub(self, text: str) -> str:
        """``text`` with every known path replaced by its name."""
        if not self._names or not text:
            return text
        if self._pattern is None:
            alternatives = "|".join(re.escape(p) for p in sorted(self._names, key=len, reverse=True))
            self._pattern = re.compile(rf"(?<![\w./-])({alternatives})(?![\w.-])")
        return self._pattern.sub(lambda m: self._names[m.group(1)], text)


def _hf_cache() -> Path | None:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - installed with transformers
        return None
    return Path(constants.HF_HUB_CACHE)
