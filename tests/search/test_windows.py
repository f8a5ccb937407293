"""Token windows for causal LMs: fixed length, no padding, calibration and evaluation from
disjoint texts, the stream of each equal to its texts' tokens (and eos) in order."""

from __future__ import annotations

import random

import pytest

from search.data import TextData, TextExample, token_windows
from search.errors import DataError, InvalidInputError
from search.local import DataOptions, prepare
from search.pipeline import SearchOptions
from search.tasks import load_model
from tests.tiny import WORDS, build_model, write_jsonl


def _texts(n: int) -> TextData:
    rng = random.Random(5)
    return TextData([TextExample(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9)))) for _ in range(n)])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("win") / "llama", "llama", task="causal_lm", layers=1)


def test_windows_are_full_disjoint_and_follow_the_text(llama) -> None:
    tok = load_model(llama, "causal_lm").tokenizer
    data = _texts(40)
    win = token_windows(data, tok, length=7, calibration=5, evaluation=4, batch_size=2, seed=1)
    assert not set(win.calibration_texts) & set(win.evaluation_texts)
    for part, texts, n in ((win.calibration, win.calibration_texts, 5), (win.evaluation, win.evaluation_texts, 4)):
        assert sum(len(b) for b in part) == n and [len(b) for b in part][:1] == [2]
        assert all(b.input_ids.shape[1] == 7 and bool(b.attention_mask.all()) for b in part)
        stream: list[int] = []
        for i in texts:  # the texts' tokens, each followed by eos, in the order they were read
            stream += list(tok(data.examples[i].text, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
        got = [t for b in part for row in b.input_ids.tolist() for t in row]
        assert got == stream[: 7 * n]
        # each part reads only the texts it needs: all but the last fall short of its windows
        need = [len(tok(data.examples[i].text, add_special_tokens=False)["input_ids"]) + 1 for i in texts]
        assert sum(need[:-1]) < 7 * n <= sum(need)
    assert win.tokens == (35, 28)
    # the same seed gives the same windows; another seed other texts
    again = token_windows(data, tok, length=7, calibration=5, evaluation=4, batch_size=2, seed=1)
    assert again.calibration_texts == win.calibration_texts
    assert token_windows(data, tok, length=7, calibration=5, evaluation=4, seed=2).calibration_texts != win.calibration_texts


def test_too_little_text_and_bad_lengths_are_named(llama) -> None:
    tok = load_model(llama, "causal_lm").tokenizer
    with pytest.raises(DataError) as e:
        token_windows(_texts(3), tok, length=8, calibration=4, evaluation=4)
    assert e.value.field == "data" and "windows of 8 tokens" in str(e.value)
    with pytest.raises(InvalidInputError) as e:
        token_windows(_texts(3), tok, length=1, calibration=1, evaluation=1)
    assert e.value.field == "max_length"


def test_prepare_uses_windows_for_causal_lms_only(llama, tmp_path) -> None:
    rows = [{"text": e.text} for e in _texts(60).examples]
    f = write_jsonl(tmp_path / "text.jsonl", rows)
    s = prepare(llama, DataOptions(str(f), calibration=3, evaluation=5, max_length=6, batch_size=4, windows=True),
                SearchOptions(bits=(4, 8)), task="causal_lm", device="cpu")  # fmt: skip
    assert [tuple(b.input_ids.shape) for b in s.calibration] == [(3, 6)]
    assert [tuple(b.input_ids.shape) for b in s.evaluation] == [(4, 6), (1, 6)]
    assert s.baseline()["tokens"] == 5 * 5
    bert = build_model(tmp_path / "bert", "bert")
    with pytest.raises(InvalidInputError) as e:
        prepare(bert, DataOptions(str(f), windows=True), SearchOptions(bits=(4, 8)), device="cpu")
    assert e.value.field == "windows"
