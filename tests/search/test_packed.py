"""Packed modules (``search.export.packed``): a map or an artifact applied with the integer codes kept
in memory gives outputs bit-identical to the search's fake-quantized model, on real tiny models of
every kind of matrix (Linear, GPT-2's Conv1D, Embedding, tied weights), every kind of option, both
granularities; the float weights are gone and the packed bytes are the cost model's."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from search import tensor_train as tt
from search.adapter import ModelAdapter
from search.cost import weight_bytes
from search.errors import InvalidInputError
from search.export import apply_precision_map, export_artifact, load_artifact
from search.export.packed import (
    PackedConv1D,
    PackedEmbedding,
    PackedLinear,
    PackedWeight,
    address_offset,
    maps_a_file,
    model_bytes,
    packed_bytes,
)
from search.space import BitOption, PrecisionMap, SearchSpace
from search.tasks import load_model
from tests.tiny import build_model, vocab_size

#: Every kind of option: pruned, 2/3/4/8 bits symmetric and not, group-wise scales, 16, 32.
OPTIONS = (0, 2, 3, 4, 8, 16, "2a", "3a", "4a", "8a", "4g16", "3ag16", "8g16")
GROUP_CYCLE = ["0", "2", "3a", "4g16", "8", "16", "32", "2a", "3", "4a", "8a", "3ag16", "4", "8g16"]
LAYER_CYCLE = [o for o in GROUP_CYCLE if o != "0"]

MODELS = {
    # name: (arch, task, adapter selection, tie_embeddings)
    "bert": ("bert", "sequence_classification", {"include_embeddings": True}, None),
    "gpt2-tied": ("gpt2", "causal_lm", {"include_embeddings": True}, None),  # wte is lm_head's weight
    "llama-tied-head": ("llama", "causal_lm", {"include_head": True}, True),  # lm_head is embed_tokens'
}


def mixed_map(space: SearchSpace) -> PrecisionMap:
    """A map cycling through every option each group allows, keeping head 0 of each block unpruned."""
    cycle = GROUP_CYCLE if space.granularity == "group" else LAYER_CYCLE
    chosen = {}
    for i, (g, allowed) in enumerate(zip(space.groups, space.options, strict=True)):
        opt = BitOption.parse(cycle[i % len(cycle)])
        if (g.kind == "head" and g.index == 0 and opt.pruned) or opt not in allowed:
            opt = BitOption(4)
        chosen[g.name] = opt
    ffn = [g.name for g in space.groups if g.kind == "ffn"]
    if ffn and not any(o.pruned for o in chosen.values()):
        chosen[ffn[-1]] = BitOption(0)
    return PrecisionMap(chosen)


@pytest.fixture(scope="module", params=list(MODELS))
def tiny(request, tmp_path_factory):
    arch, task, selection, tie = MODELS[request.param]
    folder = build_model(
        tmp_path_factory.mktemp(f"packed-{request.param}") / "model", arch, task=task, hidden=32, heads=4,
        intermediate=64, tie_embeddings=tie,
    )
    ids = torch.randint(4, vocab_size(), (2, 12), generator=torch.Generator().manual_seed(0))
    return types.SimpleNamespace(name=request.param, folder=folder, task=task, selection=selection, ids=ids)


def fresh(tiny) -> nn.Module:
    return load_model(tiny.folder, tiny.task, num_labels=2).model.eval()


def space_of(model: nn.Module, tiny, granularity: str) -> SearchSpace:
    return ModelAdapter(model, **tiny.selection).build_space(
        granularity=granularity, bits=OPTIONS, ffn_block_size=16, strict=False
    )


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def searched(tiny, space: SearchSpace, pmap: PrecisionMap) -> torch.Tensor:
    """The logits of the model the search evaluates for ``pmap``."""
    model = fresh(tiny)
    with ModelAdapter(model).quantized(pmap, space):
        return logits(model, tiny.ids)


def float_weight_bytes(model: nn.Module, names: list[str]) -> int:
    seen = {}
    for n in names:
        w = model.get_submodule(n).weight
        seen[id(w)] = w.numel() * w.element_size()
    return sum(seen.values())


@pytest.mark.parametrize("granularity", ["layer", "group"])
def test_packed_map_and_packed_artifact_are_bit_identical_to_the_search(tiny, granularity, tmp_path):
    model = fresh(tiny)
    space = space_of(model, tiny, granularity)
    pmap = mixed_map(space)
    kinds = {o.key() for o in pmap.values()}
    assert {"2", "3a", "4g16", "8", "16", "32"} <= kinds and (granularity == "layer" or "0" in kinds), kinds
    if granularity == "group":  # members of one matrix at different widths
        by_module: dict[str, set[str]] = {}
        for g in space.groups:
            for m in g.modules:
                by_module.setdefault(m, set()).add(pmap[g.name].key())
        assert max(len(v) for v in by_module.values()) >= 3
    want = searched(tiny, space, pmap)
    before = model_bytes(model)
    quantized = [n for n in dict.fromkeys(m.module for g in space.groups for m in g.members)]

    assert any(maps_a_file(m) for m in model.modules())  # from_pretrained maps the checkpoint
    offsets = {n: address_offset(t) for n, t in model.named_parameters(remove_duplicate=False)}
    assert any(offsets.values())  # weights off the 64-byte boundaries torch allocates on
    one = tiny.ids[:, :1]  # one-row products (as in token-by-token decoding) take other BLAS kernels
    with ModelAdapter(fresh_one := fresh(tiny)).quantized(pmap, space):
        want_one = logits(fresh_one, one)
    packed = apply_precision_map(model, pmap, space=space, materialize=False)
    assert torch.equal(logits(packed, tiny.ids), want) and torch.equal(logits(packed, one), want_one)
    # the mapping, which held the float matrices packed away, is released: nothing of the model is in it
    assert all(t.untyped_storage().resizable() for t in (*packed.parameters(), *packed.buffers()))
    kept = dict(packed.named_parameters())
    assert kept and all(address_offset(t) == offsets[n] for n, t in kept.items())  # copied at the same offsets
    modules = dict(packed.named_modules())
    changed = [n for n in quantized if not all(pmap[g.name].unchanged for g in space.groups if n in g.modules)]
    kinds_seen = {type(modules[n]) for n in changed}
    assert kinds_seen == {  # and the tied holders: GPT-2's lm_head, Llama's embed_tokens
        "bert": {PackedLinear, PackedEmbedding},
        "gpt2-tied": {PackedConv1D, PackedEmbedding},
        "llama-tied-head": {PackedLinear},
    }[tiny.name]
    assert {type(m) for m in packed.modules()} >= {PackedLinear, PackedEmbedding}
    # the matrices are built where the float weights were, off a 64-byte boundary
    assert all(address_offset(modules[n].weight) == offsets[f"{n}.weight"] for n in changed)
    # The float weights are gone: what is left is the model minus them plus the packed bytes, which are
    # exactly the cost model's bytes of every group in a packed matrix.
    packed_names = [n for n in quantized if isinstance(modules[n], PackedLinear | PackedConv1D | PackedEmbedding)]
    fresh_model = fresh(tiny)
    assert model_bytes(packed) == before - float_weight_bytes(fresh_model, packed_names) + packed_bytes(packed)
    want_bytes = sum(weight_bytes(g, pmap[g.name]) for g in space.groups if g.members[0].module in packed_names)
    assert packed_bytes(packed) == want_bytes
    assert model_bytes(packed) < before

    # The artifact: packed modules straight from the file's codes, the same outputs.
    export_artifact(fresh_model, space, pmap, tmp_path / "art")
    loaded = load_artifact(tmp_path / "art", fresh(tiny), materialize=False)
    assert torch.equal(logits(loaded, tiny.ids), want)
    assert packed_bytes(loaded) == want_bytes and model_bytes(loaded) == model_bytes(packed)
    assert torch.equal(logits(load_artifact(tmp_path / "art", fresh(tiny)), tiny.ids), want)  # floats, as before


def test_tied_weights_stay_tied_and_stored_once(tiny):
    if tiny.name == "bert":
        pytest.skip("BERT's classifier has no tied weights")
    model = fresh(tiny)
    space = space_of(model, tiny, "layer")
    pmap = space.uniform(BitOption(4))
    want = searched(tiny, space, pmap)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert out_emb.weight is in_emb.weight
    apply_precision_map(model, pmap, space=space, materialize=False)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, PackedLinear) and isinstance(emb, PackedEmbedding) and head.packed is emb.packed
    assert sum(isinstance(m, PackedWeight) for m in model.modules()) == len(space.groups)  # the shared one once
    assert torch.equal(logits(model, tiny.ids), want)


def test_hooks_move_casts_keep_codes_and_a_packed_model_is_refused(tiny):
    model = fresh(tiny)
    space = space_of(model, tiny, "layer")
    pmap = mixed_map(space)
    name = space.groups[0].members[0].module
    seen = []
    model.get_submodule(name).register_forward_hook(lambda mod, args, out: seen.append(type(mod).__name__))
    want = searched(tiny, space, pmap)
    apply_precision_map(model, pmap, space=space, materialize=False)
    assert torch.equal(logits(model, tiny.ids), want)
    assert seen == [type(model.get_submodule(name)).__name__] and seen[0].startswith("Packed")
    # a cast changes the dtype the weights come out in, not the stored codes and float16 scales
    dtypes = {k: v.dtype for k, v in model.state_dict().items() if ".packed." in k}
    model.double()
    assert {k: v.dtype for k, v in model.state_dict().items() if ".packed." in k} == dtypes
    assert any(d == torch.float16 for k, d in dtypes.items() if k.endswith("_scale"))
    floats = apply_precision_map(fresh(tiny), pmap, space=space).double()  # the float model, cast the same way
    assert torch.equal(logits(model, tiny.ids), logits(floats, tiny.ids))
    with pytest.raises(InvalidInputError) as e:
        apply_precision_map(model, pmap, space=space)
    assert e.value.field == "model" and "packed" in e.value.message


def test_tensor_train_groups_keep_their_tt_modules_next_to_packed_ones(tmp_path):
    folder = build_model(tmp_path / "bert", "bert", hidden=32, heads=4, intermediate=64)
    model = load_model(folder, "sequence_classification", num_labels=2).model.eval()
    space = ModelAdapter(model).build_space(bits=(4, 8), tt_ranks=(2,))
    tt_opt = next(o for o in space.options[0] if o.is_tt)
    pmap = PrecisionMap({g.name: (tt_opt if i % 3 == 0 else BitOption(4)) for i, g in enumerate(space.groups)})
    ids = torch.randint(4, vocab_size(), (2, 10), generator=torch.Generator().manual_seed(1))
    with ModelAdapter(model).quantized(pmap, space):
        want = logits(model, ids)
    apply_precision_map(model, pmap, space=space, materialize=False)
    for i, g in enumerate(space.groups):
        kind = tt.TTLinear if i % 3 == 0 else PackedLinear
        assert isinstance(model.get_submodule(g.name), kind), g.name
    assert torch.equal(logits(model, ids), want)


def test_bitscout_apply_keeps_packed_modules_unless_asked_to_materialize(tiny, tmp_path):
    import bitscout

    model = fresh(tiny)
    space = space_of(model, tiny, "group")
    pmap = mixed_map(space)
    want = searched(tiny, space, pmap)
    export_artifact(model, space, pmap, tmp_path / "art")
    for source in (pmap.to_dict(), tmp_path / "art"):
        kwargs = {"space": space} if isinstance(source, dict) else {}
        packed = bitscout.apply(fresh(tiny), source, **kwargs)
        assert any(isinstance(m, PackedWeight) for m in packed.modules())
        assert torch.equal(logits(packed, tiny.ids), want)
        floats = bitscout.apply(fresh(tiny), source, materialize=True, **kwargs)
        assert not any(isinstance(m, PackedWeight) for m in floats.modules())
        assert torch.equal(logits(floats, tiny.ids), want)


def test_an_embedding_lookup_dequantizes_the_rows_it_reads(tmp_path):
    folder = build_model(tmp_path / "bert", "bert", hidden=36, heads=4, intermediate=64)
    model = load_model(folder, "sequence_classification", num_labels=2).model.eval()
    space = ModelAdapter(model, include_embeddings=True).build_space(bits=(3, "4ag4"))
    ids = torch.randint(0, vocab_size(), (3, 7), generator=torch.Generator().manual_seed(2))
    for option in ("3", "4ag4"):  # 36 columns: 3-bit rows end mid-byte, 4-bit rows on a byte
        pmap = space.uniform(BitOption.parse(option, symmetric=False))
        with ModelAdapter(model).quantized(pmap, space):
            want = logits(model, ids)
        packed = apply_precision_map(load_model(folder, "sequence_classification", num_labels=2).model.eval(),
                                     pmap, space=space, materialize=False)
        emb = packed.bert.embeddings.word_embeddings
        assert isinstance(emb, PackedEmbedding) and emb.packed.can_gather() == (option == "4ag4")
        assert torch.equal(emb(ids), emb.packed.materialize()[ids])
        assert torch.equal(logits(packed, ids), want)
        with pytest.raises(IndexError):
            emb(torch.tensor([[-1]]))
