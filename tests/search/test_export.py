"""Quantized artifacts: bit-exact round trips on real tiny models, sizes against the cost model, bad
artifacts, applying maps, the torchao mapping and the ``bitscout export`` command."""

from __future__ import annotations

import copy
import json
import pickle
import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from search.adapter import ModelAdapter
from search.cost import CostModel, weight_bytes
from search.data import TextData, TextExample, tokenize
from search.errors import InvalidInputError, SearchError
from search.export import (
    ARTIFACT_FILE,
    PRECISION_MAP_FILE,
    TorchaoConfig,
    apply_precision_map,
    artifact_info,
    export_artifact,
    load_artifact,
    to_torchao_config,
    torchao_unsupported,
)
from search.export import artifact as ex
from search.export_cli import export_main
from search.result import ParetoPoint, SearchResult
from search.space import BitOption, PrecisionMap, SearchSpace, space_to_dict
from search.tasks import evaluate, load_model, reference_outputs
from tests.tiny import build_model, sentiment_rows

ARCHS = {"bert": "sequence_classification", "gpt2": "causal_lm"}
#: Every kind of option a map can hold: pruned, 2..8 bits (symmetric and not), 16, 32.
GROUP_CYCLE = ["0", "2", "3a", "4", "8", "16", "32", "2a", "3", "4a", "8a", "0"]
LAYER_CYCLE = [o for o in GROUP_CYCLE if o != "0"]
FFN_BLOCK = 16


def mixed_map(space: SearchSpace) -> PrecisionMap:
    """A map cycling through every option, keeping one head of each block unpruned."""
    cycle = GROUP_CYCLE if space.granularity == "group" else LAYER_CYCLE
    chosen = {}
    for i, g in enumerate(space.groups):
        opt = BitOption.parse(cycle[i % len(cycle)])
        if g.kind == "head" and g.index == 0 and opt.pruned:
            opt = BitOption(4)
        chosen[g.name] = opt
    return PrecisionMap(chosen)


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request, tmp_path_factory):
    arch = request.param
    task = ARCHS[arch]
    folder = build_model(tmp_path_factory.mktemp(f"export-{arch}") / "model", arch, task=task, intermediate=64)
    lm = load_model(folder, task, num_labels=2)
    rows = sentiment_rows(24, seed=3)
    names = sorted({str(r["label"]) for r in rows})
    data = TextData([TextExample(str(r["text"]), names.index(str(r["label"]))) for r in rows], names)
    batches = tokenize(data, lm.tokenizer, max_length=16, batch_size=8)
    return types.SimpleNamespace(arch=arch, task=task, folder=folder, lm=lm, batches=batches)


def fresh(tiny):
    return load_model(tiny.folder, tiny.task, num_labels=2).model


def space_of(model, granularity: str, **kw) -> SearchSpace:
    return ModelAdapter(model, **kw).build_space(
        granularity=granularity, bits=(0, 2, 3, 4, 8, 16, "2a", "3a", "4a", "8a"), ffn_block_size=FFN_BLOCK
    )


# ------------------------------------------------------------------------------- bit-exact round trips


@pytest.mark.parametrize("granularity", ["layer", "group"])
def test_export_load_is_bit_identical_and_gives_identical_metrics(tiny, granularity, tmp_path):
    model = tiny.lm.model
    space = space_of(model, granularity)
    pmap = mixed_map(space)
    kinds = {o.key() for o in pmap.values()}
    assert {"2", "3a", "4", "8", "16", "32"} <= kinds and (granularity == "layer" or "0" in kinds)
    adapter = ModelAdapter(model)
    ref = reference_outputs(model, tiny.batches, tiny.task)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with adapter.quantized(pmap, space) as q:
        want_state = {k: v.clone() for k, v in q.state_dict().items()}
        want_out = [q(**b.model_inputs()).logits for b in tiny.batches]
        want_metrics = evaluate(q, tiny.batches, tiny.task, reference=ref)

    path = export_artifact(
        model, space, pmap, tmp_path / "art", metadata={"metrics": want_metrics}, model_dir=tiny.folder, verify=True
    )
    assert path == tmp_path / "art" / ARTIFACT_FILE
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "export must not change the model"

    loaded = load_artifact(tmp_path / "art", fresh(tiny))
    got_state = loaded.state_dict()
    assert set(got_state) == set(want_state)
    for k, v in want_state.items():
        assert torch.equal(got_state[k], v), k
    with torch.no_grad():
        for b, want in zip(tiny.batches, want_out, strict=True):
            assert torch.equal(loaded(**b.model_inputs()).logits, want)
    assert evaluate(loaded, tiny.batches, tiny.task, reference=ref) == want_metrics

    # The side files: the map alone, the config, the tokenizer; and the metadata reads back.
    assert json.loads((tmp_path / "art" / PRECISION_MAP_FILE).read_text()) == pmap.to_dict()
    assert (tmp_path / "art" / "config.json").is_file() and (tmp_path / "art" / "tokenizer_config.json").is_file()
    info = artifact_info(tmp_path / "art")
    assert info.precision_map == pmap and space_to_dict(info.space) == space_to_dict(space)
    assert info.info == {"metrics": want_metrics}


