"""The peer: NVIDIA ModelOpt's ``auto_quantize`` side by side with bitscout, in one run, on the same rows.

For each configuration (a fine-tuned MiniLM classifier, layer granularity) this measures, on the same
calibration rows and the same held-out evaluation rows (never used for calibration):

* **bitscout**: the uniform maps, and for each sensitivity method of the configuration (``kl``,
  ``hessian``, and ``fisher`` or any other sensitivity method the registry has; one that is not
  registered is recorded as skipped) its table and the allocator's optimal map at each budget
  (average bits per quantized weight over the searched matrices), evaluated with bitscout's
  quantizer;
* **ModelOpt** (:mod:`benchmarks.peer_modelopt`, run by the Python of its own virtual environment,
  created in the cache): ``auto_quantize`` with its ``gradient`` and ``kl_div`` scores over the
  weight-only formats INT4 block-128 and INT8 (and, as a second format set, with custom INT2 / INT3
  block-128 formats added, so that it can reach the budgets below 4 bits), at the effective-bits
  target of each budget; its own fake-quantized model's accuracy and output KL (bitscout's metric
  code on its logits);
* **ModelOpt's maps through bitscout's quantizer**: each chosen map translated into a bitscout
  precision map (INT8 -> 8 bits per row; INT4 block-128 -> ``4g128`` when the option syntax has
  group sizes, else 4 bits per row, which the record says; ModelOpt's "not quantized" -> 16 bits).

Budgets and ModelOpt's targets: ModelOpt's effective bits count every linear layer it sees, the
layers bitscout does not search (the pooler and the classification head, passed to ModelOpt as
disabled layers) at 16 bits, and a layer it leaves unquantized at 16 bits. With ``S`` searched and
``X`` excluded weights, a budget of ``b`` average bits is the target ``E = (b*S + 16*X) / (S + X)``
and back ``b = (E*(S + X) - 16*X) / S`` (:func:`peer_target`, :func:`from_peer_target`). Both tools'
points are then on one axis: bits per quantized weight (scales not counted, a layer left in float
counted at 16) and the model's size in MB (scales counted).

Costs: every step's wall seconds, as ratios in the same run: in units of one full-precision
evaluation pass over the evaluation rows, and in fine-tuning epochs (one epoch of plain fine-tuning
of the classifier on its own training split, timed before and after the searches, the median).

``python -m benchmarks.bench_peer [--quick] [--cache .cache] [--out FILE.json] [--configs NAME ...]
[--methods kl,hessian,fisher] [--budgets 2.5,3,4,5,6]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT_SETS",
    "PeerConfig",
    "configs_for",
    "ensure_peer_venv",
    "peer_venv_ready",
    "format_bits",
    "from_peer_target",
    "peer_option",
    "peer_axis",
    "peer_target",
    "peer_through_ours",
    "run_config",
    "main",
]

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "peer_modelopt.py"
#: the ModelOpt release the benchmark installs (its API is read from this version's source)
MODELOPT_VERSION = "0.47.0"
#: the bits ModelOpt counts a layer it does not quantize at (its effective bits assume bf16 weights)
UNQUANTIZED_BITS = 16
INT4_B128 = "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"
INT8_ROW = "INT8_WEIGHT_ONLY_CFG"
#: ModelOpt's weight-only formats per format set: its own INT4 block-128 and INT8 per-row; and the same
#: with custom INT2 / INT3 block-128 formats (ModelOpt's INT4 block recipe with fewer bits)
FORMAT_SETS: dict[str, tuple[Any, ...]] = {
    "int4-int8": (INT4_B128, INT8_ROW),
    "int2-int8": ({"int_bits": 2, "block": 128}, {"int_bits": 3, "block": 128}, INT4_B128, INT8_ROW),
}
MODEL_LABELS = {
    "bbc": "all-MiniLM-L6-v2 fine-tuned on BBC topics (5 classes)",
    "rt": "all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes (fresh / rotten)",
    "uncertainty": "all-MiniLM-L6-v2 fine-tuned on CoNLL-2010 sentences (certain / uncertain)",
}


def log(msg: str) -> None:
    print(f"[peer] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ the conversion
def peer_target(avg_bits: Any, searched: int, excluded: int, unquantized_bits: int = UNQUANTIZED_BITS) -> Any:
    """ModelOpt's effective-bits target for a budget of ``avg_bits`` per searched weight: its average
    counts the ``excluded`` weights (linear layers bitscout does not search) at ``unquantized_bits``.
    Exact for :class:`fractions.Fraction` arguments."""
    if searched <= 0 or excluded < 0:
        raise ValueError("searched must be positive and excluded non-negative")
    return (avg_bits * searched + unquantized_bits * excluded) / (searched + excluded)


def from_peer_target(effective_bits: Any, searched: int, excluded: int,
                     unquantized_bits: int = UNQUANTIZED_BITS) -> Any:
    """The inverse of :func:`peer_target`: average bits per searched weight of an effective-bits value."""
    if searched <= 0 or excluded < 0:
        raise ValueError("searched must be positive and excluded non-negative")
    return (effective_bits * (searched + excluded) - unquantized_bits * excluded) / searched


def format_bits(fmt: Any) -> int:
    """The integer bits of one of :data:`FORMAT_SETS`' formats."""
    if isinstance(fmt, Mapping):
        return int(fmt["int_bits"])
    return {INT4_B128: 4, INT8_ROW: 8}[fmt]


