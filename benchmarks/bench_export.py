"""Export and reload of one point of a real model in every checkpoint format.

``--model minilm`` (the default): the MiniLM BBC classifier, a mixed map over its 36 matrices
(layer granularity, q/k/v tied, the decisions taking ``4g128``, ``8``, ``4`` and ``32`` in turn),
compared on held-out articles (``--rows``) by accuracy. ``--model smollm2``: the causal LM
SmolLM2-135M (the converted folder ``smollm2-135m`` of :mod:`benchmarks.assets`), a mixed map over its
210 matrices (layer granularity, q/k/v and gate/up tied, the decisions taking ``4g64``, ``4g128``,
``8``, ``4`` and ``32`` in turn), compared on ``--windows`` token windows of ``--max-length`` tokens of
held-out BBC text (:func:`search.data.token_windows`) by perplexity. A decision an option does not fit
(``4g128`` on SmolLM2's 576 input columns) takes the next option in turn that fits
(:func:`mixed_map`). **SmolLM2's weights come from a 4-bit group-32 GGUF file** (every 32 input
columns of a row hold at most 16 distinct values): group-wise options look better on it than on a
checkpoint trained in float.

Then, for each format of :mod:`bitscout.formats`:

* the export's wall time (:func:`search.export.export_point` from the loaded fp32 model), the median
  of ``--repeat`` runs;
* the files' size (the weights file and the whole directory);
* the reload's wall time up to the end of a first forward of one row (compressed-tensors
  decompresses on it), the median of ``--repeat`` runs: ``native`` through
  :func:`search.export.load_artifact` onto the model loaded from its directory, the other two with
  plain ``AutoModelFor*.from_pretrained`` (eager attention, as the search);
* whether the reloaded outputs (logits) equal bitscout's evaluation of the map
  (:meth:`ModelAdapter.quantized`) on every row or window, and the metric there
  (:func:`search.tasks.evaluate`: accuracy, or perplexity over the windows' tokens).

``python -m benchmarks.bench_export [--model minilm|smollm2] [--cache DIR] [--rows N] [--windows N]
[--max-length N] [--options 4g64,8,...] [--repeat K] [--out FILE.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class ModelSetup:
    """What one ``--model`` choice runs: the cache folder, the task, the ties and the default options."""

    folder: str
    task: str
    tie: tuple[str, ...]
    options: str
    metric: str
    note: str | None = None


SMOLLM2_NOTE = (
    "SmolLM2-135M's weights come from a 4-bit group-32 GGUF file (every 32 input columns of a row hold at most 16 "
    "distinct values, the embedding is 8-bit): group-wise options look better on it than on a checkpoint trained "
    "in float"
)

MODELS = {
    "minilm": ModelSetup("minilm-bbc", "sequence_classification", ("qkv",), "4g128,8,4,32", "accuracy"),
    "smollm2": ModelSetup("smollm2-135m", "causal_lm", ("qkv", "gate_up"), "4g64,4g128,8,4,32", "perplexity",
                          SMOLLM2_NOTE),
}  # fmt: skip


def _log(msg: str) -> None:
    print(f"[bench_export] {msg}", file=sys.stderr, flush=True)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def mixed_map(space: Any, options: Sequence[Any]) -> Any:
    """A mixed map: decision ``k`` (a tied set or an untied group, in the space's order) takes
    ``options[k % n]``, or, when that option is not allowed for every group of the decision (a group
    size that does not divide its columns), the next one in turn that is. Raises ValueError naming the
    decision when none of ``options`` is allowed for it."""
    from search.space import PrecisionMap

    pm = {}
    for k, decision in enumerate(space.decisions):
        for j in range(len(options)):
            opt = options[(k + j) % len(options)]
            if all(opt in space.options[gi] for gi in decision):
                break
        else:
            names = ", ".join(space.groups[gi].name for gi in decision)
            raise ValueError(f"none of the options {[o.key() for o in options]} fits {names}")
        pm.update({space.groups[gi].name: opt for gi in decision})
    return PrecisionMap(pm)


def _load_batches(a: argparse.Namespace, setup: ModelSetup, cache: Path, lm: Any) -> tuple[list[Any], dict[str, Any]]:
    """The rows (classifier) or token windows (causal LM) every reload is compared on, and what they are."""
    from search.data import load_text_data, token_windows, tokenize

    if setup.task == "causal_lm":
        data = load_text_data(str(cache / "bbc_heldout.jsonl"))
        win = token_windows(data, lm.tokenizer, length=a.max_length, calibration=0, evaluation=a.windows,
                            batch_size=1)  # fmt: skip
        return win.evaluation, {"data": "bbc_heldout.jsonl", "windows": a.windows, "max_length": a.max_length,
                                "texts": len(win.evaluation_texts)}  # fmt: skip
    names = [lm.model.config.id2label[i] for i in range(len(lm.model.config.id2label))]
    data = load_text_data(str(cache / "bbc_heldout.jsonl"), label_field="label", label_names=names, limit=a.rows)
    return tokenize(data, lm.tokenizer, max_length=64, batch_size=50), {"data": "bbc_heldout.jsonl",
                                                                        "rows": len(data.examples)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_export")
    p.add_argument("--model", choices=sorted(MODELS), default="minilm")
    p.add_argument("--cache", default=".cache")
    p.add_argument("--rows", type=int, default=200, help="minilm: held-out BBC articles the logits are compared on")
    p.add_argument("--windows", type=int, default=4, help="smollm2: token windows of held-out BBC text")
    p.add_argument("--max-length", type=int, default=128, help="smollm2: tokens a window")
    p.add_argument("--options", default=None, help="the options the decisions take in turn (default: the model's)")
    p.add_argument("--repeat", type=int, default=3, help="exports and reloads per format (the median is reported)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from benchmarks.run import cpu_model
    from bitscout.formats import EXPORT_FORMATS, NATIVE
    from search.adapter import ModelAdapter
    from search.cost import CostModel
    from search.export import export_point, load_artifact
    from search.space import BitOption
    from search.tasks import evaluate, load_model, model_output

    setup = MODELS[a.model]
    cache = Path(a.cache)
    model_dir = cache / setup.folder
    if not (model_dir / "model.safetensors").is_file():
        from benchmarks import assets

        assets.ensure_packages()
        model_dir = assets.bbc_classifier(cache) if a.model == "minilm" else assets.smollm2_dir(cache)
    task = setup.task
    lm = load_model(model_dir, task)
    model = lm.model
    batches, data_info = _load_batches(a, setup, cache, lm)

    option_keys = [o.strip() for o in (a.options or setup.options).split(",")]
    options = [BitOption.parse(o) for o in option_keys]
    adapter = ModelAdapter(model)
    space = adapter.build_space(granularity="layer", bits=[o for o in option_keys if o != "32"], tie=setup.tie,
                                strict=False)  # fmt: skip
    pmap = mixed_map(space, options)
    cost = CostModel(space).cost(pmap)

    def outputs(m: torch.nn.Module) -> list[torch.Tensor]:
        with torch.no_grad():
            return [model_output(m, b, task) for b in batches]

    def metric(m: torch.nn.Module) -> float:
        return evaluate(m, batches, task)[setup.metric]

    with adapter.quantized(pmap, space):
        want = outputs(model)
        q_metric = metric(model)
    fp_metric = metric(model)
    _log(f"{a.model}: {len(space.groups)} groups, {len(space.decisions)} decisions, map {cost.avg_bits:.2f} avg bits, "
         f"{cost.size_mb:.2f} MB by the cost model; {setup.metric} full precision {fp_metric:.4f}, "
         f"quantized {q_metric:.4f} ({data_info})")  # fmt: skip

    auto = transformers.AutoModelForCausalLM if task == "causal_lm" else transformers.AutoModelForSequenceClassification

    def reload(fmt: str, out: Path) -> torch.nn.Module:
        if fmt == NATIVE:
            return load_artifact(out, load_model(model_dir, task).model).eval()
        return auto.from_pretrained(out, attn_implementation="eager").eval()

    first = batches[0]
    rows = []
    root = Path(tempfile.mkdtemp(prefix="bench_export_"))
    try:
        for fmt in EXPORT_FORMATS:
            out = root / fmt
            t_export, t_reload = [], []
            for _ in range(a.repeat):
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                report = export_point(fmt, model, space, pmap, out, model_dir=model_dir)
                t_export.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                loaded = reload(fmt, out)
                with torch.no_grad():
                    loaded(input_ids=first.input_ids[:1], attention_mask=first.attention_mask[:1])
                t_reload.append(time.perf_counter() - t0)
            got = outputs(loaded)
            equal = all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
            rows.append({
                "format": fmt, "export_s": round(statistics.median(t_export), 2),
                "reload_s": round(statistics.median(t_reload), 2),
                "weights_mb": round(report.path.stat().st_size / 1e6, 3), "dir_mb": round(_dir_bytes(out) / 1e6, 3),
                "logits_equal": equal, "max_abs_diff": max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True)),
                setup.metric: metric(loaded), "quantized_groups": len(report.quantized),
                "no_kernel_groups": len(report.no_kernel), "dense_groups": len(report.dense),
                "warnings": list(report.warnings),
            })  # fmt: skip
            _log(f"{fmt}: export {rows[-1]['export_s']:.2f} s, reload to the first forward {rows[-1]['reload_s']:.2f} s, "
                 f"{rows[-1]['weights_mb']:.2f} MB, logits equal {equal}, {setup.metric} {rows[-1][setup.metric]:.4f}")
            del loaded, got
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "command": "python -m benchmarks.bench_export " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
        "load_average": [round(x, 1) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__, "transformers": transformers.__version__, "model": a.model,
        "map": {"avg_bits": cost.avg_bits, "cost_model_mb": cost.size_mb, "groups": len(space.groups),
                "decisions": len(space.decisions), "tie": list(setup.tie), "options_in_turn": option_keys,
                "options": sorted({o.key() for o in pmap.values()})},
        **data_info, f"{setup.metric}_fp32": fp_metric, f"{setup.metric}_quantized": q_metric,
        "formats": rows,
    }  # fmt: skip
    if setup.note:
        result["note"] = setup.note
    text = json.dumps(result, indent=2)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
