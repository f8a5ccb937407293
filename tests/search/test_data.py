"""search.data: loading text files, splitting, tokenizing with real (tiny, offline) tokenizers."""

from __future__ import annotations

import csv
import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

from search.data import TextData, TextExample, TokenizedBatch, load_text_data, split_data, tokenize
from search.errors import DataError, InvalidInputError

# ---------------------------------------------------------------------------------------------
# helpers


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def labeled(n_per: dict[str, int]) -> TextData:
    names = sorted(n_per)
    ex = [TextExample(f"{name} text {i}", names.index(name)) for name in names for i in range(n_per[name])]
    return TextData(ex, names)


# ---------------------------------------------------------------------------------------------
# loading: good files


def test_jsonl_string_labels_map_to_sorted_names(tmp_path: Path) -> None:
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "the match was won", "label": "sport"},
            {"text": "shares fell", "label": "business"},
            {"text": "a new phone", "label": "tech", "extra": 1},
            {"text": "goal!", "label": "sport"},
        ],
    )
    data = load_text_data(p, label_field="label")
    assert data.label_names == ["business", "sport", "tech"]
    assert [e.label for e in data.examples] == [1, 0, 2, 1]
    assert data.examples[0] == TextExample("the match was won", 1)
    assert len(data) == 4 and data.has_labels


def test_jsonl_without_labels_and_blank_lines_and_unicode(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    # U+2028 inside a JSON string must not split the line.
    p.write_text('{"text": "caf\u00e9 \u2028 line"}\n\n   \n{"text": "two"}\n', encoding="utf-8")
    data = load_text_data(str(p))
    assert data.texts == ["caf\u00e9 \u2028 line", "two"]
    assert data.labels == [None, None] and data.label_names is None and not data.has_labels


def test_jsonl_int_labels_kept_and_custom_fields(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "a", "y": 3}, {"sentence": "b", "y": 0}, {"sentence": "c", "y": 1.0}])
    data = load_text_data(p, text_field="sentence", label_field="y")
    assert data.labels == [3, 0, 1]
    assert data.label_names is None


def test_label_names_given_are_used(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}, {"text": "c", "label": 1}])
    data = load_text_data(p, label_field="label", label_names=["pos", "neg"])
    assert data.labels == [0, 1, 1]
    assert data.label_names == ["pos", "neg"]


def test_limit_keeps_first_rows_and_validates_only_them(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\nthis is not json\n', encoding="utf-8")
    data = load_text_data(p, label_field="label", limit=2)
    assert data.texts == ["a", "b"] and data.label_names == ["x", "y"]
    with pytest.raises(InvalidInputError) as ei:
        load_text_data(p, limit=0)
    assert ei.value.field == "limit"


def test_json_array_file(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]), encoding="utf-8")
    assert load_text_data(p, label_field="label").labels == [0, 1]


def test_csv_string_and_int_labels(tmp_path: Path) -> None:
    p = write_csv(
        tmp_path / "d.csv",
        ["id", "text", "label"],
        [[1, 'He said "hi", then\nleft', "rotten"], [2, "great film", "fresh"], [3, "meh", "rotten"]],
    )
    data = load_text_data(p, label_field="label")
    assert data.texts[0] == 'He said "hi", then\nleft'
    assert data.label_names == ["fresh", "rotten"]
    assert data.labels == [1, 0, 1]

    q = write_csv(tmp_path / "i.csv", ["text", "label"], [["a", 1], ["b", 0], ["c", 2]])
    data = load_text_data(q, label_field="label")
    assert data.labels == [1, 0, 2] and data.label_names is None


def test_csv_with_bom_and_long_field(tmp_path: Path) -> None:
    long_text = "word " * 40_000  # > csv's default 128 KiB field limit
    p = tmp_path / "d.csv"
    p.write_text("\ufefftext,label\n" + f'"{long_text}",a\n', encoding="utf-8")
    data = load_text_data(p, label_field="label")
    assert data.texts == [long_text] and data.label_names == ["a"]


def test_tsv_keeps_quotes(tmp_path: Path) -> None:
    p = tmp_path / "d.tsv"
    p.write_text('sentence\tlabel\nit \'s a "great" film\t1\nbad\t0\n', encoding="utf-8")
    data = load_text_data(p, text_field="sentence", label_field="label")
    assert data.texts == ['it \'s a "great" film', "bad"]
    assert data.labels == [1, 0]


