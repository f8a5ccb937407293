"""Token classification and regression as tasks, and the refusal of models the search cannot cover.

A tiny BertForTokenClassification and a tiny regression BertForSequenceClassification (built from
configs, trained a few steps, saved with ``save_pretrained``) are searched in-process through
``bitscout search`` with every method and refinement; the stored metrics are checked against a
direct computation with transformers (the tokenizer's own word alignment, numpy's correlation).
A tiny T5 is refused with one line before any work.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from search.data import IGNORE_INDEX, load_text_data, load_token_data, split_data, tokenize
from search.errors import DataError, UnsupportedModelError
from search.local import detect_task_from_dir, prepare
from tests.tiny import TAGS, build_model, build_regressor, build_tagger, scored_rows, tagged_rows, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tasks")


@pytest.fixture(scope="module")
def tagger(root: Path) -> Path:
    return build_tagger(root / "tagger")


@pytest.fixture(scope="module")
def regressor(root: Path) -> Path:
    return build_regressor(root / "regressor")


@pytest.fixture(scope="module")
def tag_file(root: Path) -> Path:
    return write_jsonl(root / "tags.jsonl", tagged_rows(64, seed=1))


@pytest.fixture(scope="module")
def score_file(root: Path) -> Path:
    return write_jsonl(root / "scores.jsonl", scored_rows(64, seed=1))


SIZES = ["--calibration-size", "16", "--evaluation-size", "32", "--max-length", "16", "--batch-size", "8"]
SEARCH = ["--bits", "2,4,8", "--max-avg-bits", "5", "--front-points", "4", "--quiet",
          "--option", "hessian.max_probes=4", "--option", "hessian.min_probes=2",
          "--option", "dnas.epochs=1", "--option", "nsga2.n_evaluations=12", "--option", "nsga2.population_size=6"]  # fmt: skip


def _run_search(*argv: str, out: Path) -> dict[str, Any]:
    from search.cli import search_main

    assert search_main([*argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- data


def test_token_data_label_the_first_sub_word_of_each_word(tagger: Path, root: Path) -> None:
    from transformers import AutoTokenizer

    rows = [{"tokens": ["good", "movie", "superb"], "tags": ["POS", "O", -100]},
            {"tokens": ["the", "awful", "it"], "tags": [0, 2, 0]}]  # fmt: skip
    data = load_token_data(write_jsonl(root / "two.jsonl", rows), tag_names=list(TAGS))
    assert [e.tags for e in data.examples] == [(1, 0, IGNORE_INDEX), (0, 2, 0)] and data.has_labels
    tok = AutoTokenizer.from_pretrained(str(tagger))
    [batch] = tokenize(data, tok, max_length=16, batch_size=2)
    for j, ex in enumerate(data.examples):
        enc = tok(list(ex.words), is_split_into_words=True)
        words = enc.word_ids()
        want = [IGNORE_INDEX] * batch.labels.shape[1]
        for pos, w in enumerate(words):
            if w is not None and (pos == 0 or words[pos - 1] != w):
                want[pos] = ex.tags[w]
        assert batch.labels[j].tolist() == want
        assert batch.input_ids[j, : len(enc["input_ids"])].tolist() == enc["input_ids"]

    bad = [({"tokens": ["a", "b"], "tags": ["O"]}, "2 words"), ({"tokens": "a b", "tags": ["O"]}, "list of non-empty"),
           ({"tokens": ["a"], "tags": "O"}, "list of tags"), ({"words": ["a"]}, "no field 'tokens'")]  # fmt: skip
    for row, needle in bad:
        with pytest.raises(DataError, match=needle):
            load_token_data(write_jsonl(root / "bad.jsonl", [row]))


def test_regression_labels_are_real_numbers(root: Path) -> None:
    data = load_text_data(write_jsonl(root / "r.jsonl", [{"text": "a", "y": 1}, {"text": "b", "y": "-0.5"}]),
                          label_field="y", numeric_labels=True)  # fmt: skip
    assert data.labels == [1.0, -0.5] and all(isinstance(v, float) for v in data.labels)
    with pytest.raises(DataError, match="not a number"):
        load_text_data(write_jsonl(root / "r2.jsonl", [{"text": "a", "y": "high"}]), label_field="y", numeric_labels=True)


def test_the_task_comes_from_the_config(tagger: Path, regressor: Path, root: Path) -> None:
    from bitscout._base import detect_task

    assert detect_task_from_dir(tagger) == "token_classification" == detect_task(tagger).value
    assert detect_task_from_dir(regressor) == "regression" == detect_task(regressor).value
    classifier = build_model(root / "classifier", "bert", num_labels=3)
    assert detect_task_from_dir(classifier) == "sequence_classification" == detect_task(classifier).value


# --------------------------------------------------------------------------- searches


def direct_token_metrics(model_dir: Path, pmap: dict[str, Any] | None, examples: list[Any]) -> tuple[float, float]:
    """Token accuracy over scored words and the mean per-token KL to full precision, straight from
    transformers (the first sub-word of each word, as the examples of transformers score them)."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    import bitscout

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ref_model = AutoModelForTokenClassification.from_pretrained(str(model_dir)).eval()
    model = AutoModelForTokenClassification.from_pretrained(str(model_dir)).eval()
    if pmap is not None:
        model = bitscout.apply(model, pmap)
    correct = total = 0
    kls = []
    with torch.no_grad():
        for ex in examples:
            enc = tok(list(ex.words), is_split_into_words=True, truncation=True, max_length=16, return_tensors="pt")
            words = enc.word_ids()
            logits = model(**enc).logits[0].double()
            ref = ref_model(**enc).logits[0].double()
            first = [p for p, w in enumerate(words) if w is not None and (p == 0 or words[p - 1] != w)]
            scored = [p for p in first if ex.tags[words[p]] != IGNORE_INDEX]
            for p in scored:
                correct += int(int(logits[p].argmax()) == ex.tags[words[p]])
                total += 1
            lp_ref, lp = ref[scored].log_softmax(-1), logits[scored].log_softmax(-1)
            kls.append(float((lp_ref.exp() * (lp_ref - lp)).sum(-1).mean()))
    return correct / total, float(np.mean(kls))


