"""Memory bounds of the model passes: how many rows of a batch one forward pass takes, and where
full-precision reference outputs live.

A causal LM's output is vocabulary-wide per token (SmolLM2: 49,152 floats, 192 KiB a token), so a
batch of 8 windows of 128 tokens outputs 200 MB, and the pass's temporaries (the reference it is
compared with, log-softmax rows) several times that. Two rules keep the resident memory a small
multiple of the weights whatever the data's size:

* **Passes sized to a budget** (:func:`rows_per_pass`): a pass over a batch runs on runs of rows
  whose output holds at most ``budget / LIVE_OUTPUTS`` bytes (at least one row), the budget being
  :func:`pass_budget_bytes` (:data:`PASS_BUDGET_BYTES`, less when the machine has less than
  ``PASS_MEMORY_SHARE`` times that available). The per-row size of a causal LM's output is
  ``length x vocabulary x 4`` (:func:`search.tasks.output_row_bytes`); other tasks run whole
  batches. Metrics are sums over rows (or tokens), so how a batch is cut
  changes their last bits of rounding only.
* **References spilled to disk** (:class:`OutputStore`): outputs are held in memory while the
  store holds at most ``memory_bytes`` (:data:`STORE_MEMORY_BYTES`), beyond that written to an
  anonymous temporary file and read back, exactly, a run of rows at a time. A classifier's
  reference stays in memory; a causal LM's logits go to disk and only the rows being compared are
  resident.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: the bytes of vocabulary-wide tensors one pass may hold (its output, the reference, temporaries)
PASS_BUDGET_BYTES = 128 << 20
#: a pass takes at most this fraction of the memory the machine has available
PASS_MEMORY_SHARE = 8
#: vocabulary-wide tensors of one pass's size alive at once (output, reference rows, log-softmax)
LIVE_OUTPUTS = 4
#: the bytes of outputs an :class:`OutputStore` keeps in memory before spilling to disk
STORE_MEMORY_BYTES = 64 << 20


def available_bytes() -> int | None:
    """The memory the machine has available (``MemAvailable`` of ``/proc/meminfo``), or None where
    that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def pass_budget_bytes(available: int | None = None) -> int:
    """The bytes one evaluation pass's vocabulary-wide tensors may take: :data:`PASS_BUDGET_BYTES`,
    or ``available / PASS_MEMORY_SHARE`` when that is less (``available``: :func:`available_bytes`
    when None)."""
    avail = available_bytes() if available is None else available
    if avail is None:
        return PASS_BUDGET_BYTES
    return max(1, min(PASS_BUDGET_BYTES, int(avail) // PASS_MEMORY_SHARE))


def rows_per_pass(row_bytes: int, budget: int) -> int:
    """Rows one pass takes when each row's output holds ``row_bytes``: at least one, at most as many
    as keep :data:`LIVE_OUTPUTS` tensors of that size within ``budget``."""
    return max(1, int(budget) // max(1, LIVE_OUTPUTS * int(row_bytes)))


@dataclass
class _Entry:
    shape: tuple[int, ...]
    dtype: torch.dtype
    tensor: torch.Tensor | None  # held in memory, else in the file at ``offset``
    offset: int = 0

    @property
    def row_bytes(self) -> int:
        n = 1
        for s in self.shape[1:]:
            n *= int(s)
        return n * torch.empty((), dtype=self.dtype).element_size()


class OutputStore(Sequence[torch.Tensor]):
    """Per-batch outputs, written once by runs of rows and read back by runs of rows (see the module
    docstring). ``store[i]`` is batch ``i``'s whole output; :meth:`read` a run of its rows.

    Memory: at most ``memory_bytes`` of outputs are resident (kept on the device they came from);
    the others are in an anonymous temporary file (removed when the store is garbage-collected or
    the process ends) and cost the resident memory of the rows being read only. Read-back is exact
    (the bytes written). Pickling (shipping a search to a Ray worker) carries the outputs
    themselves; the receiving process spills them to its own file again.
    """

    def __init__(self, memory_bytes: int = STORE_MEMORY_BYTES) -> None:
        self.memory_bytes = int(memory_bytes)
        self._entries: list[_Entry] = []
        self._file: Any = None
        self._end = 0
        self._held = 0

    # -- writing ----------------------------------------------------------------------------
    def reserve(self, rows: int, row_shape: Sequence[int], dtype: torch.dtype, device: Any = "cpu") -> int:
        """Room for one batch of ``rows`` rows of ``row_shape``; returns its index."""
        shape = (int(rows), *(int(s) for s in row_shape))
        entry = _Entry(shape, dtype, None)
        size = entry.row_bytes * shape[0]
        if self._held + size <= self.memory_bytes:
            entry.tensor = torch.empty(shape, dtype=dtype, device=device)
            self._held += size
        else:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="bitscout-ref-")
            entry.offset = self._end
            self._end += size
            os.ftruncate(self._file.fileno(), self._end)
        self._entries.append(entry)
        return len(self._entries) - 1

    def write(self, index: int, start: int, rows: torch.Tensor) -> None:
        """Rows ``start ..`` of batch ``index`` (``rows`` of the reserved row shape and dtype)."""
        e = self._entries[index]
        if tuple(rows.shape[1:]) != e.shape[1:] or rows.dtype != e.dtype or start + rows.shape[0] > e.shape[0]:
            raise ValueError(f"rows of shape {tuple(rows.shape)} ({rows.dtype}) do not fit batch {index} {e.shape}")
        if e.tensor is not None:
            e.tensor[start : start + rows.shape[0]].copy_(rows)
            return
        data = rows.detach().contiguous().cpu().view(torch.uint8).numpy()
        os.pwrite(self._file.fileno(), memoryview(data).cast("B"), e.offset + start * e.row_bytes)

    def append(self, output: torch.Tensor) -> int:
        """One whole batch's output; returns its index."""
        i = self.reserve(output.shape[0], output.shape[1:], output.dtype, output.device)
        self.write(i, 0, output)
        return i

    # -- reading ----------------------------------------------------------------------------
    def read(self, index: int, start: int = 0, stop: int | None = None, device: Any = None) -> torch.Tensor:
        """Rows ``start:stop`` of batch ``index`` (on ``device``, or where they were held)."""
        e = self._entries[index]
        stop = e.shape[0] if stop is None else min(int(stop), e.shape[0])
        if e.tensor is not None:
            out = e.tensor[start:stop]
            return out if device is None else out.to(device)
        n = max(0, stop - start)
        buf = np.empty(n * e.row_bytes, dtype=np.uint8)
        got = os.preadv(self._file.fileno(), [memoryview(buf)], e.offset + start * e.row_bytes)
        if got != buf.nbytes:  # pragma: no cover - the file is ours and was sized on reserve
            raise OSError(f"short read of a spilled output ({got} of {buf.nbytes} bytes)")
        out = torch.from_numpy(buf).view(e.dtype).reshape(n, *e.shape[1:])
        return out if device is None else out.to(device)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        return self.read(index)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self._entries)):
            yield self.read(i)

    @property
    def resident_bytes(self) -> int:
        """Bytes of outputs held in memory."""
        return self._held

    @property
    def spilled_bytes(self) -> int:
        """Bytes of outputs in the temporary file."""
        return self._end

    # -- pickling ---------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"memory_bytes": self.memory_bytes, "outputs": [self.read(i).cpu() for i in range(len(self))]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["memory_bytes"])  # type: ignore[misc]
        for out in state["outputs"]:
            self.append(out)


__all__ = [
    "LIVE_OUTPUTS",
    "PASS_BUDGET_BYTES",
    "PASS_MEMORY_SHARE",
    "STORE_MEMORY_BYTES",
    "OutputStore",
    "available_bytes",
    "pass_budget_bytes",
    "rows_per_pass",
]