def peer_option(label: str) -> tuple[Any, bool]:
    """The bitscout option of a ModelOpt format label (``INT4_B128``, ``INT8_ROW``, ``NONE``) and whether
    it keeps ModelOpt's block size: ``<k>g<block>`` when :class:`~search.space.BitOption` reads group
    sizes, else ``k`` bits per row; ``NONE`` (left unquantized) is 16 bits."""
    from search.errors import InvalidInputError
    from search.space import BitOption

    if label == "NONE":
        return BitOption(UNQUANTIZED_BITS), True
    head, _, tail = label.partition("_")
    if not head.startswith("INT"):
        raise ValueError(f"unknown ModelOpt format {label!r}")
    bits = int(head[3:])
    if tail.startswith("B"):
        try:
            return BitOption.parse(f"{bits}g{int(tail[1:])}"), True
        except (InvalidInputError, ValueError, TypeError):
            return BitOption(bits), False
    return BitOption(bits), True


def peer_weight_bytes(out_features: int, in_features: int, label: str) -> int:
    """Storage of one ``[out, in]`` matrix in a ModelOpt format: the codes and a 2-byte scale per row
    (``_ROW``) or per block of input columns (``_B<block>``); 2 bytes per weight left unquantized."""
    n = out_features * in_features
    if label == "NONE":
        return 2 * n
    head, _, tail = label.partition("_")
    bits = int(head[3:])
    scales = out_features * (math.ceil(in_features / int(tail[1:])) if tail.startswith("B") else 1)
    return math.ceil(n * bits / 8) + 2 * scales


# ---------------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class PeerConfig:
    """One classifier measured against the peer."""

    name: str
    model: str  # "bbc" | "rt" | "uncertainty" (or a name for ``model_dir``)
    budgets: tuple[float, ...] = (2.5, 3.0, 4.0, 5.0, 6.0)
    #: bitscout's sensitivity methods; one the registry lacks is recorded as skipped
    methods: tuple[str, ...] = ("kl", "hessian", "fisher")
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    bits: tuple[int, ...] = (2, 3, 4, 8)
    peer_methods: tuple[str, ...] = ("gradient", "kl_div")
    format_sets: tuple[str, ...] = ("int4-int8", "int2-int8")
    #: another model and data file (tests: a tiny model)
    model_dir: str | None = None
    data_file: str | None = None
    train_file: str | None = None


def configs_for(quick: bool) -> list[PeerConfig]:
    """Quick mode: the BBC classifier, ModelOpt's own formats, budgets 3, 4 and 6, a short Hessian.
    Full mode: the three classifiers, both format sets, budgets 2.5 to 6."""
    if quick:
        fast = {"hessian": {"tolerance": 0.25, "min_probes": 2, "max_probes": 6}}
        return [PeerConfig("bbc", "bbc", budgets=(3.0, 4.0, 6.0), method_options=fast, format_sets=("int4-int8",))]
    full = {"hessian": {"tolerance": 0.1, "max_probes": 64}}
    return [PeerConfig(m, m, method_options=full) for m in ("bbc", "rt", "uncertainty")]


