"""The book's LayerNorm, GELU and dropout with less kept for backward, bit for bit the same.

Autograd keeps what each elementary op needs: the book's GELU formula keeps four tensors of
its input's size (the input, ``tanh``'s output, ``0.5 * x`` and ``1 + tanh``), dropout on
the CPU keeps its float noise, LayerNorm keeps ``x - mean`` and the normalized ``x``, and
the linear layer after each LayerNorm and GELU keeps its input. Here:

- :class:`LeanGELU` keeps only the input and recomputes the rest in backward, then applies
  the same backward formulas autograd would, in the order its engine runs them (the three
  gradients reaching ``x`` are summed as its input buffer sums them). Inside
  ``diygpt.fast_gelu.fast_gelu()`` both directions are one C pass each, with the same values.
- :class:`LeanDropout` draws its noise as ``F.dropout`` does on the CPU (``bernoulli_``
  then ``div_``, same RNG use) and keeps a bool mask, from which backward remakes the noise.
- With ``recompute`` (diygpt.recompute): LayerNorm's output and parts, GELU's output and
  attention's weights before and after dropout are not kept at all but made again in
  backward from what is kept anyway (LayerNorm's input, GELU's input, the queries and keys,
  and the dropout mask). For book-124m's batch this takes what a training forward pass
  keeps from 538 MB to 207 MB (BENCHMARKS.md, fifth and sixth passes).

:func:`lean_activations` puts them on a model's modules from outside (the instances'
``forward``); ``diygpt train`` does so on the CPU unless it compiles.
tests/test_lean.py checks outputs, gradients and RNG state against the book's modules.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from diygpt import fast_gelu
from diygpt.model import (
    GELU,
    LayerNorm,
    MultiHeadAttention,
    attention_scores,
    future_mask,
)
from diygpt.recompute import Recipe, mark, recipe, recomputing


def _gelu_parts(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(the book's GELU of x, 0.5 x, tanh's output): diygpt.fast_gelu's where it is on."""
    return fast_gelu.forward(x, parts=True) or fast_gelu.torch_parts(x)


def _mark_for_backward(out: torch.Tensor, made_by: Recipe | None) -> None:
    """Mark ``out`` as made by ``made_by``, whose result the Function's backward also reads."""
    if made_by is not None:
        made_by.uses += 1  # backward's own use
        mark(out, made_by)


class LeanGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        out = (fast_gelu.forward(x) or (GELU.forward(None, x),))[0]  # the book's values
        # The next linear layer keeps GELU's output for its weight gradient; remade from x,
        # with tanh's output, which backward needs next (made once for both).
        ctx.recipe = recipe(_gelu_parts, x)
        _mark_for_backward(out, ctx.recipe)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        made = ctx.recipe.take_cached() if ctx.recipe is not None else None
        grad_x = fast_gelu.backward(grad, x, made[2] if made is not None else None)
        if grad_x is not None:
            return grad_x
        half_x, t = made[1:] if made is not None else fast_gelu.torch_halves(x)
        return fast_gelu.torch_backward(grad, x, half_x, t)


