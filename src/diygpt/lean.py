"""The book's GELU and dropout with less kept for backward, bit for bit the same numbers.

Autograd keeps what each elementary op needs: the book's GELU formula keeps four tensors of
its input's size (the input, ``tanh``'s output, ``0.5 * x`` and ``1 + tanh``), and dropout
on the CPU keeps its float noise. For book-124m's batch that is 302 MB and 115 MB of the
~980 MB a training forward pass keeps. Here:

- :class:`LeanGELU` keeps only the input and recomputes the rest in backward, then applies
  the same backward formulas autograd would, in the order its engine runs them (the three
  gradients reaching ``x`` are summed as its input buffer sums them).
- :class:`LeanDropout` draws its noise as ``F.dropout`` does on the CPU (``bernoulli_``
  then ``div_``, same RNG use) and keeps a bool mask, from which backward remakes the noise.

:func:`lean_activations` puts them on a model's GELU and dropout modules from outside (the
instances' ``forward``); ``diygpt train`` does so on the CPU unless it compiles.
tests/test_lean.py checks outputs, gradients and RNG state against the book's modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diygpt.model import _SQRT_2_OVER_PI, GELU


class LeanGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return GELU.forward(None, x)  # the book's formula, op for op

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        half_x = 0.5 * x
        t = torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3)))
        grad_half_x, grad_t = grad * (1 + t), grad * half_x  # y = (0.5 x) * (1 + t)
        grad_inner = torch.ops.aten.tanh_backward(grad_t, t) * _SQRT_2_OVER_PI
        grad_cube = grad_inner * 0.044715
        # pow's backward is grad * (3 * x^2); x's buffer sums the inner, cube, half-x parts
        return (grad_inner + grad_cube * (3.0 * x.pow(2.0))) + grad_half_x * 0.5


class LeanDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        noise = torch.empty_like(x, memory_format=torch.contiguous_format).bernoulli_(1 - p)
        noise.div_(1 - p)
        ctx.save_for_backward(noise != 0)  # 1 byte an element instead of 4
        ctx.p = p
        return x * noise

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (kept,) = ctx.saved_tensors
        return grad * kept.to(grad.dtype).div_(1 - ctx.p), None


def _gelu(x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return LeanGELU.apply(x)
    return GELU.forward(None, x)


def _dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    if (module.training and 0 < module.p < 1 and torch.is_grad_enabled() and x.requires_grad
            and x.device.type == "cpu"):  # CUDA's fused dropout draws differently
        return LeanDropout.apply(x, module.p)
    return F.dropout(x, module.p, module.training, module.inplace)


def lean_activations(model: nn.Module) -> nn.Module:
    """Use LeanGELU and LeanDropout in ``model``'s GELU and ``nn.Dropout`` modules.

    Parameters, state_dict and classes are untouched; only the instances' ``forward``.
    """
    for module in model.modules():
        if isinstance(module, GELU):
            module.forward = _gelu
        elif isinstance(module, nn.Dropout):
            module.forward = _dropout.__get__(module)
    return model
