"""The eager-attention switch on real tiny transformers models: switched inside, restored outside
(also after an error), what it records, and models that cannot be switched."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from torch import nn

from search.attention import attn_implementation, eager_attention
from tests.tiny import build_model


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("attn") / "bert", "bert", layers=1, hidden=16, heads=2, intermediate=32)


def _load(folder, impl: str) -> nn.Module:
    model = T.AutoModelForSequenceClassification.from_pretrained(str(folder), attn_implementation=impl)
    assert attn_implementation(model) == impl
    return model.eval()


def _attentions(model: nn.Module):
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True).attentions


def test_switches_every_model_and_restores_each_to_its_own(bert_dir):
    sdpa, eager = _load(bert_dir, "sdpa"), _load(bert_dir, "eager")
    with eager_attention([sdpa, eager]) as sw:
        assert attn_implementation(sdpa) == "eager" and attn_implementation(eager) == "eager"
        assert sw.original == ("sdpa", "eager")
        assert sw.eager == (True, True) and sw.ok
        assert sw.switched == (True, False) and sw.switched_to_eager
        maps = _attentions(sdpa)
        assert maps is not None and all(isinstance(a, torch.Tensor) for a in maps)
        assert maps[0].shape == (1, 2, 5, 5)
        torch.testing.assert_close(maps[0].sum(-1), torch.ones(1, 2, 5), rtol=0, atol=1e-6)
    assert attn_implementation(sdpa) == "sdpa" and attn_implementation(eager) == "eager"


def test_an_eager_model_is_left_alone(bert_dir):
    eager = _load(bert_dir, "eager")
    with eager_attention([eager]) as sw:
        assert sw.ok and not sw.switched_to_eager and sw.switched == (False,)
    assert attn_implementation(eager) == "eager"


def test_restored_after_an_error_inside(bert_dir):
    sdpa = _load(bert_dir, "sdpa")
    with pytest.raises(RuntimeError, match="inside"), eager_attention([sdpa]):
        assert attn_implementation(sdpa) == "eager"
        raise RuntimeError("inside")
    assert attn_implementation(sdpa) == "sdpa"


def test_models_that_cannot_be_switched_are_reported_not_changed(bert_dir, monkeypatch):
    refusing = _load(bert_dir, "sdpa")

    def refuse(*args, **kwargs):
        raise ValueError("this model cannot use eager attention")

    monkeypatch.setattr(refusing, "set_attn_implementation", refuse)
    plain = nn.Linear(3, 3)  # no transformers config at all
    switchable = _load(bert_dir, "sdpa")
    with eager_attention([refusing, plain, switchable]) as sw:
        assert sw.original == ("sdpa", None, "sdpa")
        assert sw.eager == (False, False, True) and not sw.ok
        assert sw.switched == (False, False, True) and sw.switched_to_eager
        assert attn_implementation(refusing) == "sdpa"
    assert attn_implementation(switchable) == "sdpa" and attn_implementation(refusing) == "sdpa"


def test_no_models_is_a_no_op():
    with eager_attention([]) as sw:
        assert sw.ok and not sw.switched_to_eager and sw.original == ()
