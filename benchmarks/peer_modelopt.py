"""NVIDIA ModelOpt's ``auto_quantize`` on one classifier: the peer side of :mod:`benchmarks.bench_peer`.

Run by the Python of ModelOpt's own virtual environment (the benchmark creates it), never imported
by bitscout's: it reads nothing of this repository but its job file, and imports only torch,
transformers and ModelOpt. ``python peer_modelopt.py JOB.json`` where the job names

* ``model_dir`` (a saved sequence classifier) and ``rows`` (a ``torch.save`` file with the tokenized
  ``calibration`` and ``evaluation`` batches, each a list of ``{"input_ids", "attention_mask",
  "labels"}``: the very batches bitscout's search uses);
* ``searched``: the names of the linear layers bitscout searches; every other linear layer is
  passed to ModelOpt as a disabled layer (it counts them at 16 bits in its effective bits);
* ``methods`` (``gradient``, ``kl_div``), ``format_sets`` (name -> list of formats: a ModelOpt
  config name such as ``INT4_BLOCKWISE_WEIGHT_ONLY_CFG`` or ``{"int_bits": 3, "block": 128}`` for a
  custom weight-only integer format) and, per format set, the ``targets`` to solve for (``{"budget",
  "target"}``: the caller's budget and its effective-bits target, the first one also the search's);
* ``out``: where the JSON answer goes.

For each method and format set, one ``auto_quantize`` call (calibration of every format, the
sensitivity scores, the search at the first target), then for every target ModelOpt's own
re-solve (``get_auto_quantize_config``) and ``quantize`` of a fresh copy of the model: its
per-layer formats, its realized effective bits, the quantized model's logits on the evaluation
batches (bitscout's process turns them into accuracy and output KL with its own metric code), and
the wall seconds of each step (scoring timed around ModelOpt's ``estimate_sensitivity_scores``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

#: ModelOpt's name of "left unquantized"; such a layer counts 16 bits in its effective bits
NONE_FORMAT = "NONE"


def custom_format(int_bits: int, block: int) -> dict[str, Any]:
    """A weight-only ``int_bits`` integer format with one max-calibrated scale per ``block`` input
    columns, in ModelOpt's config layout (its INT4_BLOCKWISE_WEIGHT_ONLY_CFG with other bits)."""
    return {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer",
             "cfg": {"num_bits": int(int_bits), "block_sizes": {-1: int(block), "type": "static"}}},
        ],
        "algorithm": "max",
    }


def format_label(num_bits: Any, block_sizes: Any) -> str:
    """A quantizer's format as the benchmark names it: ``INT4_B128``, ``INT8_ROW``, ..."""
    bits = int(num_bits)
    if isinstance(block_sizes, Mapping):
        block = block_sizes.get(-1, block_sizes.get("-1"))
        if block:
            return f"INT{bits}_B{int(block)}"
    return f"INT{bits}_ROW"


