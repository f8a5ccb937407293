"""Progress bars (tqdm): a job's stage and message while waiting, bytes while uploading.

``tqdm.auto`` picks the notebook widget inside Jupyter (when ipywidgets is installed) and the
terminal bar elsewhere.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, BinaryIO

__all__ = ["UPLOAD_BAR_MIN_BYTES", "JobBar", "ProgressFile"]

#: Uploads smaller than this get no progress bar.
UPLOAD_BAR_MIN_BYTES = 8 * 1024 * 1024


def _tqdm(**kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm.auto warns when ipywidgets is missing in a notebook
        from tqdm.auto import tqdm

        return tqdm(**kwargs)


class ProgressFile:
    """A read-only file that advances a byte progress bar as it is read (the multipart encoder
    reads it in chunks; a retry seeks back to 0 and the bar starts over)."""

    def __init__(self, fh: BinaryIO, size: int, *, desc: str, enabled: bool) -> None:
        self._fh = fh
        self._size = size
        self._bar: Any = None
        if enabled and size >= UPLOAD_BAR_MIN_BYTES:
            self._bar = _tqdm(
                total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False
            )

    def read(self, n: int = -1) -> bytes:
        chunk = self._fh.read(n)
        if self._bar is not None and chunk:
            self._bar.update(len(chunk))
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        pos = self._fh.seek(offset, whence)
        if self._bar is not None and whence == os.SEEK_SET:
            self._bar.reset(total=self._size)
            self._bar.update(pos)
        return pos

    def tell(self) -> int:
        return self._fh.tell()

    def fileno(self) -> int:
        return self._fh.fileno()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._fh.close()

    def __enter__(self) -> ProgressFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JobBar:
    """A bar from 0 to 100 % showing a job's stage (as its description) and latest message."""

    def __init__(self, job_id: str, *, enabled: bool) -> None:
        self.job_id = job_id
        self._bar: Any = None
        if enabled:
            self._bar = _tqdm(
                total=100,
                desc=f"job {job_id[:8]}",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}]{postfix}",
                leave=True,
            )
        self._last: tuple[float, str | None, str | None, str | None] | None = None

    def update(self, *, progress: float, stage: str | None, message: str | None, status: str) -> None:
        if self._bar is None:
            return
        key = (progress, stage, message, status)
        if key == self._last:
            return
        self._last = key
        self._bar.set_description_str(f"job {self.job_id[:8]} {stage or status}", refresh=False)
        msg = (message or "").replace("\n", " ")
        self._bar.set_postfix_str(msg[:60], refresh=False)
        self._bar.n = round(max(0.0, min(1.0, progress)) * 100, 1)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
