"""Fused-layer ties: sibling projections found structurally (also under unusual module names), one
decision per tied set in the allocator (against brute force), and ties held by every map of every
method on a tiny Llama (q/k/v, gate/up) and a tiny BERT (q/k/v)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from search.adapter import ModelAdapter
from search.cost import CostModel
from search.errors import InvalidInputError
from search.local import DataOptions, prepare
from search.pipeline import SearchOptions
from search.plan import build_problem, resolve
from search.result import Budget, SensitivityTable
from search.space import BitOption, PrecisionMap, SearchSpace, Tie, space_from_dict, space_to_dict
from search.tasks import load_model
from tests.tiny import build_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("ties") / "llama", "llama", task="causal_lm", layers=2, hidden=32,
                       heads=4, intermediate=64)


def _data(sentiment_file, **kw):
    base = dict(source=str(sentiment_file), label_field=None, calibration=16, evaluation=16, max_length=16,
                batch_size=16)
    base.update(kw)
    return DataOptions(**base)


# ---------------------------------------------------------------------------------------- detection


def test_the_siblings_of_llama_and_bert_are_found_structurally(llama_dir, trained_bert):
    llama = ModelAdapter(load_model(llama_dir, "causal_lm").model)
    want = []
    for i in range(2):
        p = f"model.layers.{i}"
        want.append(("attention_inputs", (f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj")))
        want.append(("ffn_inputs", (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj")))
    assert llama.find_siblings() == want
    bert = ModelAdapter(load_model(trained_bert, "sequence_classification", num_labels=2).model)
    assert bert.find_siblings() == [
        ("attention_inputs", tuple(f"bert.encoder.layer.{i}.attention.self.{n}" for n in ("query", "key", "value")))
        for i in range(2)
    ]


class _Block(nn.Module):
    """A pre-norm transformer block whose modules carry no usual name: the attention's input
    projections are ``alpha``/``beta``/``gamma`` (out: ``delta``), the gated FFN's ``rho``/``sigma``
    (out: ``tau``), and ``kappa`` reads the FFN's input too but feeds the residual stream directly."""

    def __init__(self, d: int, ff: int, fused_attention: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.alpha, self.beta, self.gamma, self.delta = (nn.Linear(d, d) for _ in range(4))
        self.rho, self.sigma = nn.Linear(d, ff), nn.Linear(d, ff)
        self.tau = nn.Linear(ff, d)
        self.kappa = nn.Linear(d, d)
        self.fused = fused_attention
        self.heads = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        b, t, d = h.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        a, k, v = split(self.alpha(h)), split(self.beta(h)), split(self.gamma(h))
        if self.fused:
            ctx = F.scaled_dot_product_attention(a, k, v, is_causal=True)
        else:
            ctx = torch.softmax(a @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        x = x + self.delta(ctx.transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x)
        return x + self.tau(F.silu(self.rho(h)) * self.sigma(h)) + self.kappa(h)


class _Odd(nn.Module):
    def __init__(self, fused_attention: bool) -> None:
        super().__init__()
        self.table = nn.Embedding(16, 8)
        self.stack = nn.ModuleList(_Block(8, 16, fused_attention) for _ in range(2))
        self.readout = nn.Linear(8, 16)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.table(input_ids)
        for blk in self.stack:
            x = blk(x)
        return self.readout(x)


@pytest.mark.parametrize("fused_attention", [False, True], ids=["softmax", "sdpa"])
def test_detection_needs_no_usual_module_names(fused_attention):
    model = _Odd(fused_attention)
    for p in model.parameters():
        p.requires_grad_(False)  # detection turns gradients on for its probe and back off
    adapter = ModelAdapter(model)
    assert adapter.find_siblings() == [
        item
        for i in range(2)
        for item in (
            ("attention_inputs", (f"stack.{i}.alpha", f"stack.{i}.beta", f"stack.{i}.gamma")),
            ("ffn_inputs", (f"stack.{i}.rho", f"stack.{i}.sigma")),
        )
    ]
    assert not any(p.requires_grad for p in model.parameters())
    space = adapter.build_space(bits=(2, 4), tie=("qkv", "gate_up"))
    assert [t.kind for t in space.ties] == ["attention_inputs", "ffn_inputs"] * 2
    assert space.ties[1].groups == ("stack.0.rho", "stack.0.sigma")  # kappa reads the same input, feeds no FFN
    assert adapter.build_space(bits=(2, 4), tie=("gate_up",)).ties == tuple(t for t in space.ties if t.kind == "ffn_inputs")


def test_at_group_granularity_heads_and_ffn_groups_already_hold_the_siblings(llama_dir):
    adapter = ModelAdapter(load_model(llama_dir, "causal_lm").model)
    space = adapter.build_space(granularity="group", bits=(0, 2, 4, 8), ffn_block_size=16, tie=("qkv", "gate_up"))
    assert space.ties == ()
    heads = [g for g in space.groups if g.kind == "head"]
    assert heads and all({m.module.rsplit(".", 1)[1] for m in g.members} == {"q_proj", "k_proj", "v_proj", "o_proj"}
                          for g in heads)
    ffn = [g for g in space.groups if g.kind == "ffn"]
    assert ffn and all({m.module.rsplit(".", 1)[1] for m in g.members} == {"gate_proj", "up_proj", "down_proj"}
                        for g in ffn)


# --------------------------------------------------------------------------------------- the space


def test_a_tied_space_has_one_decision_per_set_and_round_trips(llama_dir):
    adapter = ModelAdapter(load_model(llama_dir, "causal_lm").model)
    space = adapter.build_space(bits=(2, 4, 8), tie="qkv,gate_up")
    assert len(space.ties) == 4 and len(space.groups) == 14 and len(space.decisions) == 8
    names = [g.name for g in space.groups]
    qkv = space.ties[0].groups
    assert all(len(o) == 4 for o in space.decision_options)  # 2, 4, 8, 32
    pmap = space.from_choices([i % 4 for i in range(8)])  # one index per decision
    assert len({pmap[n] for n in qkv}) == 1 and len(set(pmap.values())) == 4
    per_group = [0] * len(names)
    assert space.from_choices(per_group) == space.uniform(2)  # one index per group, ties agreeing
    per_group[names.index(qkv[1])] = 1
    with pytest.raises(InvalidInputError) as e:
        space.from_choices(per_group)
    assert e.value.field == "precision_map"
    broken = pmap.replace(**{qkv[0]: BitOption(2), qkv[1]: BitOption(8)})
    assert not space.respects_ties(broken) and space.respects_ties(pmap)
    with pytest.raises(InvalidInputError):
        space.decision_choices(broken)
    assert space.from_choices(space.decision_choices(pmap)) == pmap
    again = space_from_dict(space_to_dict(space))
    assert again.ties == space.ties and again.decisions == space.decisions
    with pytest.raises(InvalidInputError) as e:
        SearchSpace(groups=space.groups, options=space.options, ties=(Tie("attention_inputs", (names[0],)),))
    assert e.value.field == "tie"
    assert space_to_dict(adapter.build_space(bits=(2, 4, 8))).get("ties") is None  # untied spaces unchanged


def test_the_allocator_sees_one_decision_per_tied_set_and_its_answer_is_the_brute_force_optimum(llama_dir):
    adapter = ModelAdapter(load_model(llama_dir, "causal_lm").model, include=["model.layers.0.*"])
    space = adapter.build_space(bits=(2, 4, 8), tie=("qkv", "gate_up"))
    assert len(space.decisions) == 4  # q/k/v, o, gate/up, down
    cm = CostModel(space)
    rng = np.random.default_rng(0)
    scores = {g.name: {o.key(): (0.0 if o.bits == 32 else float(rng.random()) * (9 - o.bits)) for o in opts}
              for g, opts in zip(space.groups, space.options, strict=True)}
    table = SensitivityTable(method="kl", scores=scores)
    problem, _ = build_problem(space, cm, table)
    assert len(problem.values) == 4
    # values and costs of a tied set are its groups' sums, and a map's cost counts each member once
    for d, members in enumerate(space.decisions):
        for k, o in enumerate(space.decision_options[d]):
            assert problem.values[d][k] == pytest.approx(sum(scores[space.groups[i].name][o.key()] for i in members))
            by_group = sum(cm.option_cost(space.groups[i], o)["size_bytes"] for i in members)
            assert problem.weights["size_bytes"][d][k] == pytest.approx(by_group)
    qkv = space.ties[0]
    each = sum(cm.cost(space.uniform(32).replace(**{n: BitOption(4)})).size_bytes - cm.cost(space.uniform(32)).size_bytes
               for n in qkv.groups)
    tied_only = cm.cost(space.uniform(32).replace(**{n: BitOption(4) for n in qkv.groups})).size_bytes
    assert tied_only - cm.cost(space.uniform(32)).size_bytes == pytest.approx(each)
    budget = (cm.cost(space.uniform(4)).size_bytes + cm.cost(space.uniform(8)).size_bytes) / 2
    best = None
    for choice in itertools.product(*[range(len(o)) for o in space.decision_options]):
        m = space.from_choices(choice)
        c = cm.cost(m)
        if c.size_bytes <= budget:
            v = sum(scores[n][o.key()] for n, o in m.items())
            if best is None or v < best[0] - 1e-12:
                best = (v, m)
    assert best is not None
    answer = resolve({"space": space_to_dict(space), "cost_model": {}}, table, {"max_size_mb": budget / 1e6})
    got = PrecisionMap.from_dict(answer["precision_map"])
    assert space.respects_ties(got) and answer["predicted"] == pytest.approx(best[0]) and answer["exact"]


# ------------------------------------------------------------------------------ every map of a front


def _assert_tied(space: SearchSpace, pmap: PrecisionMap, kinds: set[str]) -> None:
    assert {t.kind for t in space.ties} == kinds
    for t in space.ties:
        assert len({pmap[n] for n in t.groups}) == 1, (t.groups, [pmap[n].key() for n in t.groups])


METHOD_OPTIONS = {
    "hessian": {"max_probes": 3, "min_probes": 2, "calibrate": False},
    "dnas": {"steps": 4, "steps_next": 2, "target_fractions": [0.4, 0.7]},
    "nsga2": {"n_evaluations": 10, "population_size": 4},
}


def test_ties_hold_in_every_map_of_a_llama_front(llama_dir, sentiment_file):
    opts = SearchOptions(methods=("kl", "hessian", "dnas", "nsga2"), bits=(2, 4, "4g16", 8), front_points=6,
                         budget=Budget(max_avg_bits=5.0), method_options=METHOD_OPTIONS)
    s = prepare(llama_dir, _data(sentiment_file), opts, task="causal_lm", device="cpu")
    assert len(s.space.ties) == 4  # on by default for causal LMs: q/k/v and gate/up of both blocks
    result = s.run()
    assert {p.method for p in result.points} >= {"kl", "hessian", "dnas", "nsga2", "uniform"}
    for p in result.points:
        _assert_tied(s.space, p.precision_map, {"attention_inputs", "ffn_inputs"})
    assert any(len({o.key() for o in p.precision_map.values()}) > 1 for p in result.front)  # mixed maps, tied
    off = prepare(llama_dir, _data(sentiment_file), SearchOptions(bits=(2, 4), tie=("none",)), task="causal_lm",
                  device="cpu")
    assert off.space.ties == ()


def test_ties_hold_in_every_map_of_a_bert_front(trained_bert, sentiment_file):
    opts = SearchOptions(methods=("kl", "dnas", "nsga2"), bits=(2, 3, 4, 8), front_points=6, tie=("qkv",),
                         budget=Budget(max_avg_bits=4.5), method_options={k: METHOD_OPTIONS[k] for k in ("dnas", "nsga2")})
    s = prepare(trained_bert, _data(sentiment_file, label_field="label"), opts, device="cpu")
    assert len(s.space.ties) == 2
    result = s.run()
    for p in result.points:
        _assert_tied(s.space, p.precision_map, {"attention_inputs"})
    default = prepare(trained_bert, _data(sentiment_file, label_field="label"), SearchOptions(bits=(2, 4)), device="cpu")
    assert default.space.ties == ()  # not a causal LM: nothing tied unless asked


def test_bad_tie_kinds_name_the_field():
    with pytest.raises(InvalidInputError) as e:
        SearchOptions(tie=("qkvo",))
    assert e.value.field == "space.tie"
    with pytest.raises(InvalidInputError) as e:
        SearchOptions(tie=("none", "qkv"))
    assert e.value.field == "space.tie"
    assert SearchOptions(tie=("gate_up", "qkv", "attention_inputs")).tie == ("attention_inputs", "ffn_inputs")