# ---------------------------------------------------------------------------------------------
# loading: bad inputs


def _err(source, **kw) -> DataError:
    with pytest.raises(DataError) as ei:
        load_text_data(source, **kw)
    return ei.value


def test_missing_file(tmp_path: Path) -> None:
    e = _err(tmp_path / "nope.jsonl")
    assert e.field == "source" and "not found" in e.message and "nope.jsonl" in e.message
    e = _err(str(tmp_path / "nope.csv"))
    assert e.field == "source" and "not found" in e.message
    e = _err("data/missing.txt")
    assert e.field == "source" and "not found" in e.message


def test_invalid_jsonl_names_line(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b",}\n', encoding="utf-8")
    e = _err(p)
    assert e.field == "source" and "line 3" in e.message and "not valid JSON" in e.message
    p.write_text('{"text": "a"}\n["text"]\n', encoding="utf-8")
    e = _err(p)
    assert "line 2" in e.message and "array" in e.message


def test_messages_call_the_source_by_the_name_given(tmp_path: Path) -> None:
    cases = [
        ("d.jsonl", '{"text": "a"}\n{"text": "b",}\n', {}, "file 'reviews.jsonl' line 2 is not valid JSON"),
        ("d.json", '[{"text": "a"}, 3]', {}, "file 'reviews.jsonl' item 2 is a JSON number"),
        ("d.csv", "sentence\na\n", {}, "CSV file 'reviews.jsonl' has no column 'text'"),
        ("d.jsonl", '{"text": ""}\n', {}, "file 'reviews.jsonl' line 1 has an empty 'text'"),
        ("d.jsonl", "\n", {}, "file 'reviews.jsonl' is empty"),
        ("d.jsonl", '{"text": "a"}\n', {"label_field": "label"}, "file 'reviews.jsonl' line 1 has no label"),
    ]
    for file, content, kw, words in cases:
        p = tmp_path / file
        p.write_text(content, encoding="utf-8")
        e = _err(p, name="reviews.jsonl", **kw)
        assert words in e.message and str(tmp_path) not in e.message, (file, e.message)
    with pytest.raises(DataError) as exc:
        load_text_data(tmp_path / "missing.jsonl", name="gone.jsonl")
    assert exc.value.message == "file 'gone.jsonl' not found"
    (tmp_path / "d.jsonl").write_text("\n", encoding="utf-8")
    assert str(tmp_path) in _err(tmp_path / "d.jsonl").message  # without a name: the path as given


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "a"}\n{"text": "\xa3 5"}\n')
    e = _err(p)
    assert e.field == "source" and "UTF-8" in e.message and "line 2" in e.message


def test_csv_without_column_lists_columns(tmp_path: Path) -> None:
    p = write_csv(tmp_path / "d.csv", ["sentence", "category"], [["a", "x"]])
    e = _err(p)
    assert e.field == "text_field" and "'text'" in e.message and "'sentence'" in e.message and "'category'" in e.message
    e = _err(p, text_field="sentence", label_field="label")
    assert e.field == "label_field" and "'label'" in e.message and "'category'" in e.message


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv", "d.tsv"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    p.write_text("\n  \n", encoding="utf-8")
    e = _err(p)
    assert e.field == "source" and "empty" in e.message


def test_header_only_csv_has_no_rows(tmp_path: Path) -> None:
    p = write_csv(tmp_path / "d.csv", ["text", "label"], [])
    e = _err(p)
    assert e.field == "source" and "no rows" in e.message


def test_empty_or_missing_text_names_row(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "   "}])
    e = _err(p)
    assert e.field == "text_field" and "line 2" in e.message and "empty" in e.message
    p = write_jsonl(tmp_path / "e.jsonl", [{"text": "a"}, {"body": "b"}])
    e = _err(p)
    assert e.field == "text_field" and "line 2" in e.message and "'body'" in e.message
    p = write_jsonl(tmp_path / "f.jsonl", [{"text": 5}])
    e = _err(p)
    assert e.field == "text_field" and "line 1" in e.message and "not a string" in e.message
    p = write_csv(tmp_path / "d.csv", ["text", "label"], [["a", "x"], ["b", "y"], ["", "z"]])
    e = _err(p, label_field="label")
    assert e.field == "text_field" and "row 3" in e.message