def _model(cfg: PeerConfig, cache: Path) -> tuple[Path, str, str]:
    """The model folder, its held-out pool and its training split."""
    if cfg.model_dir is not None:
        if cfg.data_file is None or cfg.train_file is None:
            raise ValueError("a configuration with model_dir needs data_file and train_file")
        return Path(cfg.model_dir), cfg.data_file, cfg.train_file
    from benchmarks.assets import CLASSIFIERS

    build, heldout = CLASSIFIERS[cfg.model]
    model_dir = build(cache)
    return model_dir, str(cache / heldout), str(cache / heldout.replace("_heldout", "_train"))


# ------------------------------------------------------------------------------- ModelOpt's venv
def peer_requirements(modelopt_version: str = MODELOPT_VERSION) -> list[str]:
    """What ModelOpt's venv holds: ModelOpt, ``requests`` (it imports it without declaring it), the CPU
    torch pinned like bitscout's (pip takes the wheel from local disk) and bitscout's transformers."""
    import transformers

    return [f"nvidia-modelopt=={modelopt_version}", "requests", "torch==2.13.0", f"transformers=={transformers.__version__}"]


def peer_venv_ready(cache: Path, modelopt_version: str = MODELOPT_VERSION) -> bool:
    """Whether ``cache/peer-venv`` exists and was made for :func:`peer_requirements`."""
    venv = cache / "peer-venv"
    try:
        info = json.loads((venv / "bitscout-peer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (venv / "bin" / "python").is_file() and info.get("requirements") == peer_requirements(modelopt_version)


def ensure_peer_venv(cache: Path, modelopt_version: str = MODELOPT_VERSION) -> tuple[Path, dict[str, Any]]:
    """``cache/peer-venv``'s Python and what was installed, creating the venv when it is missing or was
    made for other requirements. Raises RuntimeError with pip's output when the install fails or
    pulls a torch that is not the pinned CPU build."""
    venv = cache / "peer-venv"
    python = venv / "bin" / "python"
    marker = venv / "bitscout-peer.json"
    wanted = peer_requirements(modelopt_version)
    if peer_venv_ready(cache, modelopt_version):
        return python, {**json.loads(marker.read_text(encoding="utf-8")), "created": False}
    if venv.exists():
        log(f"{venv} was made for other requirements: rebuilding it")
    shutil.rmtree(venv, ignore_errors=True)
    t0 = time.perf_counter()
    log(f"creating {venv}: pip install {' '.join(wanted)}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)  # noqa: S603
    proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *wanted],  # noqa: S603
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install into {venv} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    probe = subprocess.run(  # noqa: S603
        [str(python), "-c", "import json, torch, transformers, modelopt, requests; print(json.dumps({'torch': "
         "torch.__version__, 'cuda': torch.version.cuda, 'transformers': transformers.__version__, "
         "'modelopt': modelopt.__version__}))"],
        capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        raise RuntimeError(f"ModelOpt's venv does not import: {probe.stderr[-2000:]}")
    versions = json.loads(probe.stdout.strip().splitlines()[-1])
    if not versions["torch"].startswith("2.13.0") or versions.get("cuda"):
        raise RuntimeError(f"ModelOpt's venv has torch {versions['torch']} (CUDA {versions.get('cuda')}), "
                           "not the pinned CPU build")
    info = {"requirements": wanted, "versions": versions, "install_seconds": time.perf_counter() - t0}
    marker.write_text(json.dumps(info, indent=1), encoding="utf-8")
    return python, {**info, "created": True}


# ------------------------------------------------------------------------------------ measurement
def _finetune_epoch(search: Any, train_file: str, model_dir: Path, steps: int) -> tuple[float, int]:
    """One fine-tuning epoch of the classifier on its training split (its own recipe's batch and length),
    extrapolated from ``steps`` timed steps."""
    import transformers

    from benchmarks.assets import read_metrics
    from benchmarks.bench_refine import finetune_epoch_seconds
    from search.data import load_text_data, tokenize

    try:
        recipe = read_metrics(model_dir).get("recipe") or {}
    except OSError:  # a model not built by benchmarks.assets: its recipe's defaults
        recipe = {}
    names = [search.model.config.id2label[i] for i in range(len(search.model.config.id2label))]
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    train = tokenize(load_text_data(train_file, label_field="label", label_names=names), tok,
                     max_length=int(recipe.get("max_length", 64)), batch_size=int(recipe.get("batch", 16)))
    return finetune_epoch_seconds(search.model, train, steps=steps)


def _metrics_from_logits(search: Any, logits: Sequence[Any]) -> dict[str, float]:
    """Accuracy and output KL of logits on the search's evaluation batches (its own metric code)."""
    import torch

    from search.tasks import discrepancy

    ref = search.reference().outputs
    correct = n = 0
    kl = 0.0
    for b, r, out in zip(search.evaluation, ref, logits, strict=True):
        o = torch.tensor(out, dtype=torch.float32)
        kl += float(discrepancy(r, o, b, search.task).sum())
        correct += int((o.argmax(-1) == b.labels).sum())
        n += int(b.labels.numel())
    return {"accuracy": correct / n, "kl": kl / n}


def _compact(pmap: Any) -> dict[str, str]:
    return {k: v.key() for k, v in pmap.items()}


def peer_axis(search: Any) -> tuple[Any, dict[str, int], list[str], int, int]:
    """Both tools on one axis: the cost model of the search's space with ModelOpt's formats allowed
    (16 bits for its unquantized layers, its block-128 integers; the other options cost the same), every linear layer's weight
    count, the searched matrices, and ``S`` searched and ``X`` excluded linear weights."""
    import torch

    from search.cost import CostModel
    from search.space import BitOption, check_option_fits

    space = search.space
    # ModelOpt's formats as bitscout options (:func:`peer_option`): 16 bits, and its block-128
    # integer formats where a group's columns split into blocks of 128
    block = [peer_option(f"INT{b}_B128")[0] for b in (2, 3, 4)]
    space16 = replace(space, options=tuple(
        tuple(sorted(set(o) | {BitOption(UNQUANTIZED_BITS)} | {x for x in block if check_option_fits(g, x) is None}))
        for g, o in zip(space.groups, space.options, strict=True)))
    cm = search.cost_model
    cost16 = CostModel(space16, seq_len=cm.seq_len, act_bits=cm.act_bits, batch=cm.batch, profile=cm.profile)
    searched_modules = [m.module for g in space.groups for m in g.members]
    linear = {n: int(mod.weight.numel()) for n, mod in search.model.named_modules() if isinstance(mod, torch.nn.Linear)}
    S = sum(linear[n] for n in searched_modules)  # noqa: N806
    X = sum(v for n, v in linear.items() if n not in set(searched_modules))  # noqa: N806
    if space.n_params != S:
        raise RuntimeError(f"the searched groups hold {space.n_params} weights, their linear layers {S}")
    return cost16, linear, searched_modules, S, X


def peer_through_ours(search: Any, peer: dict[str, Any], cost16: Any, linear: Mapping[str, int], S: int, X: int,  # noqa: N803
                      evaluate: Any) -> None:
    """ModelOpt's maps (``peer["runs"][*]["points"]``, from :func:`_run_peer`) measured both ways:
    its own logits scored with bitscout's metric code (``own``), and each map translated into a
    bitscout precision map (:func:`peer_option`) evaluated with bitscout's quantizer by
    ``evaluate(pmap) -> (metrics, seconds)`` (``ours``); costs on bitscout's axis (``cost16``: the
    space with 16 bits allowed). Fills the runs' cost sums and ``peer["int4_as"]``."""
    import torch

    from search.space import PrecisionMap

    space = search.space
    int4_kept: set[bool] = set()
    for run in peer["runs"]:
        for p in run.get("points", []):
            logits = p.pop("logits")
            own = _metrics_from_logits(search, logits)
            choice = {}
            for g in space.groups:
                opt, kept = peer_option(p["formats"][g.members[0].module])
                choice[g.name] = opt
                if opt.bits == 4:
                    int4_kept.add(kept)
            pmap = PrecisionMap(choice)
            ours, secs = evaluate(pmap)
            c = cost16.cost(pmap)
            own_bytes = cost16.offsets()["size_bytes"] + sum(
                peer_weight_bytes(mm.shape[0], mm.shape[1], p["formats"][mm.module])
                for g in space.groups for mm in g.members)
            bits = {lab: sum(linear[n] for n, f in p["formats"].items() if f == lab) for lab in set(p["formats"].values())}
            p.update({
                "avg_bits": c.avg_bits,
                "effective_bits": peer_target(c.avg_bits, S, X),
                "own": {**own, "size_bytes": own_bytes},
                "ours": {"accuracy": ours.get("accuracy"), "kl": ours.get("kl"), "size_bytes": c.size_bytes,
                         "eval_seconds": secs},
                "weights_per_format": bits,
                "map": _compact(pmap),
            })
        run["own_eval_seconds"] = sum(p.get("eval_seconds", 0.0) for p in run.get("points", []))
        run["whole_seconds"] = (run.get("auto_quantize_seconds") or 0.0) + sum(
            p.get("resolve_seconds", 0.0) + p.get("quantize_seconds", 0.0) + p.get("eval_seconds", 0.0)
            for p in run.get("points", []))
        run["through_ours_eval_seconds"] = sum(p["ours"]["eval_seconds"] for p in run.get("points", []))
    peer["int4_as"] = ("4g128" if int4_kept == {True} else "4 bits per row" if int4_kept else None)
    fp_logits = peer.pop("fp32_logits", None)
    if fp_logits is not None:
        ref = search.reference().outputs
        peer["fp32_logits_max_abs_diff"] = max(
            float((torch.tensor(o) - r).abs().max()) for o, r in zip(fp_logits, ref, strict=True))


def run_config(cfg: PeerConfig, *, cache: Path, quick: bool, seed: int = 0,
               rows: tuple[int, int, int] | None = None, epoch_steps: int | None = None,
               peer_python: Path | None = None, peer_info: Mapping[str, Any] | None = None,
               peer_skip: str | None = None, save: Any = None) -> dict[str, Any]:
    """Measure one configuration; returns its JSON record. ``peer_python``: ModelOpt's venv Python
    (``peer_skip`` says why there is none). ``save(record)`` is called after every stage."""
    import torch

    from benchmarks.bench_quality import _bit_targets, method_available
    from search import methods as registry
    from search.local import DataOptions, prepare
    from search.pipeline import SearchOptions

    t_all = time.perf_counter()
    model_dir, heldout, train_file = _model(cfg, cache)
    cal_rows, eval_rows, max_length = rows or ((8, 128, 32) if quick else (128, 500, 64))
    data = DataOptions(source=heldout, label_field="label", calibration=cal_rows, evaluation=eval_rows,
                       max_length=max_length, batch_size=32)
    methods: list[str] = []
    skipped: dict[str, str] = {}
    for m in cfg.methods:
        why = method_available(m)
        if why is None and not registry.is_sensitivity(m):
            why = f"{m!r} is not a sensitivity method (it proposes maps of its own)"
        if why is None:
            methods.append(m)
        else:
            skipped[m] = why
    opts = SearchOptions(methods=tuple(methods) or ("kl",), granularity="layer", bits=cfg.bits, seq_len=max_length,
                         seed=seed, front_points=4,
                         method_options={k: v for k, v in cfg.method_options.items() if k in methods})
    search = prepare(model_dir, data, opts, task="sequence_classification", device="cpu")
    steps = epoch_steps or (3 if quick else 8)
    epochs = [_finetune_epoch(search, train_file, model_dir, steps)[0]]
    t0 = time.perf_counter()
    baseline = search.baseline()
    eval_unit = time.perf_counter() - t0
    space = search.space
    cost16, linear, searched_modules, S, X = peer_axis(search)  # noqa: N806 - the docstring's names
    fp32 = cost16.cost(cost16.space.full_precision())
    log(f"{cfg.name}: {len(space.groups)} groups, {S} searched and {X} excluded linear weights; "
        f"fp32 accuracy {baseline.get('accuracy'):.4f}; evaluation pass {eval_unit:.1f} s; epoch {epochs[0]:.1f} s")

    n_evals = 0
    cache_metrics: dict[Any, dict[str, float]] = {}
    eval_seconds: dict[Any, float] = {}

    def evaluate(pmap: Any) -> tuple[dict[str, float], float]:
        """The map's metrics and the seconds its evaluation took: a map evaluated before (another series
        proposed it too) is not evaluated again, but its cost is counted for every search that needs it."""
        nonlocal n_evals
        if pmap not in cache_metrics:
            t = time.perf_counter()
            cache_metrics[pmap] = search.evaluate(pmap)
            eval_seconds[pmap] = time.perf_counter() - t
            n_evals += 1
        return cache_metrics[pmap], eval_seconds[pmap]

    def point(pmap: Any, metrics: Mapping[str, float], **kw: Any) -> dict[str, Any]:
        c = cost16.cost(pmap)
        return {"avg_bits": c.avg_bits, "size_bytes": c.size_bytes, "accuracy": metrics.get("accuracy"),
                "kl": metrics.get("kl"), **kw}

    record: dict[str, Any] = {
        "name": cfg.name, "model": cfg.model, "model_label": MODEL_LABELS.get(cfg.model, cfg.model),
        "granularity": "layer", "groups": len(space.groups), "bits": list(cfg.bits),
        "calibration_rows": data.calibration, "evaluation_rows": data.evaluation, "max_length": max_length,
        "budgets": list(cfg.budgets), "searched_weights": S, "excluded_weights": X,
        "excluded_layers": sorted(n for n in linear if n not in set(searched_modules)),
        "unquantized_bits": UNQUANTIZED_BITS,
        "targets": {str(b): peer_target(b, S, X) for b in cfg.budgets},
        "fp32": {"accuracy": baseline.get("accuracy"), "kl": 0.0, "size_bytes": fp32.size_bytes},
        "eval_unit_seconds": eval_unit, "threads": torch.get_num_threads(),
        "uniform": [], "ours": {}, "peer": {"runs": []}, "skipped": skipped,
    }

    def checkpoint() -> None:
        if save is not None:
            save(record)

    for c in search.uniform_candidates():
        metrics, secs = evaluate(c.precision_map)
        record["uniform"].append(point(c.precision_map, metrics, label=c.label, eval_seconds=secs))
    checkpoint()

    for m in methods:
        t_m = time.perf_counter()
        try:
            table = search.sensitivity(m, on_progress=None)
            t_score = time.perf_counter() - t_m
            t0 = time.perf_counter()
            cands = [(b, c) for b in cfg.budgets for c in _bit_targets(search, table, (b,))]  # infeasible: none
            t_alloc = time.perf_counter() - t0
            pts = []
            t_eval = 0.0
            for b, cand in cands:
                metrics, secs = evaluate(cand.precision_map)
                t_eval += secs
                pts.append(point(cand.precision_map, metrics, budget=b, map=_compact(cand.precision_map)))
            record["ours"][m] = {"score_seconds": t_score, "allocate_seconds": t_alloc, "evaluate_seconds": t_eval,
                                 "whole_seconds": t_score + t_alloc + t_eval, "samples": table.samples,
                                 "points": pts}
            log(f"{cfg.name}: {m} table {t_score:.0f} s, {len(pts)} budget maps evaluated in {t_eval:.0f} s")
        except Exception as exc:  # noqa: BLE001 - one failing method must not lose the others
            skipped[m] = f"failed: {type(exc).__name__}: {exc}"
            log(f"{cfg.name}: {m} failed\n{traceback.format_exc()}")
        checkpoint()

    # ---- ModelOpt
    peer = record["peer"]
    if peer_python is None:
        peer["skipped"] = peer_skip or "ModelOpt's environment is not available"
    else:
        peer["venv"] = dict(peer_info or {})
        _run_peer(cfg, search, model_dir, searched_modules, S, X, peer_python, peer, quick=quick, seed=seed)
        checkpoint()
        peer_through_ours(search, peer, cost16, linear, S, X, evaluate)
    epochs.append(_finetune_epoch(search, train_file, model_dir, steps)[0])
    epoch = statistics.median(epochs)
    record["finetune_epoch_seconds"] = epoch
    record["finetune_epochs_measured"] = epochs
    record["evaluations"] = n_evals
    record["seconds"] = time.perf_counter() - t_all
    # every cost in both units
    for info in record["ours"].values():
        for k in ("score", "whole"):
            info[f"{k}_epochs"] = info[f"{k}_seconds"] / epoch
            info[f"{k}_units"] = info[f"{k}_seconds"] / eval_unit
    for run in peer.get("runs", []):
        for k in ("score", "auto_quantize", "whole"):
            if run.get(f"{k}_seconds") is not None:
                run[f"{k}_epochs"] = run[f"{k}_seconds"] / epoch
                run[f"{k}_units"] = run[f"{k}_seconds"] / eval_unit
    checkpoint()
    return record


def _run_peer(cfg: PeerConfig, search: Any, model_dir: Path, searched: list[str], S: int, X: int,  # noqa: N803
              python: Path, peer: dict[str, Any], *, quick: bool, seed: int) -> None:
    """ModelOpt's runs in its venv on the search's own batches; fills ``peer`` (runs, versions, errors)."""
    import torch

    # a target a hair above the exact conversion: at a budget equal to the narrowest format, the
    # float rounding of ModelOpt's cost sum must not make the all-narrowest map infeasible
    slack = 1e-9
    targets: dict[str, list[dict[str, float]]] = {}
    infeasible: dict[str, dict[str, float]] = {}
    for name in cfg.format_sets:
        lo = min(format_bits(f) for f in FORMAT_SETS[name])
        targets[name] = [{"budget": b, "target": float(peer_target(b, S, X)) + slack} for b in cfg.budgets if b >= lo]
        infeasible[name] = {str(b): float(peer_target(b, S, X)) for b in cfg.budgets if b < lo}
    peer["infeasible"] = infeasible
    peer["target_slack"] = slack
    with tempfile.TemporaryDirectory(prefix="bitscout-peer-") as tmp:
        tmpd = Path(tmp)

        def batches(bs: Sequence[Any]) -> list[dict[str, Any]]:
            return [{"input_ids": b.input_ids.cpu(), "attention_mask": b.attention_mask.cpu(), "labels": b.labels.cpu()}
                    for b in bs]

        torch.save({"calibration": batches(search.calibration), "evaluation": batches(search.evaluation)},
                   tmpd / "rows.pt")
        job = {"model_dir": str(model_dir), "rows": str(tmpd / "rows.pt"), "searched": searched,
               "methods": list(cfg.peer_methods), "format_sets": {n: list(FORMAT_SETS[n]) for n in cfg.format_sets},
               "targets": targets, "out": str(tmpd / "out.json"), "seed": seed, "threads": torch.get_num_threads()}
        (tmpd / "job.json").write_text(json.dumps(job), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TQDM_DISABLE", "1")  # ModelOpt's progress bars: its own log lines say enough
        t0 = time.perf_counter()
        log(f"{cfg.name}: ModelOpt {', '.join(cfg.peer_methods)} x {', '.join(cfg.format_sets)} in {python.parent.parent}")
        # its output goes to this process's log (stdout too: ModelOpt prints its progress there)
        proc = subprocess.run([str(python), str(WORKER), str(tmpd / "job.json")], env=env,  # noqa: S603
                              stdout=sys.stderr.fileno(), check=False)
        peer["process_seconds"] = time.perf_counter() - t0
        out = tmpd / "out.json"
        if out.is_file():
            peer.update(json.loads(out.read_text(encoding="utf-8")))
        if proc.returncode != 0:
            peer["error"] = f"exit status {proc.returncode} (its output is in this part's log)"
            log(f"{cfg.name}: ModelOpt's process failed with exit status {proc.returncode}")
        # ModelOpt's own denominator (every linear layer's weights) against the conversion's S + X
        dens = {r.get("cost_denominator") for r in peer.get("runs", []) if r.get("cost_denominator") is not None}
        peer["cost_denominator_matches"] = dens == {S + X} if dens else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=Path(".cache"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", nargs="*", default=None, help="names of the configurations to run (default: all)")
    p.add_argument("--methods", default=None, help="comma-separated bitscout sensitivity methods instead of each "
                                                   "configuration's (e.g. kl,hessian,fisher)")
    p.add_argument("--budgets", default=None, help="comma-separated average-bit budgets instead of each configuration's")
    p.add_argument("--peer-methods", default=None, help="ModelOpt scores (gradient,kl_div)")
    p.add_argument("--format-sets", default=None, help=f"ModelOpt format sets ({', '.join(FORMAT_SETS)})")
    p.add_argument("--no-peer", action="store_true", help="bitscout's side only (no ModelOpt venv)")
    p.add_argument("--modelopt-version", default=MODELOPT_VERSION)
    p.add_argument("--setup", action="store_true",
                   help="only create ModelOpt's venv in the cache (quick mode never creates it: minutes of downloads)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from benchmarks.assets import ensure_packages

    ensure_packages()
    torch.manual_seed(a.seed)
    configs = configs_for(a.quick)
    if a.configs:
        known = {c.name for c in configs_for(False)} | {c.name for c in configs_for(True)}
        unknown = [n for n in a.configs if n not in known]
        if unknown:
            p.error(f"--configs: unknown configuration(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        configs = [c for c in configs if c.name in a.configs]
    for flag, attr, conv in (("methods", "methods", str), ("budgets", "budgets", float),
                             ("peer_methods", "peer_methods", str), ("format_sets", "format_sets", str)):
        value = getattr(a, flag)
        if value is not None:
            items = tuple(conv(x) for x in value.split(",") if x)
            if attr == "format_sets" and any(x not in FORMAT_SETS for x in items):
                p.error(f"--format-sets: known sets are {', '.join(FORMAT_SETS)}")
            configs = [replace(c, **{attr: items}) for c in configs]
    out: dict[str, Any] = {"part": "peer", "quick": a.quick, "seed": a.seed, "device": "cpu", "configs": [],
                           "errors": {}}
    python: Path | None = None
    info: dict[str, Any] = {}
    why: str | None = "--no-peer" if a.no_peer else None
    cache = a.cache if a.cache.is_absolute() else ROOT / a.cache
    if a.setup:
        python, info = ensure_peer_venv(cache, a.modelopt_version)
        print(json.dumps({"python": str(python), **info}, indent=1))
        return 0
    if a.quick and not a.no_peer and not peer_venv_ready(cache, a.modelopt_version):
        why = ("quick mode does not create ModelOpt's venv (minutes of downloads): the full part creates it, "
               "or `python -m benchmarks.bench_peer --setup`")
        log(why)
    elif not a.no_peer:
        try:
            python, info = ensure_peer_venv(cache, a.modelopt_version)
            out["peer_venv"] = info
        except Exception as exc:  # noqa: BLE001 - recorded: bitscout's side still runs
            why = f"ModelOpt's venv could not be made: {type(exc).__name__}: {exc}"
            log(why)
            out["peer_venv"] = {"error": why}

    def write(doc: dict[str, Any]) -> None:
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(doc, indent=1))

    for cfg in configs:
        done = list(out["configs"])

        def save(partial: dict[str, Any], done: list[dict[str, Any]] = done) -> None:
            write({**out, "configs": [*done, {**partial, "incomplete": True}]})

        try:
            rec = run_config(cfg, cache=a.cache, quick=a.quick, seed=a.seed, peer_python=python, peer_info=info,
                             peer_skip=why, save=save)
            out["configs"].append(rec)
        except Exception as exc:  # noqa: BLE001 - keep the other configurations
            out["errors"][cfg.name] = f"{type(exc).__name__}: {exc}"
            log(f"{cfg.name} failed\n{traceback.format_exc()}")
        write(out)
    return 0 if out["configs"] else 1


if __name__ == "__main__":
    sys.exit(main())
