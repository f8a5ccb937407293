"""A native artifact written in the other formats (:func:`search.export.export_stored`): a refined point
(KD + LSQ: learned step sizes, refined biases and norms) exported as compressed-tensors and dense from its
artifact alone, reloaded with plain transformers, gives the very weights, logits and metrics its native
artifact gives; the stored codes come back; an artifact that does not fit the model is refused.

Both sides run on parameters copied to fresh memory (PyTorch's CPU matmul rounds by alignment:
``tests/search/test_export_formats.py``)."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors import safe_open

from bitscout.formats import COMPRESSED_TENSORS, DENSE
from search import quant
from search.errors import InvalidInputError
from search.export import export_artifact, export_stored, load_artifact, read_quantization
from search.local import DataOptions, prepare
from search.pipeline import SearchOptions
from search.refine import RefineConfig, refine
from search.space import BitOption, PrecisionMap
from search.tasks import evaluate, load_model
from tests.tiny import build_model

TASK = "sequence_classification"


def aligned(model):
    for t in [*model.parameters(), *model.buffers()]:
        t.data = t.data.clone()
    return model


@pytest.fixture(scope="module")
def refined(trained_bert, sentiment_file, tmp_path_factory):
    """A refined point of a tiny BERT classifier with per-row, group-wise and asymmetric options, and
    its native artifact (what the runner stores for a refined point)."""
    transformers.utils.logging.set_verbosity_error()
    data = DataOptions(source=str(sentiment_file), label_field="label", calibration=32, evaluation=32,
                       max_length=16, batch_size=16)  # fmt: skip
    s = prepare(trained_bert, data, SearchOptions(methods=("kl",), bits=("4g16", "3a", 8)), device="cpu")
    cycle = ["4g16", "3a", "8", "32"]
    pmap = PrecisionMap({g.name: BitOption.parse(cycle[i % len(cycle)]) for i, g in enumerate(s.space.groups)})
    res = refine(s, pmap, config=RefineConfig(steps=6, eval_every=2, lr_weights=1e-3, lr_scales=1e-2, patience=None),
                 train_batches=s.calibration, validation_batches=s.calibration[:1])  # fmt: skip
    art = tmp_path_factory.mktemp("stored") / "native"
    export_artifact(res.model, s.space, pmap, art, qparams=res.qparams, model_dir=s.model_path,
                    metadata={"refined": True, "metrics": res.metrics})  # fmt: skip
    return s, res, pmap, art


def _native(s, art):
    return aligned(load_artifact(art, load_model(s.model_path, TASK, num_labels=2).model))


@pytest.mark.parametrize("fmt", [COMPRESSED_TENSORS, DENSE])
def test_a_refined_point_reloads_in_plain_transformers_to_its_native_artifact(refined, fmt, tmp_path):
    s, res, pmap, art = refined
    # a real refined point: step sizes and float parameters moved away from the post-training point
    original = load_model(s.model_path, TASK, num_labels=2).model
    start = {k: quant.choose_qparams(
        original.get_submodule(s.space.groups[s.space.index(k.split("::")[0])].members[int(k.split("::")[1])].module)
        .weight.detach(), qp.bits, symmetric=qp.symmetric, group_size=qp.group_size).scale
        for k, qp in res.qparams.items()}  # fmt: skip
    assert any(not torch.equal(start[k], qp.scale) for k, qp in res.qparams.items())
    biases = {k: v for k, v in original.state_dict().items() if k.endswith(("bias", "LayerNorm.weight"))}
    assert any(not torch.equal(res.model.state_dict()[k], v) for k, v in biases.items())

    report = export_stored(fmt, art, load_model(s.model_path, TASK, num_labels=2).model, tmp_path / fmt,
                           model_dir=s.model_path)  # fmt: skip
    assert report.format == fmt and not [w for w in report.warnings if "different schemes" not in w]  # untied map
    native = _native(s, art)
    plain = aligned(transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / fmt,
                                                                                      attn_implementation="eager"))
    batch = s.evaluation[0]
    with torch.no_grad():
        want = native(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        got = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(got, want)
    loaded = plain.state_dict()  # compressed-tensors has decompressed at the first forward
    assert [k for k, v in native.state_dict().items() if not torch.equal(loaded[k], v)] == []
    metrics = evaluate(plain, s.evaluation, TASK, reference=s.reference())
    assert metrics == evaluate(native, s.evaluation, TASK, reference=s.reference())
    assert metrics[s.metric] == pytest.approx(res.metrics[s.metric], abs=1e-6)

    if fmt == COMPRESSED_TENSORS:  # the stored scales are the learned ones, as stored in the artifact
        stored = read_quantization(art)
        with safe_open(tmp_path / fmt / "model.safetensors", "pt") as f:
            for (group, i), _ in stored.codes.items():
                opt = pmap[group]
                if opt.group_size is None and opt.symmetric:
                    m = s.space.groups[s.space.index(group)].members[i]
                    scale = f.get_tensor(f"{m.module}.weight_scale").reshape(-1)
                    assert torch.equal(scale, stored.qparams[f"{group}::{i}"].scale), group


def test_the_stored_codes_come_back_and_an_artifact_that_does_not_fit_is_refused(refined, tmp_path):
    s, res, pmap, art = refined
    stored = read_quantization(art)
    assert set(stored.codes) == {(g, 0) for g, o in pmap.items() if o.is_integer}
    assert stored.info.info["refined"] is True
    other = build_model(tmp_path / "wide", "bert", layers=2, hidden=48, heads=4, intermediate=64)
    with pytest.raises(InvalidInputError) as err:
        export_stored(DENSE, art, load_model(other, TASK, num_labels=2).model, tmp_path / "out")
    assert err.value.field == "artifact"
    assert not (tmp_path / "out").exists()


def test_a_refined_bfloat16_point_reloads_as_compressed_tensors_to_its_native_artifact(tmp_path):
    """The learned step sizes of a bfloat16 model are rounded to numbers of bfloat16 and float16 (those of
    its weights' dtype), so compressed-tensors, which holds the scales in the model's dtype, keeps them."""
    from tests.tiny import sentiment_rows, write_jsonl

    transformers.utils.logging.set_verbosity_error()
    folder = build_model(tmp_path / "llama", "llama", task="causal_lm", layers=2)
    transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).save_pretrained(str(folder))
    data = write_jsonl(tmp_path / "text.jsonl", sentiment_rows(120))
    s = prepare(folder, DataOptions(str(data), calibration=4, evaluation=4, max_length=16, batch_size=4, windows=True),
                SearchOptions(bits=("4g16", "3a", 8), methods=("kl",)), task="causal_lm", device="cpu")  # fmt: skip
    cycle = ["4g16", "3a", "8", "32"]
    pmap = PrecisionMap({g.name: BitOption.parse(cycle[i % len(cycle)]) for i, g in enumerate(s.space.groups)})
    res = refine(s, pmap, config=RefineConfig(steps=6, eval_every=2, lr_weights=1e-3, lr_scales=1e-2, patience=None),
                 train_batches=s.calibration, validation_batches=s.calibration[:1])  # fmt: skip
    assert all(torch.equal(qp.scale.to(torch.bfloat16).float(), qp.scale) for qp in res.qparams.values())
    art = tmp_path / "native"
    export_artifact(res.model, s.space, pmap, art, qparams=res.qparams, model_dir=s.model_path)
    native = aligned(load_artifact(art, load_model(folder, "causal_lm").model))
    report = export_stored(COMPRESSED_TENSORS, art, load_model(folder, "causal_lm").model, tmp_path / "ct",
                           model_dir=folder)  # fmt: skip
    assert not [w for w in report.warnings if "different schemes" not in w]  # untied map
    plain = aligned(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", attn_implementation="eager"))
    ids = s.evaluation[0].input_ids
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, native(input_ids=ids).logits)
