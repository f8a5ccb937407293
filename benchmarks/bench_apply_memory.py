"""Resident memory of ``bitscout.apply``: packed modules (the default) against float weights
(``materialize=True``), on the MiniLM BBC classifier and on SmolLM2-135M.

Every variant runs in a fresh subprocess (so that its RSS holds that variant alone):

==================  ============================================================================
variant             what the subprocess does
==================  ============================================================================
``original``        loads the model (fp32), applies nothing
``float``           loads it, ``bitscout.apply(model, pmap, materialize=True)``
``packed``          loads it, ``bitscout.apply(model, pmap)`` (packed modules from the map)
``packed-artifact`` loads it, ``bitscout.apply(model, ARTIFACT_DIR)``: packed modules straight from
                    the codes of the artifact exported for the same map
==================  ============================================================================

and reports, after ``gc.collect()`` and glibc's ``malloc_trim(0)`` (so that freed float weights are
handed back to the system, the same in every variant): the RSS before loading (the interpreter, torch
and transformers), the RSS after ``apply`` (``VmRSS``, and its anonymous and file-backed parts:
``from_pretrained`` maps the checkpoint, whose pages become resident as they are read), the peak RSS of the process (``VmHWM``: loading and quantizing included), the bytes
of the model's parameters and buffers (each tensor once) and of its packed weights, and the time of a
forward pass over one batch (``--tokens`` tokens) with the RSS after it. The logits of the batch are
compared across variants: ``float``, ``packed`` and ``packed-artifact`` must be equal (``torch.equal``).

Maps: ``blocks``, every matrix of the transformer blocks at 4 bits (symmetric, per-row scales, MSE
clipping), embeddings and head in fp32 (the search's default space); ``all``, the same with the
embedding tables (and tied heads) at 4 bits too.

``python -m benchmarks.bench_apply_memory [--cache .cache] [--models minilm,smollm2] [--maps blocks,all]
[--out FILE.json]``; the models come from the cache (``python -m benchmarks.assets [--llm]``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = {"minilm": ("minilm-bbc", "sequence_classification"), "smollm2": ("smollm2-135m", "causal_lm")}
VARIANTS = ("original", "float", "packed", "packed-artifact")
MAPS = ("blocks", "all")


def _log(msg: str) -> None:
    print(f"[bench_apply_memory] {msg}", file=sys.stderr, flush=True)


def _status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _load(folder: Path, task: str) -> Any:
    import torch
    import transformers

    cls = transformers.AutoModelForCausalLM if task == "causal_lm" else transformers.AutoModelForSequenceClassification
    return cls.from_pretrained(str(folder), dtype=torch.float32).eval()


def _space(model: Any, which: str) -> Any:
    from search.adapter import ModelAdapter

    return ModelAdapter(model, include_embeddings=which == "all").build_space(bits=(4,))


def _batch(task: str, tokens: int, vocab: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(100, min(vocab, 30000), (1, tokens), generator=g)


def run_variant(folder: Path, task: str, variant: str, which: str, artifact: Path | None, tokens: int,
                logits_out: Path) -> dict[str, Any]:
    """One variant in this process (the subprocess's job)."""
    import torch

    import bitscout
    from search.export.packed import model_bytes, packed_bytes

    torch.set_grad_enabled(False)
    _trim()
    base = _status()
    t0 = time.perf_counter()
    model = _load(folder, task)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if variant in ("float", "packed"):
        pmap = _space(model, which).uniform(4)
        model = bitscout.apply(model, {k: v.to_dict() for k, v in pmap.items()}, materialize=variant == "float",
                               include_embeddings=which == "all")
    elif variant == "packed-artifact":
        model = bitscout.apply(model, artifact)
    apply_s = time.perf_counter() - t0
    _trim()
    after = _status()
    ids = _batch(task, tokens, int(model.config.vocab_size))
    t0 = time.perf_counter()
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    forward_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    forward2_s = time.perf_counter() - t0
    torch.save(logits, logits_out)
    _trim()
    return {
        "variant": variant, "map": which, "load_s": round(load_s, 2), "apply_s": round(apply_s, 2),
        "rss_before_load": base["VmRSS"],
        "rss": after["VmRSS"], "rss_anon": after["RssAnon"], "rss_file": after["RssFile"], "peak_rss": after["VmHWM"],
        "param_buffer_bytes": model_bytes(model), "packed_bytes": packed_bytes(model),
        "forward_s": round(min(forward_s, forward2_s), 3), "rss_after_forward": _status()["VmRSS"],
        "peak_rss_after_forward": _status()["VmHWM"],
    }


def _export(folder: Path, task: str, which: str, out: Path) -> None:
    """The artifact of the 4-bit map (in a subprocess of its own: it holds the float model)."""
    from search.export import export_artifact

    model = _load(folder, task)
    space = _space(model, which)
    export_artifact(model, space, space.uniform(4), out, model_dir=folder)


def _child(args: list[str], timeout: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench_apply_memory", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_apply_memory")
    p.add_argument("--cache", default=".cache")
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--maps", default="blocks,all")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--timeout", type=int, default=1200)
    # one variant in this process (what the parent runs in each subprocess)
    p.add_argument("--variant", choices=VARIANTS, default=None)
    p.add_argument("--model", choices=list(MODELS), default=None)
    p.add_argument("--map", choices=MAPS, default="blocks")
    p.add_argument("--artifact", default=None)
    p.add_argument("--logits", default=None)
    p.add_argument("--export-to", default=None)
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    if a.variant is not None or a.export_to is not None:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        sub, task = MODELS[a.model]
        folder = Path(a.cache) / sub
        if a.export_to is not None:
            _export(folder, task, a.map, Path(a.export_to))
            return 0
        artifact = Path(a.artifact) if a.artifact else None
        print(json.dumps(run_variant(folder, task, a.variant, a.map, artifact, a.tokens, Path(a.logits))))
        return 0

    models = [m for m in a.models.split(",") if m]
    maps = [m for m in a.maps.split(",") if m]
    results: dict[str, Any] = {"tokens": a.tokens, "threads": a.threads, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench_apply_memory-") as tmp:
        for name in models:
            sub, task = MODELS[name]
            folder = Path(a.cache) / sub
            if not (folder / "config.json").is_file():
                raise SystemExit(f"{folder} is missing: build it with python -m benchmarks.assets "
                                 f"{'--llm ' if name == 'smollm2' else ''}--cache {a.cache}")
            for which in maps:
                art = Path(tmp) / f"{name}-{which}"
                _log(f"{name} / {which}: exporting the artifact")
                t0 = time.perf_counter()
                _child(["--cache", a.cache, "--model", name, "--map", which, "--export-to", str(art),
                        "--threads", str(a.threads)], a.timeout)
                export_s = time.perf_counter() - t0
                size = (art / "model.quant.safetensors").stat().st_size
                logits: dict[str, Any] = {}
                for variant in VARIANTS:
                    if variant == "original" and which != maps[0]:
                        continue
                    out = Path(tmp) / f"{name}-{which}-{variant}.pt"
                    _log(f"{name} / {which}: {variant}")
                    row = _child(["--cache", a.cache, "--model", name, "--map", which, "--variant", variant,
                                  "--artifact", str(art), "--logits", str(out), "--tokens", str(a.tokens),
                                  "--threads", str(a.threads)], a.timeout)
                    row.update(model=name, artifact_bytes=size, export_s=round(export_s, 1))
                    logits[variant] = torch.load(out)
                    results["runs"].append(row)
                    _log(json.dumps(row))
                same = [torch.equal(logits["float"], logits[v]) for v in ("packed", "packed-artifact")]
                for row in results["runs"]:
                    if row["model"] == name and row["map"] == which and row["variant"].startswith("packed"):
                        row["logits_equal_to_float"] = all(same)
                if not all(same):
                    raise SystemExit(f"{name} / {which}: packed logits differ from the float model's")
    text = json.dumps(results, indent=2)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
