"""Cost models: exact sizes on hand-built spaces, additivity, pruning, profiles, bad input."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pytest
import torch

from search.cost import PROFILES, CostModel, DeviceProfile, get_profile, weight_bytes
from search.errors import InvalidInputError
from search.quant import choose_qparams, pack, quantize
from search.result import Budget, Cost
from search.space import BitOption, Group, Member, PrecisionMap, SearchSpace

OPTIONS = tuple(BitOption.parse(k) for k in ("0", "2", "3", "3a", "4", "4a", "8", "16", "32"))

# A whole 8x16 matrix with a bias (128 weights, 8 rows).
LAYER = Group(
    name="blk0.fc",
    kind="layer",
    members=(Member("blk0.fc", (8, 16)),),
    block=0,
    parent="blk0.fc",
    macs_per_token=128,
    bias_params=8,
)
# A head spanning 3 rows of q (3 x 1 weights) and 3 columns of o (1 x 3 weights): 3 bits of 3
# weights is 9 bits, so packing each member alone (2 + 2 bytes) differs from packing the group
# as one stream (3 bytes).
HEAD = Group(
    name="blk0.attn/head0",
    kind="head",
    members=(Member("blk0.q", (12, 1), "out", 0, 3), Member("blk0.o", (1, 12), "in", 0, 3)),
    block=0,
    parent="blk0.attn",
    index=0,
    macs_per_token=6,
    bias_params=3,
)
OTHER_PARAMS = 1000
OTHER_MACS = 50


def make_space(other_bits: int = 32) -> SearchSpace:
    return SearchSpace(
        groups=(LAYER, HEAD),
        options=(OPTIONS, OPTIONS),
        other_params=OTHER_PARAMS,
        other_bits=other_bits,
        other_macs_per_token=OTHER_MACS,
        n_blocks=1,
    )


def pmap(layer: str | int, head: str | int) -> PrecisionMap:
    return PrecisionMap({LAYER.name: layer, HEAD.name: head})


# The size of each group at each option, counted by hand from the definitions.
LAYER_BYTES = {
    "0": -8 * 4,  # bias dropped from other_params (stored at 32 bits)
    "2": 32 + 16,  # 128*2/8 packed + 8 rows * 2 bytes of fp16 scale
    "3": 48 + 16,
    "3a": 48 + 16 + 8,  # + 1 byte zero point per row
    "4": 64 + 16,
    "4a": 64 + 16 + 8,
    "8": 128 + 16,
    "16": 256,
    "32": 512,
}
HEAD_BYTES = {
    "0": -3 * 4,
    "2": (1 + 1) + (3 + 1) * 2,  # ceil(6/8) per member; q has 3 rows, o has 1
    "3": (2 + 2) + (3 + 1) * 2,
    "3a": (2 + 2) + (3 + 1) * 3,
    "4": (2 + 2) + (3 + 1) * 2,
    "4a": (2 + 2) + (3 + 1) * 3,
    "8": (3 + 3) + (3 + 1) * 2,
    "16": 12,
    "32": 24,
}


@pytest.mark.parametrize("lk", list(LAYER_BYTES))
@pytest.mark.parametrize("hk", list(HEAD_BYTES))
def test_exact_size_bytes(lk: str, hk: str) -> None:
    cost = CostModel(make_space()).cost(pmap(lk, hk))
    assert cost.size_bytes == OTHER_PARAMS * 4 + LAYER_BYTES[lk] + HEAD_BYTES[hk]


def test_size_uses_other_bits() -> None:
    cost = CostModel(make_space(other_bits=16)).cost(pmap("0", "32"))
    assert cost.size_bytes == OTHER_PARAMS * 2 - 8 * 2 + 24


@pytest.mark.parametrize("key", ["2", "3", "3a", "5", "6a", "8"])
def test_size_matches_what_pack_stores(key: str) -> None:
    """The bytes counted for a group are the bytes ``pack`` produces for its member slices plus
    one fp16 scale (and one uint8 zero point if asymmetric) per row."""
    opt = BitOption.parse(key)
    torch.manual_seed(0)
    full = {"blk0.q": torch.randn(12, 1), "blk0.o": torch.randn(1, 12)}
    slices = [full["blk0.q"][0:3], full["blk0.o"][:, 0:3]]
    stored = 0
    for w in slices:
        qp = choose_qparams(w, opt.bits, symmetric=opt.symmetric)
        stored += pack(quantize(w, qp), opt.bits).numel()
        stored += qp.scale.numel() * 2 + (0 if opt.symmetric else qp.zero_point.numel())
    assert weight_bytes(HEAD, opt) == stored


def test_avg_bits() -> None:
    model = CostModel(make_space())
    n = 128 + 6
    assert model.cost(pmap(4, 4)).avg_bits == pytest.approx(4.0)
    assert model.cost(pmap("4a", 4)).avg_bits == pytest.approx(4.0)
    assert model.cost(pmap(32, 32)).avg_bits == pytest.approx(32.0)
    assert model.cost(pmap(0, 0)).avg_bits == 0.0
    assert model.cost(pmap(2, 16)).avg_bits == pytest.approx((128 * 2 + 6 * 16) / n)
    assert model.cost(pmap(0, 8)).avg_bits == pytest.approx(6 * 8 / n)


@pytest.mark.parametrize("seq_len,batch,act_bits", [(128, 1, 8), (7, 3, 4), (1, 1, 16)])
def test_bops(seq_len: int, batch: int, act_bits: int) -> None:
    model = CostModel(make_space(), seq_len=seq_len, batch=batch, act_bits=act_bits)
    t = seq_len * batch
    other = t * OTHER_MACS * 32 * 32
    assert model.offsets()["bops"] == other
    assert model.cost(pmap(4, "3a")).bops == other + t * (128 * 4 * act_bits + 6 * 3 * act_bits)
    # Float options run activations at the weights' width.
    assert model.cost(pmap(16, 32)).bops == other + t * (128 * 16 * 16 + 6 * 32 * 32)
    # Pruned groups do no work.
    assert model.cost(pmap(0, 0)).bops == other
    assert model.cost(pmap(0, 8)).bops == other + t * 6 * 8 * act_bits


def test_pruned_groups_cost_nothing_but_their_bias() -> None:
    model = CostModel(make_space())
    costs = model.group_costs()
    for g, group in enumerate((LAYER, HEAD)):
        i = OPTIONS.index(BitOption(0))
        assert costs["size_bytes"][g][i] == -group.bias_params * 4
        assert costs["bops"][g][i] == 0
        assert costs["avg_bits"][g][i] == 0
        assert costs["latency_ms"][g][i] == 0
    everything_pruned = model.cost(pmap(0, 0))
    assert everything_pruned.size_bytes == OTHER_PARAMS * 4 - (8 + 3) * 4
    assert everything_pruned.latency_ms == model.offsets()["latency_ms"]


def test_latency_roofline() -> None:
    profile = DeviceProfile(
        "toy", memory_bandwidth_gbs=1.0, int8_tops=2.0, int4_tops=4.0, fp16_tflops=1.0, fp32_tflops=0.5
    )
    space = make_space()
    # Memory bound: few tokens.
    model = CostModel(space, seq_len=1, act_bits=8, profile=profile)
    c = model.group_costs()["latency_ms"][0]
    assert c[OPTIONS.index(BitOption(8))] == pytest.approx(144 / 1e9 * 1e3)
    assert c[OPTIONS.index(BitOption(32))] == pytest.approx(512 / 1e9 * 1e3)
    # Compute bound: many tokens. 2 ops per MAC, at the class of max(weight, activation) bits.
    model = CostModel(space, seq_len=100_000, batch=10, act_bits=8, profile=profile)
    ops = 2 * 1_000_000 * 128
    c = model.group_costs()["latency_ms"][0]
    assert c[OPTIONS.index(BitOption(4))] == pytest.approx(ops / 2e12 * 1e3)  # W4A8 runs int8
    assert c[OPTIONS.index(BitOption(16))] == pytest.approx(ops / 1e12 * 1e3)
    assert c[OPTIONS.index(BitOption(32))] == pytest.approx(ops / 0.5e12 * 1e3)
    model4 = CostModel(space, seq_len=100_000, batch=10, act_bits=4, profile=profile)
    c4 = model4.group_costs()["latency_ms"][0]
    assert c4[OPTIONS.index(BitOption(4))] == pytest.approx(ops / 4e12 * 1e3)  # W4A4: int4
    assert c4[OPTIONS.index(BitOption(8))] == pytest.approx(ops / 2e12 * 1e3)  # W8A4: int8
    # The excluded part: its own roofline.
    other_bytes = OTHER_PARAMS * 4
    other_ops = 2 * 1_000_000 * OTHER_MACS
    assert model.offsets()["latency_ms"] == pytest.approx(max(other_bytes / 1e9, other_ops / 0.5e12) * 1e3)


def test_lower_bits_are_never_slower_or_larger() -> None:
    model = CostModel(make_space(), profile=get_profile("h100"))
    order = [BitOption.parse(k) for k in ("2", "3", "4", "8", "16", "32")]
    costs = model.group_costs()
    for metric in ("size_bytes", "avg_bits", "bops", "latency_ms"):
        values = [costs[metric][0][OPTIONS.index(o)] for o in order]
        assert values == sorted(values), (metric, values)
    # Scales are not free: on slices of 3 weights, 8 bits plus a scale per row outweighs float16.
    assert (
        costs["size_bytes"][1][OPTIONS.index(BitOption(8))]
        > costs["size_bytes"][1][OPTIONS.index(BitOption(16))]
    )


def test_cost_is_offsets_plus_group_costs() -> None:
    model = CostModel(make_space(), seq_len=64, batch=2, profile=get_profile("rtx4090"))
    costs, offsets = model.group_costs(), model.offsets()
    rng = random.Random(0)
    for _ in range(50):
        choices = [rng.randrange(len(OPTIONS)) for _ in range(2)]
        cost = model.cost(make_space().from_choices(choices))
        for metric in ("size_bytes", "avg_bits", "bops", "latency_ms"):
            expected = offsets[metric] + sum(costs[metric][g][c] for g, c in enumerate(choices))
            assert cost.get(metric) == pytest.approx(expected, rel=1e-12, abs=0)
        assert cost == model.cost_of_choices(choices)


def test_group_costs_align_with_options_and_are_read_only() -> None:
    opts_head = (BitOption(0), BitOption(4), BitOption(8))
    space = SearchSpace(groups=(LAYER, HEAD), options=(OPTIONS, opts_head), other_params=10)
    model = CostModel(space)
    costs = model.group_costs()
    assert set(costs) == {"size_bytes", "avg_bits", "bops", "latency_ms"}
    for metric in costs:
        assert [len(a) for a in costs[metric]] == [len(OPTIONS), 3]
        assert all(a.dtype == np.float64 for a in costs[metric])
    assert list(costs["size_bytes"][1]) == [-12, HEAD_BYTES["4"], HEAD_BYTES["8"]]
    with pytest.raises(ValueError):
        costs["size_bytes"][0][0] = 1.0
    assert model.offsets() == {
        "size_bytes": 40.0,
        "avg_bits": 0.0,
        "bops": 0.0,
        "latency_ms": pytest.approx(40 / (PROFILES["a100"].memory_bandwidth_gbs * 1e9) * 1e3),
    }


def test_full_precision_is_the_float_model() -> None:
    space = make_space()
    cost = CostModel(space).cost(space.full_precision())
    assert cost.size_bytes == (space.n_params + OTHER_PARAMS) * 4
    assert cost.avg_bits == 32
    assert Budget(max_size_mb=cost.size_mb).is_feasible(cost)
    assert not Budget(max_size_mb=cost.size_mb * 0.99).is_feasible(cost)


def test_uniform_maps_shrink_with_bits() -> None:
    space = make_space()
    model = CostModel(space)
    sizes = [model.cost(space.uniform(b)).size_bytes for b in (2, 3, 4, 8, 16, 32)]
    assert sizes == sorted(sizes)
    assert isinstance(model.cost(space.uniform(4)), Cost)


# --------------------------------------------------------------------------- profiles


def test_named_profiles() -> None:
    assert set(PROFILES) >= {"a100", "h100", "rtx4090", "cpu-avx512", "jetson-orin"}
    for name, p in PROFILES.items():
        assert p.name == name
        assert get_profile(name) is p
        assert get_profile(name.upper()) is p
        assert p.int4_tops >= p.int8_tops >= p.fp32_tflops > 0
        assert DeviceProfile.from_dict(p.to_dict()) == p
    assert PROFILES["h100"].memory_bandwidth_gbs == 3350
    assert PROFILES["h100"].int4_tops == PROFILES["h100"].int8_tops  # Hopper has no int4 path
    assert get_profile(None) is PROFILES["a100"]
    assert CostModel(make_space()).profile is PROFILES["a100"]
    assert CostModel(make_space(), profile="jetson-orin").profile is PROFILES["jetson-orin"]  # type: ignore[arg-type]


def test_custom_profiles() -> None:
    data = {
        "name": "my-npu",
        "memory_bandwidth_gbs": 50,
        "int8_tops": 26,
        "int4_tops": 52,
        "fp16_tflops": 13,
        "fp32_tflops": 1,
    }
    p = get_profile(data)
    assert p.name == "my-npu" and p.memory_bandwidth_gbs == 50.0
    assert get_profile(p) is p
    model = CostModel(make_space(), profile=data)  # type: ignore[arg-type]
    assert model.profile == p
    slow = CostModel(make_space(), profile={**data, "memory_bandwidth_gbs": 5})  # type: ignore[arg-type]
    m = pmap(4, 4)
    assert slow.cost(m).latency_ms > model.cost(m).latency_ms


@pytest.mark.parametrize(
    "bad",
    [
        "b200",
        "",
        {"name": "x"},
        {
            "name": "x",
            "memory_bandwidth_gbs": 1,
            "int8_tops": 1,
            "int4_tops": 1,
            "fp16_tflops": 1,
            "fp32_tflops": 0,
        },
        {
            "name": "x",
            "memory_bandwidth_gbs": -1,
            "int8_tops": 1,
            "int4_tops": 1,
            "fp16_tflops": 1,
            "fp32_tflops": 1,
        },
        {
            "name": "x",
            "memory_bandwidth_gbs": "fast",
            "int8_tops": 1,
            "int4_tops": 1,
            "fp16_tflops": 1,
            "fp32_tflops": 1,
        },
        {
            "name": "",
            "memory_bandwidth_gbs": 1,
            "int8_tops": 1,
            "int4_tops": 1,
            "fp16_tflops": 1,
            "fp32_tflops": 1,
        },
        {
            "name": "x",
            "memory_bandwidth_gbs": 1,
            "int8_tops": 1,
            "int4_tops": 1,
            "fp16_tflops": 1,
            "fp32_tflops": 1,
            "tdp": 3,
        },
        {
            "name": "x",
            "memory_bandwidth_gbs": math.inf,
            "int8_tops": 1,
            "int4_tops": 1,
            "fp16_tflops": 1,
            "fp32_tflops": 1,
        },
        42,
    ],
)
def test_bad_profiles(bad: Any) -> None:
    with pytest.raises(InvalidInputError) as e:
        get_profile(bad)
    assert e.value.field.split(".")[0] == "device_profile"  # and the bad figure: device_profile.int8_tops
    with pytest.raises(InvalidInputError):
        CostModel(make_space(), profile=bad)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"seq_len": 0}, "seq_len"),
        ({"seq_len": 1.5}, "seq_len"),
        ({"batch": -1}, "batch"),
        ({"act_bits": 0}, "act_bits"),
        ({"act_bits": 64}, "act_bits"),
        ({"act_bits": True}, "act_bits"),
    ],
)
def test_bad_model_arguments(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInputError) as e:
        CostModel(make_space(), **kwargs)
    assert e.value.field == field


def test_bad_maps() -> None:
    space = SearchSpace(groups=(LAYER, HEAD), options=(OPTIONS, (BitOption(4), BitOption(8))))
    model = CostModel(space)
    for bad in (
        PrecisionMap({LAYER.name: 4}),  # a group missing
        PrecisionMap({LAYER.name: 4, HEAD.name: 2}),  # an option the group does not allow
        PrecisionMap({LAYER.name: 4, HEAD.name: 4, "blk9.fc": 4}),  # a group outside the space
    ):
        with pytest.raises(InvalidInputError) as e:
            model.cost(bad)
        assert e.value.field == "precision_map"
    with pytest.raises(InvalidInputError):
        model.cost({LAYER.name: "4x", HEAD.name: 4})
    bad_choices: list[list[Any]] = [[0], [0, 2], [-1, 0], [0.5, 0], [True, 0]]
    for choices in bad_choices:
        with pytest.raises(InvalidInputError) as e:
            model.cost_of_choices(choices)
        assert e.value.field == "precision_map"
    assert model.cost({LAYER.name: "4", HEAD.name: {"bits": 8}}) == model.cost_of_choices(
        [OPTIONS.index(BitOption(4)), 1]
    )