def test_pruned_groups_and_their_biases_are_zero_and_absent(tiny, tmp_path):
    model = tiny.lm.model
    space = space_of(model, "group")
    pmap = mixed_map(space)
    export_artifact(model, space, pmap, tmp_path)
    tensors = load_file(str(tmp_path / ARTIFACT_FILE))
    pruned = [g for g in space.groups if pmap[g.name].pruned]
    assert pruned
    for g in pruned:
        assert not any(k.startswith(f"quant::{g.name}::") for k in tensors)
    loaded = load_artifact(tmp_path, fresh(tiny))
    ad = ModelAdapter(loaded)
    for g in pruned:
        for m in g.members:
            assert torch.count_nonzero(ad.member_slice(m)) == 0
            b = ad.bias(m.module)
            if b is not None and m.axis == "out":
                assert torch.count_nonzero(b[m.start : m.stop]) == 0


@pytest.mark.parametrize("granularity", ["layer", "group"])
def test_packed_weights_take_exactly_the_bytes_the_cost_model_counts(tiny, granularity, tmp_path):
    model = tiny.lm.model
    space = space_of(model, granularity)
    pmap = mixed_map(space)
    export_artifact(model, space, pmap, tmp_path)
    nbytes: dict[str, int] = {}
    with safe_open(str(tmp_path / ARTIFACT_FILE), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            t = f.get_tensor(k)
            nbytes[k] = t.numel() * t.element_size()
            if k.endswith("::scale"):
                assert t.dtype == torch.float16
    for g in space.groups:
        stored = sum(v for k, v in nbytes.items() if k.startswith(f"quant::{g.name}::"))
        assert stored == weight_bytes(g, pmap[g.name]), g.name
    # The whole file's tensors: the cost model's size, plus the zeroed bias rows of pruned groups that
    # the file keeps inside whole bias vectors (4 bytes each) and the cost model counts as removed.
    cost = CostModel(space).cost(pmap)
    pruned_bias = sum(g.bias_params * 4 for g in space.groups if pmap[g.name].pruned)
    assert sum(nbytes.values()) == cost.size_bytes + pruned_bias


def test_integer_scales_are_float16_and_codes_are_packed_at_their_width(tiny, tmp_path):
    model = tiny.lm.model
    space = space_of(model, "layer")
    pmap = PrecisionMap({g.name: BitOption(3, False) for g in space.groups})
    export_artifact(model, space, pmap, tmp_path)
    tensors = load_file(str(tmp_path / ARTIFACT_FILE))
    g = space.groups[0]
    m = g.members[0]
    codes = tensors[f"quant::{g.name}::0::codes"]
    assert codes.dtype == torch.uint8 and codes.numel() == -(-m.n_params * 3 // 8)
    assert tensors[f"quant::{g.name}::0::scale"].dtype == torch.float16
    assert tensors[f"quant::{g.name}::0::zero_point"].dtype == torch.uint8
    assert f"{m.module}.weight" not in tensors and f"{m.module}.bias" in tensors


def test_verify_catches_an_exporter_that_drifts_from_the_adapter(tiny, tmp_path, monkeypatch):
    model = tiny.lm.model
    space = space_of(model, "layer")
    pmap = space.uniform(4)
    export_artifact(model, space, pmap, tmp_path, verify=True)
    real = ModelAdapter.fake_quantized

    def drifted(self, m, option, clip):
        out = real(self, m, option, clip)
        return out + 1e-3 if option.bits == 4 else out

    monkeypatch.setattr(ModelAdapter, "fake_quantized", drifted)  # the adapter quantizes differently now
    with pytest.raises(SearchError, match="self-check"):
        export_artifact(model, space, pmap, tmp_path / "again", verify=True)
    assert not (tmp_path / "again" / ARTIFACT_FILE).exists()


def test_tied_weights_are_stored_once_and_rebuilt(tmp_path):
    # GPT-2's lm_head is tied to the token embedding: quantize the embedding, the head follows.
    folder = build_model(tmp_path / "gpt2", "gpt2", task="causal_lm")
    model = load_model(folder, "causal_lm").model
    assert model.lm_head.weight is model.transformer.wte.weight
    space = ModelAdapter(model, include_embeddings=True).build_space(bits=(4,))
    pmap = space.uniform(4)
    ids = torch.randint(2, 30, (2, 6))
    with ModelAdapter(model).quantized(pmap, space) as q, torch.no_grad():
        want = q(input_ids=ids).logits
    export_artifact(model, space, pmap, tmp_path / "art")
    meta = artifact_info(tmp_path / "art")
    assert meta.aliases == {"lm_head.weight": "transformer.wte.weight"}
    loaded = load_artifact(tmp_path / "art", load_model(folder, "causal_lm").model)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, want)


# ------------------------------------------------------------------------------------ bad artifacts


@pytest.fixture
def artifact(tiny, tmp_path):
    model = tiny.lm.model
    space = space_of(model, "group")
    pmap = mixed_map(space)
    export_artifact(model, space, pmap, tmp_path / "art")
    return tmp_path / "art" / ARTIFACT_FILE


def rewrite(path: Path, *, meta=None, tensors=None, resign: bool = False) -> None:
    """Rewrite an artifact with edited metadata / tensors (``resign``: recompute the digest)."""
    with safe_open(str(path), framework="pt") as f:
        old_meta = dict(f.metadata())
        old = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    new_meta = meta(old_meta) if meta else old_meta
    if resign:
        new_meta["digest"] = ex._digest(new_meta)
    save_file(tensors(old) if tensors else old, str(path), metadata=new_meta)


def assert_artifact_error(path_or_dir, model, *words: str) -> None:
    with pytest.raises(InvalidInputError) as e:
        load_artifact(path_or_dir, model)
    assert e.value.field == "artifact"
    for w in words:
        assert w in e.value.message, e.value.message


def test_wrong_architecture_is_refused_with_the_shapes(tiny, artifact, tmp_path):
    other = build_model(tmp_path / "wide", tiny.arch, task=tiny.task, hidden=48, intermediate=64)
    assert_artifact_error(artifact, load_model(other, tiny.task, num_labels=2).model, "shape", "architecture")
    deeper = build_model(tmp_path / "deep", tiny.arch, task=tiny.task, layers=3, intermediate=64)
    assert_artifact_error(artifact, load_model(deeper, tiny.task, num_labels=2).model, "lacks")
    base = load_model(tiny.folder, "embeddings").model  # no task head, other names
    assert_artifact_error(artifact, base, "architecture")


def test_tampered_metadata_is_refused(tiny, artifact):
    def bump(meta):
        pm = json.loads(meta["precision_map"])
        name = next(k for k, v in pm.items() if v["bits"] == 4)
        pm[name]["bits"] = 8
        return {**meta, "precision_map": json.dumps(pm)}

    rewrite(artifact, meta=bump)
    assert_artifact_error(artifact, fresh(tiny), "modified")
    rewrite(artifact, meta=bump, resign=True)  # consistent digest, but the codes no longer fit the map
    assert_artifact_error(artifact, fresh(tiny), "expected")


def test_unreadable_metadata_unknown_version_and_plain_checkpoints_are_refused(tiny, artifact, tmp_path):
    rewrite(artifact, meta=lambda m: {**m, "space": "{not json"}, resign=True)
    assert_artifact_error(artifact, fresh(tiny), "'space'", "JSON")
    rewrite(artifact, meta=lambda m: {**m, "space": "{}"}, resign=True)
    assert_artifact_error(artifact, fresh(tiny), "inconsistent")
    rewrite(artifact, meta=lambda m: {**m, "format_version": "2"}, resign=True)
    assert_artifact_error(artifact, fresh(tiny), "format version '2'", "version 1")
    # A plain safetensors checkpoint (the model's own weights) is not an artifact.
    assert_artifact_error(tiny.folder / "model.safetensors", fresh(tiny), "not a bitscout artifact")
    assert_artifact_error(tmp_path / "nowhere", fresh(tiny), "no artifact")


def test_extra_or_missing_tensors_are_refused(tiny, artifact):
    with safe_open(str(artifact), framework="pt") as f:
        meta = dict(f.metadata())
    body = load_file(str(artifact))
    save_file({k: v for k, v in body.items() if not k.endswith("::codes")}, str(artifact), metadata=meta)
    assert_artifact_error(artifact, fresh(tiny), "lacks tensor")
    save_file({**body, "quant::nobody::0::codes": torch.zeros(3, dtype=torch.uint8)}, str(artifact), metadata=meta)
    assert_artifact_error(artifact, fresh(tiny), "does not use")
    scale = next(k for k in body if k.endswith("::scale"))
    save_file({**body, scale: body[scale][:-1]}, str(artifact), metadata=meta)
    assert_artifact_error(artifact, fresh(tiny), scale)


class _Trap:
    """Unpickling this creates a file: the proof that a loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_are_refused_unread(tiny, tmp_path):
    marker = tmp_path / "unpickled"
    art = tmp_path / "pickled"
    art.mkdir()
    torch.save({"trap": _Trap(marker)}, art / ARTIFACT_FILE)  # torch's zip format
    assert_artifact_error(art, fresh(tiny), "pickle", "never loads")
    (art / ARTIFACT_FILE).write_bytes(pickle.dumps(_Trap(marker), protocol=2))  # a bare pickle
    assert_artifact_error(art / ARTIFACT_FILE, fresh(tiny), "pickle")
    (art / ARTIFACT_FILE).write_bytes(pickle.dumps(_Trap(marker), protocol=0))  # text protocol
    assert_artifact_error(art, fresh(tiny), "not a safetensors file")
    (art / ARTIFACT_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")  # truncated header
    assert_artifact_error(art, fresh(tiny), "not a safetensors file")
    assert not marker.exists()
    with pytest.raises(InvalidInputError):
        apply_precision_map(fresh(tiny), art)


# ----------------------------------------------------------------------------------- apply a map


def test_apply_precision_map_from_json_and_from_artifact_matches_the_search(tiny, tmp_path):
    model = tiny.lm.model
    ids = tiny.batches[0].model_inputs()
    # Default ffn_block_size (64): the map alone is enough, the space is rebuilt from the model.
    space64 = ModelAdapter(model).build_space(granularity="group", bits=(0, 2, 3, 4, 8, 16, "4a"))
    pmap = mixed_map(space64)
    with ModelAdapter(model).quantized(pmap, space64) as q, torch.no_grad():
        want64 = q(**ids).logits
    (tmp_path / "map.json").write_text(json.dumps(pmap.to_dict()))
    with torch.no_grad():
        assert torch.equal(apply_precision_map(fresh(tiny), tmp_path / "map.json")(**ids).logits, want64)
        assert torch.equal(apply_precision_map(fresh(tiny), pmap.to_dict())(**ids).logits, want64)
        point = {"precision_map": pmap.to_dict(), "cost": {}}
        assert torch.equal(apply_precision_map(fresh(tiny), point)(**ids).logits, want64)

    # Another block size: the artifact directory carries its space; a bare map needs ffn_block_size.
    space16 = space_of(model, "group")
    pmap16 = mixed_map(space16)
    with ModelAdapter(model).quantized(pmap16, space16) as q, torch.no_grad():
        want16 = q(**ids).logits
    export_artifact(model, space16, pmap16, tmp_path / "art")
    with torch.no_grad():
        assert torch.equal(apply_precision_map(fresh(tiny), tmp_path / "art")(**ids).logits, want16)
        assert torch.equal(
            apply_precision_map(fresh(tiny), tmp_path / "art" / PRECISION_MAP_FILE)(**ids).logits, want16
        )
        assert torch.equal(apply_precision_map(fresh(tiny), pmap16, space=space16)(**ids).logits, want16)
        assert torch.equal(
            apply_precision_map(fresh(tiny), pmap16, space={"space": space_to_dict(space16)})(**ids).logits, want16
        )
        assert torch.equal(apply_precision_map(fresh(tiny), pmap16, ffn_block_size=FFN_BLOCK)(**ids).logits, want16)
    with pytest.raises(InvalidInputError) as e:
        apply_precision_map(fresh(tiny), pmap16)
    assert e.value.field in ("ffn_block_size", "precision_map")


def test_minmax_artifacts_round_trip_and_apply_with_their_clip_rule(tiny, tmp_path):
    model = tiny.lm.model
    space = space_of(model, "layer")
    pmap = space.uniform(BitOption(3))
    ids = tiny.batches[0].model_inputs()
    with ModelAdapter(model).quantized(pmap, space, clip="minmax") as q, torch.no_grad():
        want = q(**ids).logits
    with ModelAdapter(model).quantized(pmap, space) as q, torch.no_grad():
        assert not torch.equal(q(**ids).logits, want)  # the clip rule matters
    export_artifact(model, space, pmap, tmp_path, clip="minmax")
    assert artifact_info(tmp_path).clip == "minmax"
    with torch.no_grad():
        assert torch.equal(load_artifact(tmp_path, fresh(tiny))(**ids).logits, want)
        assert torch.equal(apply_precision_map(fresh(tiny), tmp_path)(**ids).logits, want)
    with pytest.raises(InvalidInputError) as e:
        export_artifact(model, space, pmap, tmp_path, clip="percentile")
    assert e.value.field == "clip"


def test_apply_precision_map_finds_head_groups_and_refuses_foreign_maps(tiny, tmp_path):
    model = tiny.lm.model
    space = ModelAdapter(model, include_head=True).build_space(bits=(4, 8))
    head = [g.name for g in space.groups if g.block == space.n_blocks]
    assert head
    pmap = space.uniform(8)
    ids = tiny.batches[0].model_inputs()
    with ModelAdapter(model).quantized(pmap, space) as q, torch.no_grad():
        want = q(**ids).logits
    with torch.no_grad():
        assert torch.equal(apply_precision_map(fresh(tiny), pmap)(**ids).logits, want)
    with pytest.raises(InvalidInputError) as e:
        apply_precision_map(fresh(tiny), {"encoder.not.a.layer": 4})
    assert e.value.field == "precision_map"
    other = build_model(tmp_path / "wide", tiny.arch, task=tiny.task, hidden=48)
    with pytest.raises(InvalidInputError) as e:
        apply_precision_map(load_model(other, tiny.task, num_labels=2).model, pmap, space=space)
    assert e.value.field == "space" and "shape" in e.value.message


# ------------------------------------------------------------------------------------------ torchao


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    folder = build_model(tmp_path_factory.mktemp("ao") / "bert", "bert", hidden=64, heads=4, intermediate=128)
    return load_model(folder, "sequence_classification").model


def test_torchao_mapping_of_layer_groups(bert):
    space = ModelAdapter(bert).build_space(bits=(2, 3, 4, 8, 16, "4a"))
    names = [g.name for g in space.groups]
    q, k, v, o, up, down = names[:6]
    pmap = PrecisionMap(
        {q: 8, k: 4, v: 3, o: "4a", up: 16, down: 4, **{n: 32 for n in names[6:]}}
    )
    configs = to_torchao_config(pmap, space, build=False)
    assert list(configs) == [q, k, down]
    assert configs[q] == TorchaoConfig("Int8WeightOnlyConfig", {})
    assert configs[k] == TorchaoConfig("Int4WeightOnlyConfig", {"group_size": 64})  # 64 columns per row
    assert configs[down] == TorchaoConfig("Int4WeightOnlyConfig", {"group_size": 128})  # 128 columns
    assert to_torchao_config(pmap, space, build=False, int4_group_size=32)[down].kwargs == {"group_size": 32}
    unsupported = torchao_unsupported(pmap, space)
    assert [u.split(":")[0] for u in unsupported] == [v, o, up]
    assert "3-bit" in unsupported[0] and "asymmetric" in unsupported[1] and "float16" in unsupported[2]
    # Every group at 32 bits: nothing to configure, nothing unsupported.
    assert to_torchao_config(space.full_precision(), space, build=False) == {}
    assert torchao_unsupported(space.full_precision(), space) == []
    with pytest.raises(InvalidInputError):
        to_torchao_config(pmap, space, int4_group_size=48)


def test_torchao_mapping_of_sub_layer_groups(bert):
    space = ModelAdapter(bert).build_space(granularity="group", bits=(0, 4, 8), ffn_block_size=32)
    block0 = [g for g in space.groups if g.block == 0]
    block1 = [g for g in space.groups if g.block == 1]
    heads0 = [g for g in block0 if g.kind == "head"]
    ffn0 = [g for g in block0 if g.kind == "ffn"]
    heads1 = [g for g in block1 if g.kind == "head"]
    ffn1 = [g for g in block1 if g.kind == "ffn"]
    choice: dict[str, object] = {g.name: 32 for g in space.groups}
    choice.update({g.name: 8 for g in heads0})  # every head of block 0 at 8 bits: whole modules
    choice.update({g.name: 4 for g in ffn0})  # every FFN group of block 0 at 4 bits
    choice.update({heads1[0].name: 8, heads1[1].name: 4, heads1[2].name: 0})  # mixed heads in block 1
    choice.update({g.name: 8 for g in ffn1})
    pmap = PrecisionMap(choice)
    configs = to_torchao_config(pmap, space, build=False)
    by_leaf = {n.split("layer.", 1)[1]: c for n, c in configs.items()}
    head_dim = 64 // 4
    assert by_leaf["0.attention.self.query"] == TorchaoConfig("Int8WeightOnlyConfig", {})
    assert by_leaf["0.attention.output.dense"] == TorchaoConfig("Int8WeightOnlyConfig", {"group_size": head_dim})
    assert by_leaf["0.intermediate.dense"] == TorchaoConfig("Int4WeightOnlyConfig", {"group_size": 64})
    # FFN down projection: 32 columns per scale in bitscout -> int4 group size 32
    assert by_leaf["0.output.dense"] == TorchaoConfig("Int4WeightOnlyConfig", {"group_size": 32})
    assert by_leaf["1.output.dense"] == TorchaoConfig("Int8WeightOnlyConfig", {"group_size": 32})
    assert not any(n.startswith("1.attention") for n in by_leaf)
    unsupported = dict(u.split(": ", 1) for u in torchao_unsupported(pmap, space))
    assert set(unsupported) == {heads1[0].name, heads1[1].name, heads1[2].name}
    assert "pruned" in unsupported[heads1[2].name]
    assert "other options" in unsupported[heads1[0].name]


def test_torchao_mapping_refuses_conv1d_and_embeddings_and_builds_real_configs(tmp_path, monkeypatch, bert):
    folder = build_model(tmp_path / "gpt2", "gpt2", task="causal_lm")
    gpt2 = load_model(folder, "causal_lm").model
    space = ModelAdapter(gpt2).build_space(bits=(8,))
    pmap = space.uniform(8)
    assert len(to_torchao_config(pmap, space, build=False)) == len(space.groups)  # without the model: names only
    assert to_torchao_config(pmap, space, model=gpt2, build=False) == {}
    assert all("Conv1D" in u for u in torchao_unsupported(pmap, space, model=gpt2))

    emb_space = ModelAdapter(bert, include_embeddings=True).build_space(bits=(8,))
    emb = [g.name for g in emb_space.groups if g.block < 0]
    assert emb and all(
        u.split(":")[0] in emb and "embedding" in u for u in torchao_unsupported(emb_space.uniform(8), emb_space)
    )

    # With torchao importable the values are real config objects (a stand-in module here).
    fake = types.ModuleType("torchao.quantization")

    class Int8WeightOnlyConfig:
        def __init__(self, **kw):
            self.kw = kw

    fake.Int8WeightOnlyConfig = Int8WeightOnlyConfig
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.quantization", fake)
    built = to_torchao_config(pmap, space)
    assert built and all(isinstance(c, Int8WeightOnlyConfig) and c.kw == {} for c in built.values())


# ------------------------------------------------------------------------------------------------ CLI


def write_result(tiny, tmp_path, pmaps, *, model_path=True) -> Path:
    model = tiny.lm.model
    space = space_of(model, "group")
    ref = reference_outputs(model, tiny.batches, tiny.task)
    adapter = ModelAdapter(model)
    cm = CostModel(space)
    points = []
    for p in pmaps(space):
        with adapter.quantized(p, space) as q:
            metrics = evaluate(q, tiny.batches, tiny.task, reference=ref)
        points.append(ParetoPoint(p, cm.cost(p), metrics, "kl"))
    info = {"task": tiny.task, "recommended": 1}
    if model_path:
        info["model_path"] = str(tiny.folder)
    metric = "accuracy" if tiny.task == "sequence_classification" else "perplexity"
    result = SearchResult(
        front=points, points=points, sensitivities=[], metric=metric, higher_is_better=metric == "accuracy",
        space={"space": space_to_dict(space)}, info=info,
    )
    path = tmp_path / "result.json"
    result.to_json(path)
    return path


def test_cli_export_reloads_to_the_metrics_the_search_reported(tiny, tmp_path, capsys):
    src = write_result(tiny, tmp_path, lambda s: [s.uniform(8), mixed_map(s)])
    out = tmp_path / "out"
    assert export_main([str(src), "--point", "1", "--out", str(out), "--verify"]) == 0
    said = capsys.readouterr().out
    assert ARTIFACT_FILE in said and "torchao" in said
    point = SearchResult.from_json(src).front[1]
    loaded = load_artifact(out, fresh(tiny))
    ref = reference_outputs(tiny.lm.model, tiny.batches, tiny.task)
    assert evaluate(loaded, tiny.batches, tiny.task, reference=ref) == point.metrics
    info = artifact_info(out)
    assert info.precision_map == point.precision_map and info.info["point"] == "front[1]"
    assert info.info["metrics"] == point.metrics
    ao = json.loads((out / "torchao.json").read_text())
    assert set(ao) == {"configs", "unsupported"} and ao["unsupported"]
    # The recommended point, and overwriting only with --force.
    assert export_main([str(src), "--point", "recommended", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert export_main([str(src), "--point", "recommended", "--out", str(out), "--force"]) == 0


def test_cli_errors_are_one_line_with_exit_code_2(tiny, tmp_path, capsys):
    src = write_result(tiny, tmp_path, lambda s: [s.uniform(8)], model_path=False)
    out = str(tmp_path / "out")
    cases = [
        ([str(src), "--point", "0", "--out", out], "--model"),
        ([str(src), "--point", "5", "--out", out, "--model", str(tiny.folder)], "out of range"),
        ([str(src), "--point", "x", "--out", out, "--model", str(tiny.folder)], "integer"),
        ([str(src), "--point", "0", "--out", out, "--model", str(tmp_path / "none")], "does not exist"),
        ([str(tmp_path / "missing.json"), "--point", "0", "--out", out], "no result file"),
        ([str(src), "--out", out], "--point"),
        ([str(tiny.folder / "config.json"), "--point", "0", "--out", out], "not a bitscout search result"),
    ]
    for argv, words in cases:
        assert export_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("bitscout export:") and words in err, err
    assert export_main(["--help"]) == 0


def test_export_command_is_registered():
    data = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert data["project"]["entry-points"]["bitscout.commands"]["export"] == "search.export_cli:export_main"


def test_torchao_configs_run_with_real_torchao(bert):
    tq = pytest.importorskip("torchao.quantization", reason="torchao is not installed: pip install 'bitscout[torchao]'")
    from torchao.quantization.granularity import PerGroup

    # The build path of every config the mapping names: int4 with its group size, int8 per row and per
    # group of columns (PerGroup granularity on torchao 0.14 and later).
    int4 = TorchaoConfig("Int4WeightOnlyConfig", {"group_size": 64}).build()
    assert isinstance(int4, tq.Int4WeightOnlyConfig) and int4.group_size == 64
    int8 = TorchaoConfig("Int8WeightOnlyConfig", {"group_size": 16}).build()
    assert isinstance(int8, tq.Int8WeightOnlyConfig) and int8.granularity == PerGroup(16)
    bert = copy.deepcopy(bert)  # quantize_ changes the module-scoped model
    space = ModelAdapter(bert).build_space(granularity="group", bits=(8,), ffn_block_size=32)
    pmap = space.uniform(8)
    configs = to_torchao_config(pmap, space, model=bert)
    assert configs and not torchao_unsupported(pmap, space, model=bert)
    assert all(type(c).__name__ == "Int8WeightOnlyConfig" for c in configs.values())
    make = getattr(tq, "FqnToConfig", None) or tq.ModuleFqnToConfig
    ids = torch.randint(5, 30, (2, 6))
    with torch.no_grad():
        before = bert(input_ids=ids).logits
        tq.quantize_(bert, make(configs), filter_fn=None)
        after = bert(input_ids=ids).logits
    assert type(bert.bert.encoder.layer[0].attention.self.query.weight).__name__ != "Parameter"
    assert torch.allclose(before, after, atol=5e-2)
