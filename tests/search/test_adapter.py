"""The model adapter on real tiny transformers models of five families."""

from __future__ import annotations

import pytest
import torch

from search import quant
from search.adapter import ModelAdapter
from search.errors import InvalidInputError
from search.space import BitOption, PrecisionMap
from search.tasks import load_model
from tests.tiny import build_model

FAMILIES = [
    ("bert", "sequence_classification"),
    ("roberta", "sequence_classification"),
    ("distilbert", "sequence_classification"),
    ("llama", "causal_lm"),
    ("gpt2", "causal_lm"),
]


@pytest.fixture(scope="module", params=FAMILIES, ids=[f[0] for f in FAMILIES])
def loaded(request, tmp_path_factory):
    arch, task = request.param
    folder = build_model(tmp_path_factory.mktemp(arch), arch, task=task)
    return arch, load_model(folder, task, num_labels=2)


def test_blocks_and_matrices_found_without_head_or_embeddings(loaded):
    arch, lm = loaded
    ad = ModelAdapter(lm.model)
    assert len(ad.blocks) == 2
    assert all(info.role == "block" for info in ad.matrices.values())
    assert len(ad.matrices) == (4 if arch == "gpt2" else 7 if arch == "llama" else 6) * 2
    with_head = ModelAdapter(lm.model, include_head=True)
    heads = [n for n, i in with_head.matrices.items() if i.role == "head"]
    assert heads, "the task head / lm_head must be selectable"
    emb = ModelAdapter(lm.model, include_embeddings=True)
    assert any(i.role == "embedding" for i in emb.matrices.values())


def test_weight_view_is_out_in_layout_and_writes_through(loaded):
    arch, lm = loaded
    ad = ModelAdapter(lm.model)
    for name, info in ad.matrices.items():
        w = ad.weight(name)
        assert tuple(w.shape) == info.shape
    name = next(iter(ad.matrices))
    saved = ad.snapshot([name])
    with torch.no_grad():
        ad.weight(name)[0, 0] = 123.0
        assert float(ad.module(name).weight.flatten()[0]) == 123.0
    ad.restore(saved)


@pytest.mark.parametrize("memory_bytes", [0, None], ids=["spilled", "in-memory"])
def test_snapshot_restores_every_weight_and_bias_exactly(loaded, memory_bytes):
    arch, lm = loaded
    ad = ModelAdapter(lm.model)
    names = list(ad.matrices)
    before = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    saved = ad.snapshot(names, memory_bytes=memory_bytes)
    if memory_bytes == 0:
        assert saved.store.resident_bytes == 0 and saved.store.spilled_bytes > 0  # on disk, not in memory
    with torch.no_grad():
        for n in names:
            ad.module(n).weight.mul_(-3.0).add_(1.0)
            b = ad.bias(n)
            if b is not None:
                b.add_(7.0)
    ad.restore(saved)
    after = lm.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_group_granularity_recognises_heads_and_ffn(loaded):
    arch, lm = loaded
    ad = ModelAdapter(lm.model)
    space = ad.build_space(granularity="group", bits=(0, 2, 4, 8), ffn_block_size=32)
    kinds = [g.kind for g in space.groups]
    heads_per_block = 2 if arch == "llama" else 4  # llama: one group per key/value head (GQA)
    assert kinds.count("head") == 2 * heads_per_block
    assert kinds.count("ffn") == 2 * 2  # intermediate 64 / block 32
    assert "layer" not in kinds
    # every weight of every selected matrix belongs to exactly one group
    covered = {n: torch.zeros(i.shape, dtype=torch.int32) for n, i in ad.matrices.items()}
    for g in space.groups:
        for m in g.members:
            c = covered[m.module]
            if m.axis == "out":
                c[m.start : m.stop] += 1
            elif m.axis == "in":
                c[:, m.start : m.stop] += 1
            else:
                c += 1
    # q/k/v/up rows are covered once by their group; o/down columns once: each weight exactly once
    for name, c in covered.items():
        assert torch.all(c == 1), name
    # pruning is offered to sub-layer groups only, never to whole layers
    layer_space = ad.build_space(granularity="layer", bits=(0, 2, 4))
    assert all(not any(o.pruned for o in opts) for opts in layer_space.options)
    assert all(any(o.pruned for o in opts) for opts in space.options)


