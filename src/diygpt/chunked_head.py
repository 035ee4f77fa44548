"""The output head's two vocabulary-wide products in slices of the vocabulary (CPU, fp32).

For book-124m at batch 2 x 256 the head's products are (512, 768) x (768, 50257) forward
and (50257, 512) x (512, 768) for the weight's gradient. On a 2-core AVX-512 Xeon, MKL runs
each as one call at 218-262 GFLOP/s, against 330-355 GFLOP/s for the blocks' products. Cut
into slices of a few thousand vocabulary entries (columns forward, rows for the gradient)
they run at 317-352 GFLOP/s; slices from 1024 to 16384 entries measured alike. The compiled
fp32 training step was 0.8%, 2.6% and 4.0% faster in three runs that interleaved its steps
with the single-call head's (BENCHMARKS.md, fifteenth pass).

The slicing never splits a sum: each output element is one slice's product over the full
inner dimension, so the values are the single call's up to how the BLAS orders its own
inner loop. The input's gradient (``grad @ weight``) stays one call: it already runs at
full speed, and slicing it would split its sum over the vocabulary.

The products run inside two custom operators, so that ``torch.compile`` calls them as they
are (the slices written in place into one output) instead of tracing the loop.
:func:`chunk_head` switches a model's ``out_head`` to :class:`ChunkedHead` in place: same
parameter, same state dict, so checkpoints do not change.
"""

from __future__ import annotations

import torch
from torch import nn

CHUNK = 4096  # vocabulary entries per slice


@torch.library.custom_op("diygpt::head_forward", mutates_args=())
def head_forward(x: torch.Tensor, weight: torch.Tensor, chunk: int) -> torch.Tensor:
    """``x @ weight.T`` for x (N, C) and weight (V, C), computed in column slices of V."""
    out = x.new_empty(x.shape[0], weight.shape[0])  # (N, V)
    for start in range(0, weight.shape[0], chunk):
        stop = start + chunk
        torch.mm(x, weight[start:stop].t(), out=out[:, start:stop])
    return out


@head_forward.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, chunk: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("diygpt::head_weight_grad", mutates_args=())
def head_weight_grad(grad: torch.Tensor, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``grad.T @ x`` for grad (N, V) and x (N, C): the weight's (V, C) gradient, in row slices."""
    out = x.new_empty(grad.shape[1], x.shape[1])  # (V, C)
    for start in range(0, grad.shape[1], chunk):
        stop = start + chunk
        torch.mm(grad[:, start:stop].t(), x, out=out[start:stop])
    return out


@head_weight_grad.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, chunk: int) -> torch.Tensor:
    return x.new_empty(grad.shape[1], x.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    x, weight, chunk = inputs
    ctx.save_for_backward(x, weight)
    ctx.chunk = chunk


def _backward(ctx, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    grad_x = grad @ weight if ctx.needs_input_grad[0] else None  # (N, V) @ (V, C)
    grad_w = head_weight_grad(grad, x, ctx.chunk) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


head_forward.register_autograd(_backward, setup_context=_setup_context)


class ChunkedHead(nn.Linear):
    """``nn.Linear`` whose product runs in vocabulary slices; set by :func:`chunk_head`."""

    chunk: int = CHUNK

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, V)
        out = head_forward(x.reshape(-1, x.shape[-1]), self.weight, self.chunk)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], out.shape[-1])


def chunk_head(model: nn.Module, chunk: int = CHUNK) -> bool:
    """Switch ``model.out_head`` to :class:`ChunkedHead` in place; whether it was switched.

    Only a plain ``nn.Linear`` head is switched (not a padded or quantized one). Meant for
    fp32 on the CPU: under autocast the head would leave autocast's bf16 products.
    """
    head = getattr(model, "out_head", None)
    if type(head) is not nn.Linear:
        return False
    head.__class__ = ChunkedHead
    head.chunk = chunk
    return True