def _log(msg: str) -> None:
    print(f"[peer] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _timed(cls: Any, attr: str, bucket: list[float]) -> Iterator[None]:
    """Add the wall seconds of every call of ``cls.attr`` to ``bucket`` (nothing when it does not exist)."""
    original = getattr(cls, attr, None)
    if original is None:
        yield
        return

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            bucket.append(time.perf_counter() - t)

    setattr(cls, attr, wrapper)
    try:
        yield
    finally:
        setattr(cls, attr, original)


def _formats(model: Any, searched: Sequence[str]) -> dict[str, str]:
    """The format ModelOpt left on each searched layer: ``NONE`` when its weight quantizer is off."""
    out = {}
    modules = dict(model.named_modules())
    for name in searched:
        wq = getattr(modules.get(name), "weight_quantizer", None)
        if wq is None or not getattr(wq, "is_enabled", False):
            out[name] = NONE_FORMAT
        else:
            out[name] = format_label(wq.num_bits, getattr(wq, "block_sizes", None))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: peer_modelopt.py JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    out_path = Path(job["out"])
    t_start = time.perf_counter()
    warnings.filterwarnings("ignore")
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification

    transformers.utils.logging.set_verbosity_error()
    t0 = time.perf_counter()
    import modelopt
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization import algorithms

    import_s = time.perf_counter() - t0
    torch.manual_seed(int(job.get("seed", 0)))
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    rows = torch.load(job["rows"], weights_only=True)
    calib, evald = rows["calibration"], rows["evaluation"]
    searched: list[str] = list(job["searched"])
    base = AutoModelForSequenceClassification.from_pretrained(job["model_dir"], attn_implementation="eager").eval()
    linear = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = [n for n in searched if n not in linear]
    if missing:
        raise SystemExit(f"searched layers are not linear layers of the model: {missing[:3]}")
    disabled = [n for n in linear if n not in set(searched)]
    numel = {n: int(dict(base.named_modules())[n].weight.numel()) for n in linear}

    def inputs(b: Mapping[str, Any]) -> dict[str, Any]:
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}

    def forward_step(model: Any, batch: Mapping[str, Any]) -> Any:
        return model(**inputs(batch)).logits

    def loss_func(output: Any, batch: Mapping[str, Any]) -> Any:
        return torch.nn.functional.cross_entropy(output, batch["labels"])

    def forward_loop(model: Any) -> None:
        for b in calib:
            forward_step(model, b)

    @torch.no_grad()
    def logits(model: Any) -> list[list[list[float]]]:
        return [forward_step(model, b).float().tolist() for b in evald]

    t0 = time.perf_counter()
    fp_logits = logits(base)
    eval_unit = time.perf_counter() - t0
    answer: dict[str, Any] = {
        "versions": {"modelopt": getattr(modelopt, "__version__", None), "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": sys.version.split()[0]},
        "threads": torch.get_num_threads(),
        "import_seconds": import_s,
        "eval_unit_seconds": eval_unit,
        "linear_numel": numel,
        "disabled_layers": disabled,
        "fp32_logits": fp_logits,
        "runs": [],
    }

    def save() -> None:
        answer["seconds"] = time.perf_counter() - t_start
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(answer), encoding="utf-8")
        tmp.replace(out_path)

    scorers = {"gradient": "AutoQuantizeGradientSearcher", "kl_div": "AutoQuantizeKLDivSearcher"}
    for method in job["methods"]:
        for set_name, fmts in job["format_sets"].items():
            targets = [(float(t["budget"]), float(t["target"])) for t in job["targets"][set_name]]
            run: dict[str, Any] = {"method": method, "format_set": set_name, "formats": fmts, "points": []}
            answer["runs"].append(run)
            if not targets:
                run["skipped"] = "no feasible target"
                continue
            formats = [f if isinstance(f, str) else custom_format(f["int_bits"], f["block"]) for f in fmts]
            score_s: list[float] = []
            model = copy.deepcopy(base)
            _log(f"{method} / {set_name}: auto_quantize at {targets[0][1]:.4f} effective bits")
            t0 = time.perf_counter()
            try:
                with _timed(getattr(algorithms, scorers[method]), "estimate_sensitivity_scores", score_s):
                    _, state = mtq.auto_quantize(
                        model,
                        constraints={"effective_bits": targets[0][1]},
                        quantization_formats=formats,
                        data_loader=calib,
                        forward_step=forward_step,
                        loss_func=loss_func if method == "gradient" else None,
                        disabled_layers=disabled,
                        num_calib_steps=len(calib),
                        num_score_steps=len(calib),
                        verbose=False,
                        method=method,
                    )
            except Exception as exc:  # noqa: BLE001 - recorded, the other runs go on
                run["error"] = f"{type(exc).__name__}: {exc}"
                run["traceback"] = traceback.format_exc()[-4000:]
                _log(f"{method} / {set_name} failed: {run['error']}")
                save()
                continue
            run["auto_quantize_seconds"] = time.perf_counter() - t0
            run["score_seconds"] = sum(score_s) if score_s else None
            den = state.get("cost_denominator")
            run["cost_denominator"] = None if den is None else float(den)
            first = {k.removesuffix(".quant_recipe"): str(v) for k, v in state["best"]["recipe"].items()}
            eff = state["best"]["constraints"].get("effective_bits")
            run["search_effective_bits"] = None if eff is None else float(eff)
            del model
            for budget, target in targets:
                point: dict[str, Any] = {"budget": budget, "target": target}
                t0 = time.perf_counter()
                cfg = algorithms.get_auto_quantize_config(state, constraints={"effective_bits": target})
                point["resolve_seconds"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                qmodel = mtq.quantize(copy.deepcopy(base), cfg, forward_loop)
                point["quantize_seconds"] = time.perf_counter() - t0
                point["formats"] = _formats(qmodel, searched)
                t0 = time.perf_counter()
                point["logits"] = logits(qmodel)
                point["eval_seconds"] = time.perf_counter() - t0
                run["points"].append(point)
                del qmodel
                _log(f"{method} / {set_name} @ {target:.4f}: "
                     + ", ".join(f"{f} x{list(point['formats'].values()).count(f)}"
                                 for f in sorted(set(point["formats"].values()))))
            run["first_target_recipe"] = first
            save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