def test_pruned_head_contributes_exactly_nothing(loaded):
    arch, lm = loaded
    model = lm.model
    ad = ModelAdapter(model)
    space = ad.build_space(granularity="group", bits=(0, 8))
    g = next(g for g in space.groups if g.kind == "head")
    # pruning a head must equal removing it: zero its output-projection columns only (the head's output)
    # and compare against the model where the whole group is zeroed
    ids = torch.randint(5, 30, (3, 7))
    mask = torch.ones_like(ids)
    pmap = PrecisionMap({g.name: BitOption(0)})
    with ad.quantized(pmap, space):
        out_pruned = model(input_ids=ids, attention_mask=mask).logits
        # the head's q/k/v rows and output columns are all zero
        for m in g.members:
            assert torch.count_nonzero(ad.member_slice(m)) == 0
    o_member = next(m for m in g.members if m.axis == "in")
    saved = ad.snapshot([o_member.module])
    with torch.no_grad():
        ad.member_slice(o_member).zero_()
    out_cut = model(input_ids=ids, attention_mask=mask).logits
    ad.restore(saved)
    torch.testing.assert_close(out_pruned, out_cut, rtol=0, atol=1e-6)
    out_full = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(out_full, out_pruned)


def test_quantized_context_restores_exactly(loaded):
    arch, lm = loaded
    ad = ModelAdapter(lm.model)
    space = ad.build_space(granularity="group", bits=(0, 2, 3, 4))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    pmap = PrecisionMap({g.name: opts[i % len(opts)] for i, (g, opts) in enumerate(zip(space.groups, space.options, strict=True))})
    with ad.quantized(pmap, space):
        changed = any(not torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
        assert changed
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def test_include_exclude_patterns(loaded):
    arch, lm = loaded
    ad = ModelAdapter(lm.model, include=["*.0.*"])
    assert all(i.block == 0 for i in ad.matrices.values())
    ad2 = ModelAdapter(lm.model, exclude=["*.1.*"])
    assert set(ad2.matrices) == set(ad.matrices)
    with pytest.raises(InvalidInputError) as e:
        ModelAdapter(lm.model, include=["nothing.matches"])
    assert e.value.field == "include"
    with pytest.raises(InvalidInputError) as e:  # the include patterns select some, the exclude ones remove all
        ModelAdapter(lm.model, include=["*.0.*"], exclude=["*.0.*.*", "*.0.*"])
    assert e.value.field == "exclude" and f"all {len(ad.matrices)} matrices" in e.value.message


def test_tied_lm_head_is_not_selected_twice(tmp_path):
    folder = build_model(tmp_path / "gpt2", "gpt2", task="causal_lm")
    lm = load_model(folder, "causal_lm")
    ad = ModelAdapter(lm.model, include_head=True, include_embeddings=True)
    ptrs = [ad.module(n).weight.data_ptr() for n in ad.matrices]
    assert len(ptrs) == len(set(ptrs))


def test_unrecognised_structure_falls_back_to_layers(tmp_path, caplog):
    folder = build_model(tmp_path / "bert", "bert")
    lm = load_model(folder, "sequence_classification", num_labels=2)
    lm.model.config.num_attention_heads = 5  # the shapes no longer fit the config
    space = ModelAdapter(lm.model).build_space(granularity="group")
    assert {g.kind for g in space.groups} == {"layer"}
    assert "not recognised" in caplog.text


def test_cached_scales_give_fake_quantize_exactly_and_never_go_stale(loaded, monkeypatch):
    arch, lm = loaded
    ad = ModelAdapter(lm.model)
    space = ad.build_space(granularity="group", bits=(0, 2, 4, "4a", 8, 16), ffn_block_size=32)
    cells = [(m, o) for g, opts in zip(space.groups, space.options, strict=True) for o in opts if not o.unchanged
             for m in g.members]
    want = [quant.fake_quantize(ad.member_slice(m).detach(), o.bits, symmetric=o.symmetric, clip="mse",
                                group_size=o.group_size) for m, o in cells]
    calls: list[int] = []
    real = quant.choose_qparams
    monkeypatch.setattr(quant, "choose_qparams", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(3):
        for (m, o), w in zip(cells, want, strict=True):
            assert torch.equal(ad.fake_quantized(m, o, "mse"), w), (m, o.key())
    assert len(calls) == sum(1 for _, o in cells if o.is_integer)  # once per slice and option, not per call
    m, o = next((m, o) for m, o in cells if o.key() == "4")
    before = ad.fake_quantized(m, o, "mse")
    saved = ad.snapshot([m.module])
    with torch.no_grad():
        ad.member_slice(m).mul_(2.0)  # the weights change: the scales are chosen again
    calls.clear()
    got = ad.fake_quantized(m, o, "mse")
    assert len(calls) == 1
    assert torch.equal(got, quant.fake_quantize(ad.member_slice(m).detach(), 4, clip="mse"))
    assert not torch.equal(got, before)
    ad.restore(saved)
    assert torch.equal(ad.fake_quantized(m, o, "mse"), before)
