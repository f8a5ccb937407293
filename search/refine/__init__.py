"""Refinement of a chosen precision map: knowledge distillation with learned step sizes (KDLSQ).

Post-training quantization (:mod:`search.quant`) loses accuracy quickly below 4 bits. :func:`refine`
recovers it for one precision map, as KDLSQ-BERT (Jin et al. 2021) does: a *student* copy of the
model is fine-tuned with LSQ fake quantization (Esser et al. 2020, "Learned Step Size Quantization")
while the unchanged full-precision model, the *teacher*, distils into it.

What is trained
===============

=======================  ===========================================================================
group option             what the student's member slice is during training
=======================  ===========================================================================
2..8 bits (integer)      ``lsq_fake_quantize(latent, step, zero_point)``: a learned step size per
                         row of the member slice (the ``[out, in]`` layout, as :mod:`search.quant`
                         quantizes it), or per group of ``N`` columns of each row with group-wise
                         scales (steps ``[rows, cols / N]``), initialised from
                         :func:`search.quant.choose_qparams` (so step 0 *is* the post-training
                         point), gradient scaled by ``g = 1 / sqrt(n_weights_per_scale * Q_p)``,
                         rounding straight-through; the zero point of an asymmetric option stays
                         the post-training one
0 (pruned)               exactly zero: the slice (and the biases of its output channels) is masked in
                         the forward pass, so neither its value nor any gradient reaches it
16 bits                  trained through a float16 round (straight-through) unless
                         ``RefineConfig.float_groups == "freeze"``
32 bits                  trained as is unless ``float_groups == "freeze"``
not in the space         (norms, biases, embeddings and heads outside the space) trained at
                         ``lr_weights`` when ``train_other``; they stay in full precision, so the
                         costs of the map do not change
=======================  ===========================================================================

Step sizes are kept positive (clamped to ``[SCALE_EPS, SCALE_MAX]``) and rounded to float16 values in
the forward pass (straight-through; the scales of a bfloat16 weight to values of both types,
:func:`search.quant.round_scale`), so the student trains on the very grid an artifact stores.

The loss
========

``kd_logits * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` on the task output (per real
token for causal LMs; ``1 - cosine`` of the pooled outputs for embedding models), ``+ kd_hidden *`` the
mean over matching layers of the hidden-state MSE (``output_hidden_states=True``, real tokens only),
``+ kd_attention *`` the mean over layers of the attention-map MSE (``output_attentions=True``, real
query/key pairs only; this needs eager attention: both models are switched to it for the run and
switched back, and when a model cannot be switched or returns no attention maps the term is skipped
and a note says so), ``+ task *`` the task's own loss (cross-entropy) when the batches have labels
(next-token cross-entropy for causal LMs).

Determinism and checkpoints
===========================

Everything random is a function of ``(seed, step)``: step ``k`` reads the micro-batches
``k * accumulate ... (k + 1) * accumulate - 1`` of an endless stream made of one seeded permutation
of the training batches per epoch, and seeds the dropout RNG from ``(seed, k)`` (inside
:func:`torch.random.fork_rng`, so the caller's RNG is untouched). A checkpoint (every
``checkpoint_every`` steps, into ``checkpoint_dir/step-NNNNNNNN/``) holds the trainable tensors, the
optimizer state, the RNG state and the best-so-far state (``tensors.safetensors``, never a pickle) and
everything else as JSON (``state.json``, written last: a folder without it is incomplete and
ignored). :func:`refine` with a ``checkpoint_dir`` resumes from the latest complete checkpoint there and
ends bit-identical to an uninterrupted run (same device, same thread count). A checkpoint of another
map, model or configuration is refused (``checkpoint_dir``).

Early stopping evaluates the student every ``eval_every`` steps on the validation batches (the
evaluation batches unless others are given), keeps the best state by the search metric (ties broken by
the KL to the teacher where known), and stops after ``patience`` evaluations without improvement.
Selecting on the batches the result is reported on favours the refined point slightly; pass separate
``validation_batches`` for an unbiased figure.

The package: :mod:`search.refine.config` (:class:`RefineConfig`, :class:`RefineParts`),
:mod:`search.refine.student` (the parametrized student), :mod:`search.refine.losses` (the
distillation losses), :mod:`search.refine.checkpoint` (checkpoints), :mod:`search.refine.loop`
(:func:`refine`), :mod:`search.refine.result` (:class:`RefineResult`); the LSQ and straight-through
primitives are those of :mod:`search.ste`, the switch to eager attention that of
:mod:`search.attention`. Measured figures: ``docs/methods/refine.md``.
"""

from __future__ import annotations

from search.refine.checkpoint import CHECKPOINT_STATE, CHECKPOINT_TENSORS
from search.refine.config import RefineConfig, RefineParts
from search.refine.loop import refine
from search.refine.result import RefineResult
from search.refine.student import member_key
from search.ste import lsq_fake_quantize, lsq_grad_scale

__all__ = [
    "CHECKPOINT_STATE",
    "CHECKPOINT_TENSORS",
    "RefineConfig",
    "RefineParts",
    "RefineResult",
    "lsq_fake_quantize",
    "lsq_grad_scale",
    "member_key",
    "refine",
]