def _noise(kept: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    return kept.to(dtype).div_(1 - p)  # F.dropout's noise: 0 or 1 / (1 - p)


def _dropout_parts(x: torch.Tensor, kept: torch.Tensor, p: float) -> tuple[torch.Tensor, ...]:
    noise = _noise(kept, p, x.dtype)
    return x * noise, noise


class LeanDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        noise = torch.empty_like(x, memory_format=torch.contiguous_format).bernoulli_(1 - p)
        noise.div_(1 - p)
        kept = noise != 0  # 1 byte an element instead of 4
        ctx.save_for_backward(kept)
        ctx.p = p
        out = x * noise
        # Attention's weights after dropout are kept by the product with the values; remade
        # from the softmax output (kept by softmax, or with eager attention itself remade)
        # and the mask, with the noise, which backward needs next.
        ctx.recipe = recipe(_dropout_parts, x, kept, p)
        _mark_for_backward(out, ctx.recipe)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (kept,) = ctx.saved_tensors
        made = ctx.recipe.take_cached() if ctx.recipe is not None else None
        return grad * (made[1] if made is not None else _noise(kept, ctx.p, grad.dtype)), None


class LeanSoftmax(torch.autograd.Function):
    """``torch.softmax(scores, -1)`` whose kept output can be marked before it is saved.

    Autograd's softmax saves its output as it makes it, before any mark; here the output is
    marked first, then saved. Backward is autograd's own formula.
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, made_by: Recipe | None) -> torch.Tensor:
        out = torch.softmax(scores, dim=-1)
        mark(out, made_by)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (out,) = ctx.saved_tensors
        return torch._softmax_backward_data(grad, out, -1, out.dtype), None


def _scores(q_rows: torch.Tensor, k_cols: torch.Tensor, mask: torch.Tensor,
            shape: tuple[int, ...]) -> torch.Tensor:
    """``attention_scores(q, k, mask)`` from the operands ``q @ k.transpose(2, 3)``
    multiplies: (B * H, T, D) and (B * H, D, L), as matmul itself lays them out."""
    scores = torch.bmm(q_rows, k_cols).view(shape)  # (B, H, T, L)
    scores.masked_fill_(mask, -torch.inf)
    return scores / q_rows.shape[-1] ** 0.5


def _attention_weights(*operands: object) -> tuple[torch.Tensor]:
    return (torch.softmax(_scores(*operands), dim=-1),)


def _eager_attention(module: MultiHeadAttention, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, start: int) -> torch.Tensor:
    """``MultiHeadAttention._eager`` whose softmax output (kept by softmax's backward and read
    by dropout's recipe) is remade in backward from the operands of the scores' product,
    which that product keeps anyway: one more small product per layer.

    ``q @ k.transpose(2, 3)`` copies its operands into (B * H, ...) batches for ``bmm``, and
    the copies are what it keeps; written out here so the recipe can read those same copies
    (the ops are matmul's own, so the numbers are unchanged).
    """
    (b, h, t, d), length = q.shape, k.shape[2]
    mask = future_mask(t, length, start, q.device)
    q_rows = q.reshape(b * h, t, d)
    k_cols = k.transpose(2, 3).reshape(b * h, d, length)
    operands = (q_rows, k_cols, mask, (b, h, t, length))
    made_by = recipe(_attention_weights, *operands)
    if made_by is None or not q.requires_grad:
        attn_weights = torch.softmax(attention_scores(q, k, mask), dim=-1)
    else:
        attn_weights = LeanSoftmax.apply(_scores(*operands), made_by)
    return module.dropout(attn_weights) @ v  # (B, H, T, D)


def _layer_norm_parts(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float,
    made_by: Recipe | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The book's LayerNorm, op for op: (output, x - mean, normalized x).

    With ``made_by``, each part is marked as its product before any op can keep it.
    """
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    centered = x - mean
    mark(centered, made_by, 1)  # kept by the division
    norm_x = centered / torch.sqrt(var + eps)
    mark(norm_x, made_by, 2)  # kept by the product with scale
    out = scale * norm_x + shift
    mark(out, made_by, 0)  # kept by the next linear layers
    return out, centered, norm_x


def _layer_norm(module: LayerNorm, x: torch.Tensor) -> torch.Tensor:
    # remade from x, which var keeps anyway
    made_by = recipe(_layer_norm_parts, x, module.scale, module.shift, module.eps)
    return _layer_norm_parts(x, module.scale, module.shift, module.eps, made_by)[0]


def _gelu(x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return LeanGELU.apply(x)
    return GELU.forward(None, x)


def _dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    if (module.training and 0 < module.p < 1 and torch.is_grad_enabled() and x.requires_grad
            and x.device.type == "cpu"):  # CUDA's fused dropout draws differently
        return LeanDropout.apply(x, module.p)
    return F.dropout(x, module.p, module.training, module.inplace)


def _forward_recomputing(forward: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    with recomputing():
        return forward(*args, **kwargs)


def lean_activations(model: nn.Module, recompute: bool = True) -> nn.Module:
    """Use LeanGELU and LeanDropout in ``model``'s GELU and ``nn.Dropout`` modules, and with
    ``recompute`` remake LayerNorm's and GELU's outputs and attention's dropped weights in
    backward.

    Parameters, state_dict and classes are untouched; only the instances' ``forward``.
    """
    for module in model.modules():
        if isinstance(module, GELU):
            module.forward = _gelu
        elif isinstance(module, nn.Dropout):
            module.forward = _dropout.__get__(module)
        elif recompute and isinstance(module, LayerNorm):
            module.forward = _layer_norm.__get__(module)
        elif recompute and isinstance(module, MultiHeadAttention):
            module._eager = _eager_attention.__get__(module)
    if recompute and getattr(model.forward, "func", None) is not _forward_recomputing:
        model.forward = functools.partial(_forward_recomputing, model.forward)
    return model
