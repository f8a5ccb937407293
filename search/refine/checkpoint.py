"""Refinement checkpoints: one folder per step (``step-NNNNNNNN/``) holding the trainable tensors, the
optimizer and RNG state and the best-so-far state (``tensors.safetensors``, never a pickle) and
everything else as JSON (``state.json``, written last: a folder without it is incomplete and
ignored). A fingerprint of the map, the configuration and the trainable shapes ties a checkpoint to
its run (see :mod:`search.refine`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from search.errors import InvalidInputError
from search.refine.config import RefineConfig
from search.space import PrecisionMap

__all__ = ["CHECKPOINT_STATE", "CHECKPOINT_TENSORS", "CHECKPOINT_VERSION", "CHECKPOINTS_KEPT"]

CHECKPOINT_TENSORS = "tensors.safetensors"
CHECKPOINT_STATE = "state.json"
#: Version of the checkpoint layout.
CHECKPOINT_VERSION = 1
#: Complete checkpoints kept in a checkpoint folder (older ones are deleted).
CHECKPOINTS_KEPT = 2


def _fingerprint(pmap: PrecisionMap, config: RefineConfig, trainable: Mapping[str, torch.Tensor], n_train: int) -> str:
    ignore = {"steps", "eval_every", "checkpoint_every", "patience"}
    payload = {
        "pmap": pmap.to_dict(),
        "config": {k: v for k, v in config.to_dict().items() if k not in ignore},
        "params": {k: list(v.shape) for k, v in trainable.items()},
        "train_batches": n_train,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _latest_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.glob("step-*") if (p / CHECKPOINT_STATE).is_file() and (p / CHECKPOINT_TENSORS).is_file())
    return done[-1] if done else None


def _save_checkpoint(
    folder: Path,
    step: int,
    trainable: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    best_state: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for n, p in trainable.items():
        tensors[f"param::{n}"] = p.detach().cpu().contiguous().clone()
    for n, t in best_state.items():
        tensors[f"best::{n}"] = t.detach().cpu().contiguous().clone()
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt::{idx}::{k}"] = v.detach().cpu().contiguous().clone()
    tensors["rng::cpu"] = torch.get_rng_state().clone()
    meta = dict(state)
    meta.update(
        {
            "version": CHECKPOINT_VERSION,
            "step": step,
            "optimizer_groups": opt["param_groups"],
            "optimizer_scalars": {
                str(idx): {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)} for idx, st in opt["state"].items()
            },
        }
    )
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(tensors, str(tmp / CHECKPOINT_TENSORS))
    (tmp / CHECKPOINT_STATE).write_text(json.dumps(meta, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    done = sorted(p for p in folder.glob("step-*") if (p / CHECKPOINT_STATE).is_file())
    for old in done[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / CHECKPOINT_STATE).read_text())
        tensors = load_file(str(path / CHECKPOINT_TENSORS))
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"unreadable refinement checkpoint {str(path)!r}: {exc}", field="checkpoint_dir") from exc
    if meta.get("version") != CHECKPOINT_VERSION:
        raise InvalidInputError(
            f"checkpoint {str(path)!r} has layout version {meta.get('version')!r}, expected {CHECKPOINT_VERSION}",
            field="checkpoint_dir",
        )
    return tensors, meta


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith("opt::"):
            _, idx, k = key.split("::", 2)
            state.setdefault(int(idx), {})[k] = t
    for idx, scalars in (meta.get("optimizer_scalars") or {}).items():
        state.setdefault(int(idx), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_groups"]})