def test_missing_label_names_row(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    e = _err(p, label_field="label")
    assert e.field == "label_field" and "line 2" in e.message
    p = write_csv(tmp_path / "d.csv", ["text", "label"], [["a", "x"], ["b", ""]])
    e = _err(p, label_field="label")
    assert e.field == "label_field" and "row 2" in e.message


def test_bad_labels(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    e = _err(p, label_field="label", label_names=["neg", "pos"])
    assert e.field == "label_field" and "line 2" in e.message and "'meh'" in e.message and "'neg'" in e.message
    p = write_jsonl(tmp_path / "e.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": -1}])
    e = _err(p, label_field="label")
    assert e.field == "label_field" and "line 2" in e.message and "negative" in e.message
    p = write_jsonl(tmp_path / "f.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": 1}])
    e = _err(p, label_field="label")
    assert e.field == "label_field" and "line 2" in e.message
    p = write_jsonl(tmp_path / "g.jsonl", [{"text": "a", "label": 0.5}])
    e = _err(p, label_field="label")
    assert e.field == "label_field" and "line 1" in e.message
    with pytest.raises(InvalidInputError) as ei:
        load_text_data(p, label_field="label", label_names=["a", "a"])
    assert ei.value.field == "label_names"


def test_unsupported_extension(tmp_path: Path) -> None:
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    e = _err(p)
    assert e.field == "source" and ".parquet" in e.message and ".jsonl" in e.message


def test_dataset_name_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    e = _err("some_dataset:train")
    assert e.field == "source" and "datasets" in e.message


class _FakeClassLabel:
    def __init__(self, names: list[str]) -> None:
        self.names = names


class _FakeDataset(list):
    def __init__(self, rows: list[dict], features: dict) -> None:
        super().__init__(rows)
        self.column_names = list(rows[0])
        self.features = features


def test_dataset_name_with_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    split = _FakeDataset(rows, {"text": object(), "label": _FakeClassLabel(["neg", "pos"])})
    calls: list[tuple] = []

    def load_dataset(name, split=None):
        calls.append((name, split))
        if name != "toy":
            raise FileNotFoundError(f"Couldn't find {name} on this machine")
        return split_obj if split is None else split_map[split]

    split_map = {"train": split, "test": split}
    split_obj = dict(split_map)
    fake = types.SimpleNamespace(load_dataset=load_dataset, load_from_disk=None)
    monkeypatch.setitem(sys.modules, "datasets", fake)

    data = load_text_data("toy:train", label_field="label")
    assert calls[-1] == ("toy", "train")
    assert data.labels == [1, 0] and data.label_names == ["neg", "pos"]

    e = _err("toy", label_field="label")  # two splits, none named
    assert e.field == "source" and "'train'" in e.message and "'test'" in e.message

    e = _err("toy:train", label_field="stars")
    assert e.field == "label_field" and "'label'" in e.message

    e = _err("missing_ds")
    assert e.field == "source" and "missing_ds" in e.message


# ---------------------------------------------------------------------------------------------
# splitting


def test_split_disjoint_stratified_deterministic() -> None:
    data = labeled({"a": 60, "b": 30, "c": 10})
    cal, ev = split_data(data, calibration=40, evaluation=30, seed=3)
    assert len(cal) == 40 and len(ev) == 30
    assert cal.label_names == data.label_names == ev.label_names
    assert not set(cal.texts) & set(ev.texts)
    assert Counter(cal.labels) == {0: 24, 1: 12, 2: 4}
    ev_counts = Counter(ev.labels)
    for label, share in ((0, 0.6), (1, 0.3), (2, 0.1)):
        assert abs(ev_counts[label] - share * 30) <= 1
    # every prefix is stratified too: the first batch of calibration mixes the labels
    assert len(set(cal.labels[:10])) == 3
    again = split_data(data, calibration=40, evaluation=30, seed=3)
    assert again == (cal, ev)
    other = split_data(data, calibration=40, evaluation=30, seed=4)
    assert other[0].texts != cal.texts


def test_split_uses_all_rows_and_unlabeled_data() -> None:
    data = TextData([TextExample(f"t{i}") for i in range(10)])
    cal, ev = split_data(data, calibration=4, evaluation=6)
    assert sorted(cal.texts + ev.texts) == sorted(data.texts)
    assert cal.labels == [None] * 4


def test_split_not_enough_rows() -> None:
    data = labeled({"a": 5, "b": 5})
    with pytest.raises(DataError) as ei:
        split_data(data, calibration=8, evaluation=4)
    assert ei.value.field == "data" and "10" in ei.value.message and "12" in ei.value.message
    with pytest.raises(InvalidInputError):
        split_data(data, calibration=-1, evaluation=4)


