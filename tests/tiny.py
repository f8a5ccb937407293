"""Tiny real transformers models and data files for tests.

Models are built from small configs, saved with ``save_pretrained`` (safetensors) together with a
real tokenizer, and loaded back through the same path users use (``search.tasks.load_model``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "good great fine happy love excellent superb nice bright warm "
    "bad awful poor sad hate terrible boring dull dark cold "
    "the a movie film story plot actor scene music ending it was is very quite rather not"
).split()
POSITIVE = set(WORDS[:10])
NEGATIVE = set(WORDS[10:20])

ARCHS = ("bert", "roberta", "distilbert", "llama", "gpt2")


def write_wordpiece_tokenizer(folder: Path) -> None:
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast.from_pretrained(str(folder))
    tok.save_pretrained(str(folder))


def write_wordlevel_tokenizer(folder: Path, *, with_pad: bool = False) -> None:
    """A causal-LM style tokenizer (eos, no pad by default), built offline from a word-level model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"pad_token": "<eos>"} if with_pad else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", **kwargs)
    fast.save_pretrained(str(folder))


def vocab_size() -> int:
    return len(WORDS) + 5


def build_model(folder: Path, arch: str = "bert", *, task: str = "sequence_classification", layers: int = 2,
                hidden: int = 32, heads: int = 4, intermediate: int = 64, num_labels: int = 2, seed: int = 0,
                tie_embeddings: bool | None = None) -> Path:
    """Build a tiny model of ``arch`` for ``task``, save it with its tokenizer into ``folder``.

    ``task``: ``sequence_classification``, ``token_classification`` (``num_labels`` tags),
    ``regression`` (one output, ``problem_type="regression"``), ``causal_lm``, or anything else
    for the base model. ``arch="t5"`` builds an encoder-decoder (``T5ForConditionalGeneration``).
    ``tie_embeddings`` sets ``tie_word_embeddings`` (None: the architecture's default; GPT-2 ties)."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    v = vocab_size()
    if arch == "bert":
        cfg = T.BertConfig(vocab_size=v, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=intermediate, max_position_embeddings=64, num_labels=num_labels)
    elif arch == "roberta":
        cfg = T.RobertaConfig(vocab_size=v, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                              intermediate_size=intermediate, max_position_embeddings=80, num_labels=num_labels,
                              pad_token_id=0, bos_token_id=2, eos_token_id=3)
    elif arch == "distilbert":
        cfg = T.DistilBertConfig(vocab_size=v, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=intermediate,
                                 max_position_embeddings=64, num_labels=num_labels)
    elif arch == "llama":
        cfg = T.LlamaConfig(vocab_size=v, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=max(1, heads // 2), intermediate_size=intermediate,
                            max_position_embeddings=64, bos_token_id=1, eos_token_id=1, pad_token_id=1,
                            num_labels=num_labels)
    elif arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=v, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=intermediate,
                           n_positions=64, bos_token_id=1, eos_token_id=1, pad_token_id=1, num_labels=num_labels)
    elif arch == "t5":
        cfg = T.T5Config(vocab_size=v, d_model=hidden, d_kv=hidden // heads, d_ff=intermediate, num_layers=layers,
                         num_decoder_layers=layers, num_heads=heads, pad_token_id=0, eos_token_id=3,
                         decoder_start_token_id=0)
        model_t5 = T.T5ForConditionalGeneration(cfg)
        folder.mkdir(parents=True, exist_ok=True)
        model_t5.save_pretrained(str(folder))
        write_wordpiece_tokenizer(folder)
        return folder
    else:  # pragma: no cover
        raise ValueError(arch)
    if tie_embeddings is not None:
        cfg.tie_word_embeddings = tie_embeddings
    if task == "regression":
        cfg.num_labels = 1
        cfg.problem_type = "regression"
        cls = T.AutoModelForSequenceClassification
    elif task == "token_classification":
        cls = T.AutoModelForTokenClassification
    elif task == "sequence_classification":
        cls = T.AutoModelForSequenceClassification
    elif task == "causal_lm":
        cls = T.AutoModelForCausalLM
    else:
        cls = T.AutoModel
    model = cls.from_config(cfg, attn_implementation="eager")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    if arch in ("llama", "gpt2"):
        write_wordlevel_tokenizer(folder)
    else:
        write_wordpiece_tokenizer(folder)
    return folder


def sentiment_rows(n: int, *, seed: int = 0) -> list[dict[str, object]]:
    """Synthetic sentiment: the label is whether positive words outnumber negative ones."""
    rng = random.Random(seed)
    pos, neg, filler = sorted(POSITIVE), sorted(NEGATIVE), WORDS[20:]
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(filler) for _ in range(rng.randint(3, 6))]
        words += [rng.choice(pos if label else neg) for _ in range(rng.randint(1, 3))]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "positive" if label else "negative"})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_classifier(folder: Path, rows: list[dict[str, object]], *, steps: int = 40, lr: float = 1e-3, seed: int = 0) -> Path:
    """Fine-tune the saved tiny classifier on ``rows`` for a few steps so accuracy means something; save it back."""
    import torch

    from search.data import TextData, TextExample, tokenize
    from search.tasks import load_model

    torch.manual_seed(seed)
    names = sorted({str(r["label"]) for r in rows})
    lm = load_model(folder, "sequence_classification", num_labels=len(names), label_names=names)
    data = TextData([TextExample(str(r["text"]), names.index(str(r["label"]))) for r in rows], names)
    batches = tokenize(data, lm.tokenizer, max_length=16, batch_size=16)
    model = lm.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        b = batches[step % len(batches)]
        loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(folder))
    lm.tokenizer.save_pretrained(str(folder))
    return folder


TAGS = ("O", "POS", "NEG")


def tagged_rows(n: int, *, seed: int = 0) -> list[dict[str, object]]:
    """Synthetic token classification: every word tagged POS (a positive word), NEG or O; the last
    word of some rows is left unscored (tag -100)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
        tags: list[object] = ["POS" if w in POSITIVE else "NEG" if w in NEGATIVE else "O" for w in words]
        if i % 5 == 0:
            tags[-1] = -100
        rows.append({"tokens": words, "tags": tags})
    return rows