def test_token_classification_searched_in_process_with_every_method(tagger: Path, tag_file: Path, root: Path) -> None:
    result = _run_search("--model", str(tagger), "--data", str(tag_file), *SIZES, *SEARCH,
                         "--method", "kl,hessian,dnas,nsga2", "--refine", "1", "--refine-steps", "3",
                         out=root / "tagger.json")  # fmt: skip
    assert result["info"]["task"] == "token_classification" and result["metric"] == "accuracy"
    assert {p["method"] for p in result["points"]} >= {"kl", "hessian", "dnas", "nsga2", "uniform"}
    assert result["info"]["label_names"] == list(TAGS)
    assert result["info"]["refine"]["refined"] == 1 and sum(p["refined"] for p in result["points"]) == 1

    data = load_token_data(tag_file, tag_names=list(TAGS))
    _, evaluation = split_data(data, calibration=16, evaluation=32, seed=0)
    acc, kl = direct_token_metrics(tagger, None, evaluation.examples)
    assert result["baseline_metrics"]["accuracy"] == pytest.approx(acc, abs=1e-12) and acc > 1 / len(TAGS)
    checked = 0
    for p in result["points"]:
        if p["refined"] or p["label"] not in ("uniform 2-bit", "uniform 4-bit", "sweep"):
            continue
        acc, kl = direct_token_metrics(tagger, p["precision_map"], evaluation.examples)
        assert p["metrics"]["accuracy"] == pytest.approx(acc, abs=1e-12), p["label"]
        assert p["metrics"]["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-9), p["label"]
        checked += 1
    assert checked >= 3
    two = next(p for p in result["points"] if p["label"] == "uniform 2-bit")
    assert two["metrics"]["kl"] > 0


def direct_regression_metrics(model_dir: Path, pmap: dict[str, Any] | None, examples: list[Any]) -> tuple[float, float]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import bitscout

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    if pmap is not None:
        model = bitscout.apply(model, pmap)
    with torch.no_grad():
        pred = np.array([float(model(**tok(ex.text, truncation=True, max_length=16, return_tensors="pt")).logits[0, 0])
                         for ex in examples])  # fmt: skip
    y = np.array([ex.label for ex in examples])
    return float(np.mean((pred - y) ** 2)), float(np.corrcoef(pred, y)[0, 1])


def test_regression_searched_in_process_with_every_method(regressor: Path, score_file: Path, root: Path) -> None:
    result = _run_search("--model", str(regressor), "--data", str(score_file), "--label-field", "score", *SIZES,
                         *SEARCH, "--method", "kl,hessian,dnas,nsga2", "--refine", "recommended",
                         "--refine-steps", "3", out=root / "regressor.json")  # fmt: skip
    assert result["info"]["task"] == "regression" and result["metric"] == "mse" and not result["higher_is_better"]
    assert {p["method"] for p in result["points"]} >= {"kl", "hessian", "dnas", "nsga2", "uniform"}
    data = load_text_data(score_file, label_field="score", numeric_labels=True)
    _, evaluation = split_data(data, calibration=16, evaluation=32, seed=0)
    mse, r = direct_regression_metrics(regressor, None, evaluation.examples)
    assert result["baseline_metrics"]["mse"] == pytest.approx(mse, rel=1e-5)
    assert result["baseline_metrics"]["pearson"] == pytest.approx(r, rel=1e-5) and r > 0.5
    checked = 0
    for p in result["points"]:
        if p["refined"] or p["label"] not in ("uniform 2-bit", "uniform 4-bit", "sweep"):
            continue
        mse, r = direct_regression_metrics(regressor, p["precision_map"], evaluation.examples)
        assert p["metrics"]["mse"] == pytest.approx(mse, rel=1e-5), p["label"]
        assert p["metrics"]["pearson"] == pytest.approx(r, rel=1e-5), p["label"]
        checked += 1
    assert checked >= 3
    [refined] = [p for p in result["points"] if p["refined"]]
    origin = result["points"][refined["refined_from"]]
    assert refined["precision_map"] == origin["precision_map"] and refined["cost"] == origin["cost"]
    assert refined["metrics"]["mse"] != origin["metrics"]["mse"]  # the weights were fine-tuned


def test_the_squared_error_is_the_regression_discrepancy(regressor: Path, score_file: Path) -> None:
    from search.local import DataOptions
    from search.pipeline import SearchOptions
    from search.result import Budget
    from search.tasks import discrepancy, model_output

    search = prepare(regressor, DataOptions(str(score_file), label_field="score", calibration=8, evaluation=8,
                                            max_length=16), SearchOptions(budget=Budget(max_avg_bits=8)), device="cpu")  # fmt: skip
    b = search.evaluation[0]
    ref = model_output(search.model, b, "regression")
    out = ref + torch.linspace(0, 1, ref.numel()).reshape(ref.shape)
    assert discrepancy(ref, out, b, "regression").tolist() == pytest.approx(torch.linspace(0, 1, ref.numel()).square().tolist())


# --------------------------------------------------------------------------- refusals


def test_t5_is_refused_before_any_work_with_one_line(root: Path, score_file: Path) -> None:
    t5 = build_model(root / "t5", "t5")
    with pytest.raises(UnsupportedModelError, match="encoder-decoder") as exc:
        detect = prepare(t5, _no_data(root), _options(), device="cpu")  # no data file: refused before it is read
        del detect
    assert exc.value.field == "model" and "ForTokenClassification" in exc.value.message
    for extra in ([], ["--task", "embeddings"]):
        proc = subprocess.run([sys.executable, "-m", "bitscout.cli", "search", "--model", str(t5), "--data",
                               str(score_file), "--max-avg-bits", "4", "--quiet", *extra],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "T5ForConditionalGeneration is an encoder-decoder model" in lines[0] and "ForCausalLM" in lines[0]


def test_a_task_that_contradicts_the_head_is_refused(regressor: Path, score_file: Path) -> None:
    from search.local import DataOptions

    with pytest.raises(UnsupportedModelError, match="regression head"):
        prepare(regressor, DataOptions(str(score_file), label_field="score"), _options(),
                task="sequence_classification", device="cpu")  # fmt: skip


def _no_data(root: Path) -> Any:
    from search.local import DataOptions

    return DataOptions(str(root / "missing.jsonl"))


def _options() -> Any:
    from search.pipeline import SearchOptions
    from search.result import Budget

    return SearchOptions(budget=Budget(max_avg_bits=4))


def test_loss_kinds_of_the_new_tasks(tagger: Path, tag_file: Path) -> None:
    from transformers import AutoTokenizer

    from search.hessian import loss_kind, loss_normaliser

    data = load_token_data(tag_file, tag_names=list(TAGS))
    batches = tokenize(data, AutoTokenizer.from_pretrained(str(tagger)), max_length=16, batch_size=16)
    assert loss_kind("token_classification", batches) == "token_cross_entropy"
    scored = sum(1 for e in data.examples for t in e.tags if t != IGNORE_INDEX)
    assert loss_normaliser("token_classification", batches) == scored
    unlabeled = load_token_data(tag_file, tags_field=None)
    plain = tokenize(unlabeled, AutoTokenizer.from_pretrained(str(tagger)), max_length=16, batch_size=16)
    assert loss_kind("token_classification", plain) == "self_distillation"
    assert loss_normaliser("token_classification", plain) == len(unlabeled)
