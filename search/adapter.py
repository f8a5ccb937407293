"""The model adapter: from any transformers model to a search space, and precision maps back onto it.

The adapter finds, without any architecture's module paths written in:

* the *transformer blocks*: the children of the largest ``nn.ModuleList`` whose children share one
  class and hold linear layers (``encoder.layer``, ``model.layers``, ``transformer.h``...);
* the *quantizable matrices*: ``nn.Linear`` and GPT-2's ``Conv1D`` (seen transposed, so every matrix is
  ``[out_features, in_features]``), and ``nn.Embedding`` when embeddings are included;
* the *head*: linear layers outside every block (pooler, classifier, ``lm_head``), excluded by default.

Granularity ``layer`` gives one group per matrix. Granularity ``group`` recognises, in every block,
the attention projections (by shape against the config's head counts, and by the usual projection
names for q/k/v) and the feed-forward projections (by the intermediate size), and makes one group per
attention head (per key/value head under grouped-query attention) spanning the head's rows of q, k, v
and its columns of the output projection, and one group per block of FFN neurons spanning the rows of
the up (and gate) projection and the columns of the down projection. Where the structure is not
recognised the block falls back to ``layer`` groups with a warning.

Ties (:meth:`ModelAdapter.find_siblings`, ``build_space(tie=...)``) are found structurally too: one
forward pass of eight tokens, hooked at every linear layer, groups the matrices of a block that read
the very same input tensor, and the autograd graph says which matrix consumes their outputs and
whether an attention operation lies in between (q/k/v: ``attention_inputs``; gate/up:
``ffn_inputs``). A tie applies to whole-matrix groups; a head or FFN group already spans its rows of
every sibling.
"""

from __future__ import annotations

import fnmatch
import hashlib
import inspect
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from bitscout import options as options_grammar
from search import quant
from search import tensor_train as tt
from search.actquant import StaticScales, activations_quantized, calibrate_static
from search.errors import InvalidInputError, UnsupportedModelError
from search.memory import OutputStore
from search.space import (
    FULL_PRECISION,
    BitOption,
    Granularity,
    Group,
    Member,
    PrecisionMap,
    PruneLimits,
    SearchSpace,
    Tie,
    check_option_fits,
    tt_fit_problem,
)

log = logging.getLogger(__name__)

Role = Literal["block", "head", "embedding"]

_Q_NAMES = {"query", "q_proj", "q_lin", "q", "wq", "query_proj"}
_K_NAMES = {"key", "k_proj", "k_lin", "k", "wk", "key_proj"}
_V_NAMES = {"value", "v_proj", "v_lin", "v", "wv", "value_proj"}
_FUSED_QKV_NAMES = {"c_attn", "qkv_proj", "qkv", "in_proj"}


class WeightCache:
    """Fake-quantized weight blocks kept per (member slice, option, clip), so that measuring many maps
    quantizes each (group, option) once (:meth:`ModelAdapter.quantized` with ``cache=``).

    Valid only while the model's weights are the ones the blocks were quantized from: the search's
    own model, whose weights :meth:`ModelAdapter.quantized` restores exactly on exit. At most
    ``limit_bytes`` are kept (blocks beyond it are quantized again each time). A pickled cache (a
    search shipped to another process) arrives empty."""

    def __init__(self, limit_bytes: int = 2 << 30) -> None:
        self.limit_bytes = int(limit_bytes)
        self.blocks: dict[tuple[Any, ...], torch.Tensor] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[Any, ...], make: Any) -> torch.Tensor:
        """The block cached under ``key``, or ``make()`` (kept while the limit allows)."""
        got = self.blocks.get(key)
        if got is not None:
            self.hits += 1
            return got
        self.misses += 1
        value = make()
        size = value.numel() * value.element_size()
        if self.bytes + size <= self.limit_bytes:
            self.blocks[key] = value
            self.bytes += size
        return value

    def clear(self) -> None:
        self.blocks.clear()
        self.bytes = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"limit_bytes": self.limit_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["limit_bytes"])  # type: ignore[misc]


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D: weight [in, out], y = x @ W + b
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


@dataclass(frozen=True)
class MatrixInfo:
    """One quantizable matrix: its module name, ``(out, in)`` shape, kind and where it lives."""

    name: str
    shape: tuple[int, int]
    kind: Literal["linear", "conv1d", "embedding"]
    role: Role
    block: int
    has_bias: bool

    @property
    def n_params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def macs_per_token(self) -> int:
        return 0 if self.kind == "embedding" else self.n_params