# ---------------------------------------------------------------------------------------------
# tokenizing


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "##s"]


@pytest.fixture
def bert_tokenizer(tmp_path: Path):
    from transformers import BertTokenizerFast

    folder = tmp_path / "bert-tok"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tok = BertTokenizerFast.from_pretrained(str(folder))
    assert tok.vocab_size == len(VOCAB)
    return tok


@pytest.fixture
def gpt2_style_tokenizer():
    """A byte-level BPE tokenizer with an eos token and no pad token, like GPT-2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(["the cat sat on the mat", "a dog ran", "the dogs ran on"] * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    assert tok.pad_token is None
    return tok


def test_tokenize_bert(bert_tokenizer) -> None:
    data = TextData(
        [TextExample("the cat sat on the mat", 1), TextExample("a dog", 0), TextExample("the cats ran", 1)], ["n", "p"]
    )
    batches = tokenize(data, bert_tokenizer, batch_size=2, max_length=128)
    assert len(batches) == 2 and all(isinstance(b, TokenizedBatch) for b in batches)
    b0 = batches[0]
    ids = {t: i for i, t in enumerate(VOCAB)}
    expected0 = [ids[t] for t in ["[CLS]", "the", "cat", "sat", "on", "the", "mat", "[SEP]"]]
    assert b0.input_ids.dtype == torch.long and b0.input_ids.shape == (2, 8)
    assert b0.input_ids[0].tolist() == expected0
    assert b0.input_ids[1].tolist() == [ids["[CLS]"], ids["a"], ids["dog"], ids["[SEP]"]] + [ids["[PAD]"]] * 4
    assert b0.attention_mask.tolist() == [[1] * 8, [1] * 4 + [0] * 4]
    assert b0.labels is not None and b0.labels.tolist() == [1, 0]
    # word pieces and the last, smaller batch
    b1 = batches[1]
    assert b1.input_ids.tolist() == [[ids["[CLS]"], ids["the"], ids["cat"], ids["##s"], ids["ran"], ids["[SEP]"]]]
    assert len(b1) == 1
    # deterministic
    again = tokenize(data, bert_tokenizer, batch_size=2, max_length=128)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(batches, again, strict=True))


def test_tokenize_truncates(bert_tokenizer) -> None:
    data = TextData([TextExample("the cat sat on the mat the cat sat on the mat"), TextExample("a")])
    (b,) = tokenize(data, bert_tokenizer, max_length=5)
    assert b.input_ids.shape == (2, 5)
    assert b.input_ids[0, -1].item() == VOCAB.index("[SEP]")
    assert b.labels is None
    assert set(b.model_inputs()) == {"input_ids", "attention_mask"}


def test_tokenize_gpt2_style_pads_with_eos_right_and_leaves_tokenizer_alone(gpt2_style_tokenizer) -> None:
    tok = gpt2_style_tokenizer
    tok.padding_side = "left"  # even so, batches are right-padded
    eos = tok.eos_token_id
    data = TextData([TextExample("the cat sat on the mat", 0), TextExample("a dog", 1)], ["x", "y"])
    (b,) = tokenize(data, tok, max_length=64)
    long_ids = tok("the cat sat on the mat")["input_ids"]
    short_ids = tok("a dog")["input_ids"]
    assert len(short_ids) < len(long_ids)
    assert b.input_ids[0].tolist() == long_ids
    pad = len(long_ids) - len(short_ids)
    assert b.input_ids[1].tolist() == short_ids + [eos] * pad
    assert b.attention_mask[1].tolist() == [1] * len(short_ids) + [0] * pad
    assert tok.pad_token is None and tok.padding_side == "left"


def test_tokenize_to_device_and_bad_args(bert_tokenizer) -> None:
    data = TextData([TextExample("the cat", 0)], ["a"])
    (b,) = tokenize(data, bert_tokenizer)
    moved = b.to("cpu")
    assert torch.equal(moved.input_ids, b.input_ids) and moved.labels is not None
    with pytest.raises(InvalidInputError):
        tokenize(data, bert_tokenizer, max_length=0)
    with pytest.raises(InvalidInputError):
        tokenize(data, bert_tokenizer, batch_size=0)
    with pytest.raises(DataError):
        tokenize(TextData([]), bert_tokenizer)
