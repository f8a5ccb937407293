"""Export and reload of one point of the real MiniLM BBC classifier in every checkpoint format.

One run takes a mixed map over MiniLM's 36 matrices (layer granularity, q/k/v tied, the decisions
taking ``4g128``, ``8``, ``4`` and ``32`` in turn), then for each format of :mod:`bitscout.formats`:

* the export's wall time (:func:`search.export.export_point` from the loaded fp32 model), the median
  of ``--repeat`` runs;
* the files' size (the weights file and the whole directory);
* the reload's wall time up to the end of a first forward of one article (compressed-tensors
  decompresses on it), the median of ``--repeat`` runs: ``native`` through
  :func:`search.export.load_artifact` onto the model loaded from its directory, the other two with
  plain ``AutoModelForSequenceClassification.from_pretrained`` (eager attention, as the search);
* whether the reloaded logits equal bitscout's evaluation of the map
  (:meth:`ModelAdapter.quantized`) on the held-out rows, and the accuracy there.

``python -m benchmarks.bench_export [--cache DIR] [--rows N] [--repeat K] [--out FILE.json]``
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
from pathlib import Path

import torch


def _log(msg: str) -> None:
    print(f"[bench_export] {msg}", file=sys.stderr, flush=True)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_export")
    p.add_argument("--cache", default=".cache")
    p.add_argument("--rows", type=int, default=200, help="held-out BBC articles the logits are compared on")
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
    from search.data import load_text_data, tokenize
    from search.export import export_point, load_artifact
    from search.space import BitOption, PrecisionMap
    from search.tasks import load_model

    cache = Path(a.cache)
    model_dir = cache / "minilm-bbc"
    if not (model_dir / "model.safetensors").is_file():
        from benchmarks.assets import bbc_classifier, ensure_packages

        ensure_packages()
        model_dir = bbc_classifier(cache)
    lm = load_model(model_dir, "sequence_classification")
    model = lm.model
    names = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    data = load_text_data(str(cache / "bbc_heldout.jsonl"), label_field="label", label_names=names, limit=a.rows)
    batches = tokenize(data, lm.tokenizer, max_length=64, batch_size=50)

    adapter = ModelAdapter(model)
    space = adapter.build_space(granularity="layer", bits=("4g128", 8, 4), tie=("qkv",))
    options = [BitOption.parse(o) for o in ("4g128", "8", "4", "32")]
    pmap = PrecisionMap({
        space.groups[gi].name: options[k % len(options)] for k, dec in enumerate(space.decisions) for gi in dec
    })
    cost = CostModel(space).cost(pmap)

    def logits(m: torch.nn.Module) -> list[torch.Tensor]:
        with torch.no_grad():
            return [m(input_ids=b.input_ids, attention_mask=b.attention_mask).logits for b in batches]

    def accuracy(out: list[torch.Tensor]) -> float:
        hits = sum(int((o.argmax(-1) == b.labels).sum()) for o, b in zip(out, batches, strict=True))
        return hits / sum(len(b.labels) for b in batches)

    with adapter.quantized(pmap, space):
        want = logits(model)
    fp_acc = accuracy(logits(model))
    _log(f"{len(space.groups)} groups, map {cost.avg_bits:.2f} avg bits, {cost.size_mb:.2f} MB by the cost model; "
         f"accuracy fp32 {fp_acc:.4f}, quantized {accuracy(want):.4f} on {len(data.examples)} held-out articles")

    def reload(fmt: str, out: Path) -> torch.nn.Module:
        if fmt == NATIVE:
            return load_artifact(out, load_model(model_dir, "sequence_classification").model).eval()
        auto = transformers.AutoModelForSequenceClassification
        return auto.from_pretrained(out, attn_implementation="eager").eval()

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
                    loaded(input_ids=batches[0].input_ids[:1], attention_mask=batches[0].attention_mask[:1])
                t_reload.append(time.perf_counter() - t0)
            got = logits(loaded)
            equal = all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
            rows.append({
                "format": fmt, "export_s": round(statistics.median(t_export), 2),
                "reload_s": round(statistics.median(t_reload), 2),
                "weights_mb": round(report.path.stat().st_size / 1e6, 3), "dir_mb": round(_dir_bytes(out) / 1e6, 3),
                "logits_equal": equal, "max_abs_diff": max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True)),
                "accuracy": accuracy(got), "quantized_groups": len(report.quantized), "no_kernel_groups": len(report.no_kernel),
                "dense_groups": len(report.dense), "warnings": list(report.warnings),
            })  # fmt: skip
            _log(f"{fmt}: export {rows[-1]['export_s']:.2f} s, reload to the first forward {rows[-1]['reload_s']:.2f} s, "
                 f"{rows[-1]['weights_mb']:.2f} MB, logits equal {equal}")
            del loaded
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "command": "python -m benchmarks.bench_export " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "torch": torch.__version__, "transformers": transformers.__version__,
        "map": {"avg_bits": cost.avg_bits, "cost_model_mb": cost.size_mb, "groups": len(space.groups),
                "options": sorted({o.key() for o in pmap.values()})},
        "rows": len(data.examples), "accuracy_fp32": fp_acc, "accuracy_quantized": accuracy(want),
        "formats": rows,
    }  # fmt: skip
    text = json.dumps(result, indent=2)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