class ModelAdapter:
    """Wraps a transformers ``PreTrainedModel`` (or any ``nn.Module`` built of transformer blocks).

    ``include`` / ``exclude`` are glob patterns on module names (``*`` matches dots too); a matrix is
    selected when it matches some ``include`` pattern (all match when None) and no ``exclude``
    pattern. The head and the embeddings are excluded unless ``include_head`` /
    ``include_embeddings``. Weights tied to a matrix already selected are skipped.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        include_head: bool = False,
        include_embeddings: bool = False,
    ) -> None:
        self.model = model
        self.config = getattr(model, "config", None)
        #: the scales of :meth:`fake_quantized`: (slice, option, clip) -> (digest of the slice, qparams)
        self._qparams: dict[tuple[Any, ...], tuple[bytes, quant.QParams]] = {}
        self._modules = dict(model.named_modules())
        self.block_list_name, self.blocks = self._find_blocks()
        self.matrices: dict[str, MatrixInfo] = {}
        seen: set[int] = set()
        included = 0  # matrices the include patterns select, before the exclude patterns
        for name, module in model.named_modules():
            info = self._matrix_info(name, module)
            if info is None:
                continue
            if info.role == "head" and not include_head:
                continue
            if info.role == "embedding" and not include_embeddings:
                continue
            if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
                continue
            included += 1
            if exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude):
                continue
            ptr = module.weight.data_ptr()
            if ptr in seen:
                log.info("skipping %s: its weight is tied to a matrix already selected", name)
                continue
            seen.add(ptr)
            self.matrices[name] = info
        if not self.matrices:
            if included:
                raise InvalidInputError(
                    f"the exclude patterns leave out all {included} matrices the selection holds", field="exclude"
                )
            raise InvalidInputError(
                "no quantizable matrix matches the selection (check include/exclude patterns)", field="include"
            )

    # ------------------------------------------------------------------ structure
    def _find_blocks(self) -> tuple[str, list[str]]:
        best: tuple[int, str, list[str]] | None = None
        for name, module in self.model.named_modules():
            if not isinstance(module, nn.ModuleList) or len(module) == 0:
                continue
            classes = {type(child) for child in module}
            if len(classes) != 1:
                continue
            if not any(isinstance(m, nn.Linear) or _is_conv1d(m) for m in module[0].modules()):
                continue
            n_params = sum(p.numel() for p in module.parameters())
            if best is None or n_params > best[0]:
                best = (n_params, name, [f"{name}.{i}" for i in range(len(module))])
        if best is None:
            raise UnsupportedModelError(
                "no transformer blocks found (no list of identical modules holding linear layers)", field="model"
            )
        return best[1], best[2]

    def block_of(self, name: str) -> int | None:
        for i, b in enumerate(self.blocks):
            if name == b or name.startswith(b + "."):
                return i
        return None

    def _matrix_info(self, name: str, module: nn.Module) -> MatrixInfo | None:
        if isinstance(module, nn.Linear):
            kind: Literal["linear", "conv1d", "embedding"] = "linear"
            shape = (module.out_features, module.in_features)
        elif _is_conv1d(module):
            kind = "conv1d"
            shape = (int(module.weight.shape[1]), int(module.weight.shape[0]))
        elif isinstance(module, nn.Embedding):
            kind = "embedding"
            shape = (module.num_embeddings, module.embedding_dim)
        else:
            return None
        block = self.block_of(name)
        if kind == "embedding":
            role: Role = "embedding"
            block_idx = -1
        elif block is None:
            role = "head"
            block_idx = len(self.blocks)
        else:
            role = "block"
            block_idx = block
        has_bias = getattr(module, "bias", None) is not None
        return MatrixInfo(name, shape, kind, role, block_idx, has_bias)

    # ------------------------------------------------------------------ tensors
    def module(self, name: str) -> nn.Module:
        return self._modules[name]

    def weight(self, name: str) -> torch.Tensor:
        """The matrix as an ``[out, in]`` view of the parameter (writes go to the model)."""
        module = self._modules[name]
        w = module.weight
        return w.t() if _is_conv1d(module) else w

    def bias(self, name: str) -> torch.Tensor | None:
        b = getattr(self._modules[name], "bias", None)
        return b if isinstance(b, torch.Tensor) else None

    def member_slice(self, m: Member) -> torch.Tensor:
        w = self.weight(m.module)
        if m.axis == "out":
            return w[m.start : m.stop]
        if m.axis == "in":
            return w[:, m.start : m.stop]
        return w

    def group_params(self, group: Group) -> list[tuple[torch.nn.Parameter, Any]]:
        """``(parameter, index)`` pairs addressing the group's weights in each parameter's own layout
        (``param[index]`` is the block), used by methods that need gradients per group."""
        out = []
        for m in group.members:
            module = self._modules[m.module]
            p = module.weight
            conv = _is_conv1d(module)
            if m.axis == "all":
                idx: Any = (slice(None), slice(None))
            elif m.axis == "out":
                idx = (slice(None), slice(m.start, m.stop)) if conv else (slice(m.start, m.stop), slice(None))
            else:
                idx = (slice(m.start, m.stop), slice(None)) if conv else (slice(None), slice(m.start, m.stop))
            out.append((p, idx))
        return out

    # ------------------------------------------------------------------ space
    def _config_int(self, *names: str) -> int | None:
        cfg = self.config
        for n in names:
            v = getattr(cfg, n, None) if cfg is not None else None
            if isinstance(v, int) and v > 0:
                return v
        return None

    def _block_groups(self, block: int, names: list[str], ffn_block_size: int) -> list[Group] | None:
        """Sub-layer groups of one block, or None when its structure is not recognised."""
        hidden = self._config_int("hidden_size", "d_model", "n_embd", "dim")
        n_heads = self._config_int("num_attention_heads", "n_head", "n_heads")
        if hidden is None or n_heads is None:
            return None
        head_dim = self._config_int("head_dim") or hidden // n_heads
        n_kv = self._config_int("num_key_value_heads") or n_heads
        if n_heads % n_kv:
            return None
        q_out, kv_out = n_heads * head_dim, n_kv * head_dim
        infos = [self.matrices[n] for n in names]
        leaf = {i.name: i.name.rsplit(".", 1)[-1] for i in infos}
        q = [i for i in infos if leaf[i.name] in _Q_NAMES and i.shape == (q_out, hidden)]
        k = [i for i in infos if leaf[i.name] in _K_NAMES and i.shape == (kv_out, hidden)]
        v = [i for i in infos if leaf[i.name] in _V_NAMES and i.shape == (kv_out, hidden)]
        fused = [
            i for i in infos if leaf[i.name] in _FUSED_QKV_NAMES and i.shape == (q_out + 2 * kv_out, hidden)
        ]
        used: set[str] = set()
        groups: list[Group] = []
        if len(q) == 1 and len(k) == 1 and len(v) == 1:
            qkv = [q[0], k[0], v[0]]
        elif len(fused) == 1:
            qkv = [fused[0]]
        else:
            qkv = []
        o = None
        if qkv:
            after = names.index(qkv[-1].name)
            for n in names[after + 1 :]:
                i = self.matrices[n]
                if i.shape == (hidden, q_out):
                    o = i
                    break
        rep = n_heads // n_kv
        if qkv and o is not None:
            prefix = _common_prefix([i.name for i in qkv] + [o.name])
            for h in range(n_kv):
                members: list[Member] = []
                if len(qkv) == 3:
                    members.append(Member(qkv[0].name, qkv[0].shape, "out", h * rep * head_dim, (h + 1) * rep * head_dim))
                    members.append(Member(qkv[1].name, qkv[1].shape, "out", h * head_dim, (h + 1) * head_dim))
                    members.append(Member(qkv[2].name, qkv[2].shape, "out", h * head_dim, (h + 1) * head_dim))
                else:
                    f = qkv[0]
                    members.append(Member(f.name, f.shape, "out", h * rep * head_dim, (h + 1) * rep * head_dim))
                    members.append(Member(f.name, f.shape, "out", q_out + h * head_dim, q_out + (h + 1) * head_dim))
                    members.append(
                        Member(f.name, f.shape, "out", q_out + kv_out + h * head_dim, q_out + kv_out + (h + 1) * head_dim)
                    )
                members.append(Member(o.name, o.shape, "in", h * rep * head_dim, (h + 1) * rep * head_dim))
                groups.append(self._make_group(f"{prefix}/head{h}", "head", members, block, prefix, h))
            used.update(i.name for i in qkv)
            used.add(o.name)
        else:
            return None
        # Feed-forward: up (and gate) [I, hidden], down [hidden, I].
        inter = self._config_int("intermediate_size", "n_inner", "hidden_dim", "ffn_dim") or 4 * hidden
        ups = [i for i in infos if i.name not in used and i.shape == (inter, hidden)]
        downs = [i for i in infos if i.name not in used and i.shape == (hidden, inter)]
        if ups and len(downs) == 1 and len(ups) <= 2:
            down = downs[0]
            prefix = _common_prefix([u.name for u in ups] + [down.name])
            size = max(1, min(ffn_block_size, inter))
            for j, start in enumerate(range(0, inter, size)):
                stop = min(inter, start + size)
                members = [Member(u.name, u.shape, "out", start, stop) for u in ups]
                members.append(Member(down.name, down.shape, "in", start, stop))
                groups.append(self._make_group(f"{prefix}/ffn{j}", "ffn", members, block, prefix, j))
            used.update(u.name for u in ups)
            used.add(down.name)
        for n in names:
            if n not in used:
                groups.append(self._layer_group(self.matrices[n]))
        return groups

    def _make_group(
        self, name: str, kind: Literal["head", "ffn"], members: list[Member], block: int, parent: str, index: int
    ) -> Group:
        bias = sum(
            (m.out_channels if m.axis == "out" else 0) for m in members if self.matrices[m.module].has_bias
        )
        macs = sum(m.n_params for m in members)
        return Group(name, kind, tuple(members), block, parent, index, macs, bias)

    def _layer_group(self, info: MatrixInfo) -> Group:
        member = Member(info.name, info.shape, "all")
        bias = info.shape[0] if info.has_bias else 0
        return Group(info.name, "layer", (member,), info.block, info.name, None, info.macs_per_token, bias)

    def build_space(
        self,
        *,
        granularity: Granularity = "layer",
        bits: Iterable[int | str | BitOption] = (2, 3, 4, 8, 32),
        symmetric: bool = True,
        ffn_block_size: int = 64,
        prune_limits: PruneLimits | None = None,
        tie: Iterable[str] = (),
        strict: bool = True,
        tt_ranks: Iterable[int] = (),
    ) -> SearchSpace:
        """The groups at ``granularity`` and the options each may take.

        ``bits`` lists the options (ints, strings of the grammar of :mod:`bitscout.options` such as
        ``"4a"`` or ``"4g128"``, or BitOptions); those whose spelling names no grid take ``symmetric``.
        Pruning (0) applies to sub-layer groups only: ``layer`` groups never take it.
        Full precision (32) is always allowed so that every budget sweep can reach the unquantized model.
        Activation widths (``"4a8"``) apply to matrices that read activations: an embedding takes the
        option's weights alone (its input is token ids).
        A group-wise option whose group size does not fit a group's columns is refused
        (:class:`InvalidInputError`, ``space.bits``); with ``strict=False`` that group goes without it.
        ``tie`` names the tie kinds (:data:`bitscout.options.TIE_KINDS`, or their short names ``qkv``,
        ``gate_up``): the sibling projections of each block found by :meth:`find_siblings` that are
        whole-matrix groups are tied to one option (at ``group`` granularity a head already spans its
        rows of q, k and v, and an FFN group its rows of gate and up).
        ``tt_ranks`` adds a tensor-train option ``tt<r>@<b>`` for every rank ``r`` and every width (and
        grid) ``b`` of ``bits`` but pruning (group-wise options give their width), and tensor-train
        options may be named in ``bits`` too. They go to whole-matrix groups whose rank fits
        (:func:`search.space.tt_fit_problem`) and whose weight no other module shares; tied groups get
        the tensor-train options all of them take. A rank that fits no group is refused
        (``space.tt_ranks``).
        """
        if granularity not in ("layer", "group"):
            raise InvalidInputError(f"granularity must be 'layer' or 'group', got {granularity!r}", field="granularity")
        if isinstance(ffn_block_size, bool) or not isinstance(ffn_block_size, int) or ffn_block_size < 1:
            raise InvalidInputError("ffn_block_size must be a positive integer", field="ffn_block_size")
        try:
            tie_kinds = options_grammar.parse_ties(list(tie) if not isinstance(tie, str) else tie)
        except options_grammar.OptionSyntaxError as exc:
            raise InvalidInputError(str(exc), field="space.tie") from None
        parsed: list[BitOption] = [BitOption.parse(b, symmetric=symmetric) for b in bits]
        options = [o for o in parsed if not o.is_tt]
        if not options:
            raise InvalidInputError("at least one bit-width is required", field="bits")
        options.append(FULL_PRECISION)
        ranks = _check_tt_ranks(tt_ranks)
        tt_opts = sorted(
            {o for o in parsed if o.is_tt}
            | {BitOption(o.bits, o.symmetric, None, tt_rank=r) for r in ranks for o in parsed if not o.is_tt and not o.pruned}
        )
        opts_all = tuple(sorted(set(options)))
        opts_layer = tuple(o for o in opts_all if not o.pruned)
        by_block: dict[int, list[str]] = {}
        for name, info in self.matrices.items():
            by_block.setdefault(info.block, []).append(name)
        groups: list[Group] = []
        fell_back: list[int] = []
        for block in sorted(by_block):
            names = by_block[block]
            sub = None
            if granularity == "group" and 0 <= block < len(self.blocks):
                sub = self._block_groups(block, names, ffn_block_size)
                if sub is None:
                    fell_back.append(block)
            groups.extend(sub if sub is not None else [self._layer_group(self.matrices[n]) for n in names])
        if fell_back:
            log.warning(
                "sub-layer structure not recognised in blocks %s: they use one group per matrix (granularity 'layer')",
                fell_back,
            )
        group_options = []
        for g in groups:
            allowed = opts_all if g.kind != "layer" else opts_layer
            if not strict:
                allowed = tuple(o for o in allowed if check_option_fits(g, o) is None)
            if any(self.matrices[m].kind == "embedding" for m in g.modules):
                allowed = tuple(sorted({o.weight_only for o in allowed}))  # an embedding's input is token ids
            group_options.append(allowed)
        if any(not o for o in group_options):
            raise InvalidInputError("no allowed bit-width besides pruning for whole-matrix groups", field="bits")
        ties = self._ties(groups, tie_kinds) if tie_kinds else ()
        if tt_opts:
            group_options = self._with_tt(groups, group_options, tt_opts, ties)
        total = sum(p.numel() for p in self.model.parameters())
        in_groups = sum(g.n_params for g in groups)
        other_macs = 0
        for name, module in self.model.named_modules():
            info = self._matrix_info(name, module)
            if info is not None and name not in self.matrices and info.kind != "embedding":
                other_macs += info.macs_per_token
        return SearchSpace(
            groups=tuple(groups),
            options=tuple(group_options),
            granularity=granularity,
            other_params=total - in_groups,
            other_bits=32,
            other_macs_per_token=other_macs,
            n_blocks=len(self.blocks),
            prune_limits=prune_limits or PruneLimits(),
            ties=ties,
        )

    def _with_tt(
        self,
        groups: Sequence[Group],
        group_options: list[tuple[BitOption, ...]],
        tt_opts: Sequence[BitOption],
        ties: Sequence[Tie],
    ) -> list[tuple[BitOption, ...]]:
        """``group_options`` with the tensor-train options each group takes (see :meth:`build_space`)."""
        shared = self._shared_weights()
        fits: dict[str, set[BitOption]] = {}
        why: dict[int, str] = {}
        for g in groups:
            ok: set[BitOption] = set()
            for o in tt_opts:
                problem = tt_fit_problem(g, int(o.tt_rank))  # type: ignore[arg-type]
                if problem is None and g.members[0].module in shared:
                    problem = f"{g.members[0].module} shares its weight with another module"
                if problem is None:
                    ok.add(o)
                else:
                    why.setdefault(int(o.tt_rank), problem)  # type: ignore[arg-type]
            fits[g.name] = ok
        for t in ties:
            common = set.intersection(*(fits[n] for n in t.groups))
            for n in t.groups:
                fits[n] = common
        used = {int(o.tt_rank) for ok in fits.values() for o in ok}  # type: ignore[arg-type]
        for r in sorted({int(o.tt_rank) for o in tt_opts}):  # type: ignore[arg-type]
            if r not in used:
                raise InvalidInputError(
                    f"tensor-train rank {r} fits no matrix of the space: {why.get(r, 'no whole-matrix group')}",
                    field="space.tt_ranks",
                )
        return [tuple(sorted(set(opts) | fits[g.name])) for g, opts in zip(groups, group_options, strict=True)]

    def _shared_weights(self) -> set[str]:
        """Selected matrices whose weight another module of the model also holds (tied weights)."""
        holders: dict[int, set[str]] = {}
        for name, module in self.model.named_modules(remove_duplicate=False):
            w = getattr(module, "weight", None)
            if isinstance(w, torch.Tensor):
                holders.setdefault(w.data_ptr(), set()).add(name)
        out = set()
        for name in self.matrices:
            if len(holders.get(self.weight(name).data_ptr(), ())) > 1:
                out.add(name)
        return out

    # ------------------------------------------------------------------ ties
    def _ties(self, groups: Sequence[Group], kinds: Sequence[str]) -> tuple[Tie, ...]:
        """The ties of ``kinds`` among whole-matrix groups: one per sibling set of :meth:`find_siblings`
        whose matrices are all ``layer`` groups of their own (siblings split into head or FFN groups are
        already tied slice by slice: each such group spans the same rows of every sibling)."""
        whole = {g.members[0].module: g.name for g in groups if g.kind == "layer" and g.members[0].axis == "all"}
        order = {g.name: i for i, g in enumerate(groups)}
        out = []
        for kind, modules in self.find_siblings():
            if kind not in kinds:
                continue
            names = [whole.get(m) for m in modules]
            present = [n for n in names if n is not None]
            if len(present) < 2:
                continue
            if len(present) < len(names):
                log.info("tie %s of %s: only %s are whole-matrix groups of the space", kind, modules, present)
            out.append(Tie(kind, tuple(sorted(present, key=order.__getitem__))))  # type: ignore[arg-type]
        return tuple(out)

    def find_siblings(self) -> list[tuple[str, tuple[str, ...]]]:
        """The sibling projections of every block, found structurally (no module names): matrices of
        one block that read the very same input tensor, split by the matrix that consumes their
        outputs. Returns ``(kind, module names)`` for each set of two or more:
        ``attention_inputs`` when an attention operation (a softmax or a fused scaled-dot-product
        kernel) lies between the siblings and their consumer (q/k/v and the output projection),
        ``ffn_inputs`` otherwise (gate/up and the down projection).

        Runs the model once on a probe batch of eight tokens with gradients on (the autograd graph is
        what links a consumer's input to the siblings' outputs); the weights and the ``requires_grad``
        flags are left as they were. Raises :class:`UnsupportedModelError` (``space.tie``) when the
        model cannot run on token ids alone.
        """
        cached = self.__dict__.get("_siblings")
        if cached is None:
            cached = self._trace_siblings()
            self.__dict__["_siblings"] = cached
        return list(cached)

    def _trace_siblings(self) -> list[tuple[str, tuple[str, ...]]]:
        linears = {
            name: m for name, m in self.model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)
        }
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}

        def pre(name: str) -> Any:
            def hook(module: nn.Module, args: Any) -> None:
                if args and isinstance(args[0], torch.Tensor) and name not in inputs:
                    inputs[name] = args[0]
            return hook

        def post(name: str) -> Any:
            def hook(module: nn.Module, args: Any, out: Any) -> None:
                if isinstance(out, torch.Tensor) and name not in outputs:
                    outputs[name] = out
            return hook

        handles = []
        for name, m in linears.items():
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post(name)))
        params = list(self.model.parameters())
        flags = [p.requires_grad for p in params]
        was_training = self.model.training
        try:
            for p in params:
                if p.is_floating_point():
                    p.requires_grad_(True)
            self.model.eval()
            with torch.inference_mode(False), torch.enable_grad():
                self.model(**self._probe_inputs())
        except Exception as exc:
            raise UnsupportedModelError(
                f"cannot run the model on a probe batch to find its fused projections ({type(exc).__name__}: {exc}); "
                "turn ties off (tie 'none')",
                field="space.tie",
            ) from exc
        finally:
            for h in handles:
                h.remove()
            for p, f in zip(params, flags, strict=True):
                p.requires_grad_(f)
            self.model.train(was_training)
        # the output nodes are held by ``nodes`` while the graph is walked, so their ids stay theirs
        nodes = {name: t.grad_fn for name, t in outputs.items() if t.grad_fn is not None}
        producers = {id(n): name for name, n in nodes.items()}
        # the siblings: selected block matrices by the tensor they read
        by_input: dict[int, list[str]] = {}
        for name in self.matrices:
            info = self.matrices[name]
            if info.role == "block" and name in inputs:
                by_input.setdefault(id(inputs[name]), []).append(name)
        sibling_sets = [names for names in by_input.values() if len(names) > 1]
        if not sibling_sets:
            return []
        sources = {name: _sources(inputs[name], producers) for name in linears if name in inputs}
        order = {name: i for i, name in enumerate(linears)}
        out: list[tuple[str, tuple[str, ...]]] = []
        for siblings in sibling_sets:
            left = set(siblings)
            for consumer in sorted(sources, key=order.__getitem__):
                found, attention = sources[consumer]
                part = found & left
                if len(part) < 2:
                    continue
                kind = "attention_inputs" if attention else "ffn_inputs"
                out.append((kind, tuple(sorted(part, key=order.__getitem__))))
                left -= part
        return out

    def _probe_inputs(self) -> dict[str, Any]:
        """Eight token ids (and their attention mask) on the model's device."""
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        vocab = self._config_int("vocab_size") or 2
        ids = (torch.arange(8, device=device) % max(1, min(vocab, 64))).unsqueeze(0)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        try:
            if "use_cache" in inspect.signature(self.model.forward).parameters:
                kwargs["use_cache"] = False
        except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
            pass
        return kwargs

    # ------------------------------------------------------------------ applying maps
    def _write_group(self, group: Group, option: BitOption, clip: str, cache: WeightCache | None = None) -> None:
        """Write ``option``'s weights of ``group`` into the model (a tensor-train option: the dense
        matrix its quantized cores stand for, :func:`search.tensor_train.option_weight`); with
        ``cache``, an integer option's blocks are quantized once and copied in afterwards."""
        for m in group.members:
            self.write_member(m, option, clip, cache)

    def write_member(self, m: Member, option: BitOption, clip: str, cache: WeightCache | None = None) -> None:
        """Write ``option``'s weights of one member slice into the model (see :meth:`_write_group`)."""
        block = self.member_slice(m)
        if option.is_tt:
            block.copy_(
                tt.option_weight(block, int(option.tt_rank), option.bits, symmetric=option.symmetric, clip=clip)  # type: ignore[arg-type]
            )
        elif option.pruned:
            block.zero_()
            self.prune_bias(m)
        elif option.bits != 32:

            def make() -> torch.Tensor:
                return self.fake_quantized(m, option, clip)

            key = (m.module, m.axis, m.start, m.stop, option.key(), clip)
            block.copy_(make() if cache is None else cache.get(key, make))

    def prune_bias(self, m: Member) -> None:
        """Zero the bias entries that follow a pruned member: its rows (``out``), all (``all``), none (``in``)."""
        b = self.bias(m.module)
        if b is not None and m.axis in ("out", "all"):
            (b[m.start : m.stop] if m.axis == "out" else b).zero_()

    @torch.no_grad()
    def fake_quantized(self, m: Member, option: BitOption, clip: str) -> torch.Tensor:
        """:func:`search.quant.fake_quantize` of the member slice ``m`` at ``option`` (an integer or
        16-bit width), to the last bit, with an integer width's scales chosen once per distinct
        slice: choosing them (the MSE clip search quantizes the slice once per clip ratio) costs
        twenty times applying them, and every map and probe of a search quantizes the same
        original weights. The scales are kept per (slice, option, clip) with a digest of the
        slice's bytes, and chosen again whenever the slice no longer has those bytes (weights
        changed by refinement, or a slice already written), so a stale scale is never used."""
        block = self.member_slice(m).detach()
        if not option.is_integer:
            return quant.fake_quantize(block, option.bits, symmetric=option.symmetric, clip=clip)  # type: ignore[arg-type]
        key = (m.module, m.axis, m.start, m.stop, option.bits, option.symmetric, option.group_size, clip)
        digest = _digest(block)
        hit = self._qparams.get(key)
        if hit is not None and hit[0] == digest:
            qp = hit[1]
        else:
            qp = quant.choose_qparams(
                block, option.bits, symmetric=option.symmetric, clip=clip, group_size=option.group_size  # type: ignore[arg-type]
            )
            self._qparams[key] = (digest, qp)
        return quant.dequantize(quant.quantize(block, qp), qp, dtype=block.dtype)

    def _touched(self, pmap: PrecisionMap, space: SearchSpace) -> list[str]:
        mods: dict[str, None] = {}
        for g in space.groups:
            opt = pmap.get(g.name, FULL_PRECISION)
            if not opt.unchanged and not opt.is_tt:
                mods.update(dict.fromkeys(g.modules))
        return list(mods)

    def matrix_kind(self, name: str) -> Literal["linear", "conv1d", "embedding"]:
        """What the matrix ``name`` is: ``linear``, ``conv1d`` or ``embedding``."""
        info = self._matrix_info(name, self._modules[name])
        if info is None:
            raise InvalidInputError(f"{name} is not a quantizable matrix", field="space")
        return info.kind

    def tt_module(self, group: Group, option: BitOption, clip: str, *, cores: Sequence[torch.Tensor] | None = None) -> nn.Module:
        """The TT module that stands for ``group``'s matrix at the tensor-train ``option``: its
        quantized cores (:func:`search.tensor_train.option_cores`, or ``cores`` as given) and bias."""
        name = group.members[0].module
        w = self.weight(name).detach()
        lay = tt.layout(int(w.shape[0]), int(w.shape[1]))
        if cores is None:
            cores = tt.option_cores(w, int(option.tt_rank), option.bits, symmetric=option.symmetric, clip=clip)  # type: ignore[arg-type]
        return tt.tt_module_for(self._modules[name], self.matrix_kind(name), cores, lay).to(w.device)

    def swap_module(self, name: str, new: nn.Module) -> None:
        """Put ``new`` in the model where the module ``name`` is (the adapter keeps the original)."""
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, new)

    @torch.no_grad()
    def apply(self, pmap: PrecisionMap, space: SearchSpace, *, clip: str = "mse", cache: WeightCache | None = None) -> None:
        """Fake-quantize the model in place under ``pmap`` (groups missing from the map stay in full
        precision); a tensor-train group's module is replaced by its TT module (:meth:`tt_module`),
        which runs the factorised forward. ``cache`` keeps the quantized blocks (:class:`WeightCache`)."""
        unknown = [k for k in pmap if k not in space._index]
        if unknown:
            raise InvalidInputError(f"precision map names unknown groups: {unknown[:3]}", field="precision_map")
        for g in space.groups:
            opt = pmap.get(g.name, FULL_PRECISION)
            if opt.is_tt:
                self.swap_module(g.members[0].module, self.tt_module(g, opt, clip))
            elif not opt.unchanged:
                self._write_group(g, opt, clip, cache)

    def restore_modules(self, space: SearchSpace) -> None:
        """Put the original module back wherever :meth:`apply` placed a TT module."""
        for g in space.groups:
            name = g.members[0].module
            if g.members[0].axis == "all" and name in self._modules:
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                if getattr(parent, child) is not self._modules[name]:
                    setattr(parent, child, self._modules[name])

    @contextmanager
    def quantized(
        self, pmap: PrecisionMap, space: SearchSpace, *, clip: str = "mse", act_static: StaticScales | None = None,
        cache: WeightCache | None = None,
    ) -> Iterator[nn.Module]:
        """Context manager: the model fake-quantized under ``pmap`` (weights, and the inputs of the
        matrices whose option names activation bits: :mod:`search.actquant`, static scales
        ``act_static`` or per token), restored exactly on exit; ``cache`` keeps the quantized blocks
        for the next map (:class:`WeightCache`)."""
        saved = self.snapshot(self._touched(pmap, space))
        try:
            self.apply(pmap, space, clip=clip, cache=cache)
            with activations_quantized(self._modules, space, pmap, static=act_static):
                yield self.model
        finally:
            self.restore_modules(space)
            self.restore(saved)

    def calibrate_activations(self, space: SearchSpace, batches: Sequence[Any], forward: Any) -> StaticScales:
        """Static activation ranges of every searched matrix input over ``batches``
        (:func:`search.actquant.calibrate_static`)."""
        return calibrate_static(self.model, self._modules, space, batches, forward)

    @torch.no_grad()
    def snapshot(self, modules: Iterable[str], *, memory_bytes: int | None = None) -> WeightSnapshot:
        """The weights and biases of ``modules``, for :meth:`restore`: the first ``memory_bytes``
        (:data:`search.memory.STORE_MEMORY_BYTES` when None) in memory, the rest spilled to a temporary file
        (an :class:`search.memory.OutputStore`), so that saving a whole model's matrices before a
        map is written costs disk, not resident memory; read back exactly."""
        store = OutputStore() if memory_bytes is None else OutputStore(memory_bytes)
        index: dict[str, tuple[int, int | None]] = {}
        for name in modules:
            module = self._modules[name]
            b = getattr(module, "bias", None)
            wi = store.append(module.weight.detach())
            bi = store.append(b.detach()) if isinstance(b, torch.Tensor) else None
            index[name] = (wi, bi)
        return WeightSnapshot(store, index)

    @torch.no_grad()
    def restore(self, saved: WeightSnapshot) -> None:
        """Every weight and bias of ``saved`` written back (:meth:`snapshot`)."""
        for name, (wi, bi) in saved.index.items():
            module = self._modules[name]
            module.weight.copy_(saved.store.read(wi, device=module.weight.device))
            if bi is not None:
                module.bias.copy_(saved.store.read(bi, device=module.bias.device))