def scored_rows(n: int, *, seed: int = 0) -> list[dict[str, object]]:
    """Synthetic regression: the score is (positive - negative words) / 2 plus a little noise."""
    rng = random.Random(seed)
    pos, neg, filler = sorted(POSITIVE), sorted(NEGATIVE), WORDS[20:]
    rows = []
    for _ in range(n):
        n_pos, n_neg = rng.randint(0, 3), rng.randint(0, 3)
        words = [rng.choice(filler) for _ in range(rng.randint(2, 4))]
        words += [rng.choice(pos) for _ in range(n_pos)] + [rng.choice(neg) for _ in range(n_neg)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "score": round((n_pos - n_neg) / 2 + rng.gauss(0, 0.05), 3)})
    return rows


def train_model(folder: Path, task: str, rows: list[dict[str, object]], *, steps: int = 40, lr: float = 2e-3,
                seed: int = 0, label_field: str = "score") -> Path:
    """Fine-tune a saved tiny token classifier (``tagged_rows``) or regressor (``scored_rows``) for a
    few steps, through the data path users use; save it back."""
    import torch

    from search.data import load_text_data, load_token_data, tokenize
    from search.tasks import load_model, task_loss

    torch.manual_seed(seed)
    data_file = write_jsonl(folder / "train.jsonl", rows)
    if task == "token_classification":
        data = load_token_data(data_file, tag_names=list(TAGS))
        lm = load_model(folder, task, num_labels=len(TAGS), label_names=list(TAGS))
    else:
        data = load_text_data(data_file, label_field=label_field, numeric_labels=True)
        lm = load_model(folder, task)
    data_file.unlink()
    batches = tokenize(data, lm.tokenizer, max_length=16, batch_size=16)
    model = lm.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        b = batches[step % len(batches)]
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
        total, count = task_loss(out, b, task)
        loss = total / count
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(folder))
    lm.tokenizer.save_pretrained(str(folder))
    return folder


def build_tagger(folder: Path, *, steps: int = 12) -> Path:
    """A tiny BertForTokenClassification with the tags :data:`TAGS` in its config, trained a few steps."""
    folder = build_model(folder, "bert", task="token_classification", num_labels=len(TAGS))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["id2label"] = dict(enumerate(TAGS))
    cfg["label2id"] = {t: i for i, t in enumerate(TAGS)}
    (folder / "config.json").write_text(json.dumps(cfg))
    return train_model(folder, "token_classification", tagged_rows(160, seed=3), steps=steps)


def build_regressor(folder: Path, *, steps: int = 30) -> Path:
    """A tiny one-output regression BertForSequenceClassification, trained a few steps on :func:`scored_rows`."""
    folder = build_model(folder, "bert", task="regression")
    return train_model(folder, "regression", scored_rows(160, seed=3), steps=steps)
