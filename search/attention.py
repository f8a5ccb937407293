"""Switching transformers models to eager attention for one computation, and back.

Two computations need the attention implementation that materialises the attention weights:
Hessian-vector products (:mod:`search.hessian`) need a double backward, which scaled-dot-product
attention kernels lack on CPU (and the fused CUDA ones); attention-map distillation
(:mod:`search.refine`) needs ``output_attentions``, which only eager attention returns.

:func:`eager_attention` switches every given model whose ``config._attn_implementation`` is not
``"eager"`` with ``model.set_attn_implementation("eager")`` and, on exit (whatever happened inside),
sets every model whose implementation differs from the one it had back to it. A model that cannot be
switched (no transformers config, or a setter that refuses) is left as it is; the
:class:`AttentionSwitch` it yields says which models run eager, so the caller chooses the fallback.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

__all__ = ["AttentionSwitch", "attn_implementation", "eager_attention"]

#: What a setter may raise for a model that cannot run the requested implementation.
_REFUSALS = (ValueError, NotImplementedError, AttributeError, ImportError)


def attn_implementation(model: nn.Module) -> str | None:
    """The model's ``config._attn_implementation`` (None when it has no transformers config)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


@dataclass(frozen=True)
class AttentionSwitch:
    """What :func:`eager_attention` found and did, one entry per model in the order given."""

    #: the implementation each model had on entry (None: not a transformers model)
    original: tuple[str | None, ...]
    #: whether each model runs eager attention inside the block
    eager: tuple[bool, ...]
    #: whether each model was switched to eager by this block (it was not eager on entry)
    switched: tuple[bool, ...]

    @property
    def ok(self) -> bool:
        """Every model runs eager attention inside the block."""
        return all(self.eager)

    @property
    def switched_to_eager(self) -> bool:
        """At least one model was switched to eager attention."""
        return any(self.switched)


@contextmanager
def eager_attention(models: Sequence[nn.Module]) -> Iterator[AttentionSwitch]:
    """Run the block with every model of ``models`` on eager attention where it can be switched, and
    restore each model's original implementation on exit (see the module docstring)."""
    models = list(models)
    original = tuple(attn_implementation(m) for m in models)
    try:
        for m, orig in zip(models, original, strict=True):
            if orig == "eager":
                continue
            setter = getattr(m, "set_attn_implementation", None)
            if orig is not None and callable(setter):
                try:
                    setter("eager")
                except _REFUSALS:
                    pass
        eager = tuple(attn_implementation(m) == "eager" for m in models)
        switched = tuple(e and o != "eager" for e, o in zip(eager, original, strict=True))
        yield AttentionSwitch(original, eager, switched)
    finally:
        for m, orig in reversed(list(zip(models, original, strict=True))):
            if orig is not None and attn_implementation(m) != orig:
                m.set_attn_implementation(orig)  # type: ignore[operator]
