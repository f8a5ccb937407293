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
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from bitscout.errors import BitscoutError
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
