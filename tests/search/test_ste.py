"""The straight-through primitives shared by DNAS and refinement: exact forward values, exact
backward gradients."""

from __future__ import annotations

import torch

from search.ste import half_ste, round_ste, scaled_grad


def test_round_ste_rounds_half_to_even_forward_and_passes_the_gradient_through():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.49, 0.5, 1.5, 2.5, 2.51, 7.0], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [-2.0, -2.0, -0.0, 0.0, 0.0, 2.0, 2.0, 3.0, 7.0]
    w = torch.arange(1.0, 10.0)
    (y * w).sum().backward()
    assert torch.equal(x.grad, w)


def test_half_ste_is_the_float16_value_forward_and_identity_backward():
    x = torch.tensor([1.0 + 2.0**-12, 1.0 + 2.0**-10, 65504.0, 2.0**-24, 0.1], dtype=torch.float32, requires_grad=True)
    y = half_ste(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, x.detach().to(torch.float16).to(torch.float32))
    assert y[0].item() == 1.0 and y[1].item() == 1.0 + 2.0**-10  # below / at float16's resolution near 1
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(5))


def test_scaled_grad_keeps_the_value_and_scales_the_gradient():
    x = torch.tensor([0.3, -1.25, 4.0], requires_grad=True)
    y = scaled_grad(x, 0.125)
    assert torch.equal(y, x.detach())
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 0.125))