@dataclass
class WeightSnapshot:
    """Saved weights (:meth:`ModelAdapter.snapshot`): module name -> entries of ``store`` (weight,
    bias or None)."""

    store: OutputStore
    index: dict[str, tuple[int, int | None]]

    def keys(self) -> Iterable[str]:
        return self.index.keys()


def _digest(t: torch.Tensor) -> bytes:
    """A 128-bit digest of ``t``'s bytes (BLAKE2b; a few times faster than choosing its scales)."""
    data = t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(memoryview(data), digest_size=16).digest()


#: autograd nodes of an attention operation (eager softmax, fused scaled-dot-product kernels)
_ATTENTION_NODES = ("Softmax", "ScaledDotProduct", "Attention")


def _check_tt_ranks(ranks: Iterable[int]) -> tuple[int, ...]:
    out = set()
    for i, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= options_grammar.MAX_TT_RANK:
            raise InvalidInputError(
                f"a tensor-train rank is an integer from 1 to {options_grammar.MAX_TT_RANK}, got {r!r}",
                field=f"space.tt_ranks.{i}",
            )
        out.add(r)
    return tuple(sorted(out))


def _sources(x: torch.Tensor, producers: dict[int, str]) -> tuple[set[str], bool]:
    """The linear layers whose outputs the tensor ``x`` is computed from (walking its autograd graph
    back, stopping at every linear layer's output), and whether an attention operation lies on the way."""
    found: set[str] = set()
    attention = False
    root = x.grad_fn
    if root is None:
        return found, attention
    stack = [root]
    seen: dict[int, Any] = {}  # holds the visited nodes, so that no id is reused while walking
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        name = producers.get(id(node))
        if name is not None:
            found.add(name)
            continue
        if any(k in node.name() for k in _ATTENTION_NODES):
            attention = True
        stack.extend(n for n, _ in node.next_functions)
    return found, attention


def _common_prefix(names: Sequence[str]) -> str:
    parts = [n.split(".") for n in names]
    out: list[str] = []
    for seg in zip(*parts, strict=False):
        if len(set(seg)) != 1:
            break
        out.append(seg[0])
    return ".".join(out) if out else re.sub(r"\.[^.]*$", "", names[0])
