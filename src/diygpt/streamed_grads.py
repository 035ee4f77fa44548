"""Weight gradients made and applied a slice of rows at a time, never whole.

With AdamW stepping inside backward (diygpt.optim_in_backward), book-124m's two vocabulary
matrices are the only gradients still large enough to show in a step's peak memory: 154 MB
each. The output head's is made first in backward, when nearly every activation is still
held; the token embedding's last, when the heap has grown the most (BENCHMARKS.md, ninth
pass). Here the module's forward is swapped (on the instance) for an autograd Function with
the same forward whose backward hands ``owner.stream_rows(weight, grad_rows)`` a function
making any slice of the gradient's rows, bit for bit as the whole gradient's:

- a bias-free linear layer: rows ``v`` of ``grad_out.T @ x``, the product autograd makes
  (MKL gives the same bits sliced or whole; tests/test_optim_in_backward.py compares);
- an embedding: ``index_add_`` of the gradient rows of the tokens in ``v``, in token order,
  as ``embedding_dense_backward`` on the CPU adds them.

Where ``stream_rows`` declines (the first step, before AdamW has made its state) the whole
gradient is returned as usual. Only untied plain layers qualify (:func:`streamable_modules`):
a weight used twice gets two gradients to sum. A streamed weight's ``.grad`` is never set,
so a hook registered on it sees no gradient after the first step (``diygpt train
--no-optim-in-backward`` turns the whole mechanism off).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

GradRows = Callable[[slice], torch.Tensor]


class RowStepper(Protocol):
    def stream_rows(self, param: torch.Tensor, grad_rows: GradRows) -> bool: ...


class _StreamedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, owner: RowStepper) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        # The parameter itself is the optimizer's key: saved-tensor hooks (diygpt.recompute)
        # may unpack another tensor object.
        ctx.param, ctx.owner = weight, owner
        return F.linear(x, weight)  # (B, T, C) -> (B, T, V)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])  # (N, V), (N, C)
        # The input's gradient first: the weight is about to be updated.
        grad_x = grad2.mm(weight).view_as(x) if ctx.needs_input_grad[0] else None
        if ctx.owner.stream_rows(ctx.param, lambda rows: grad2[:, rows].t().mm(x2)):
            return grad_x, None, None
        return grad_x, grad2.t().mm(x2), None


class _StreamedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx: torch.Tensor, weight: torch.Tensor, owner: RowStepper) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.param, ctx.owner = weight, owner
        return F.embedding(idx, weight)  # (B, T) -> (B, T, C)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        idx, grad2 = idx.reshape(-1), grad.reshape(-1, grad.shape[-1])  # (N,), (N, C)
        weight = ctx.param

        def grad_rows(rows: slice) -> torch.Tensor:
            picked = (idx >= rows.start) & (idx < rows.stop)  # keeps the tokens' order
            out = grad2.new_zeros(rows.stop - rows.start, grad2.shape[1])
            return out.index_add_(0, idx[picked] - rows.start, grad2[picked])

        if ctx.owner.stream_rows(weight, grad_rows):
            return None, None, None
        return None, grad_rows(slice(0, weight.shape[0])), None


def _linear_forward(module: nn.Linear, owner: RowStepper, x: torch.Tensor) -> torch.Tensor:
    # Under autocast the built-in linear computes its backward in the autocast dtype: not this.
    if torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
        return _StreamedLinear.apply(x, module.weight, owner)
    return F.linear(x, module.weight)


def _embedding_forward(module: nn.Embedding, owner: RowStepper, idx: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled():
        return _StreamedEmbedding.apply(idx, module.weight, owner)
    return F.embedding(idx, module.weight)


def _plain(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return module.bias is None
    if type(module) is nn.Embedding:
        return (module.padding_idx is None and module.max_norm is None
                and not module.scale_grad_by_freq and not module.sparse)
    return False


def streamable_modules(model: nn.Module) -> list[nn.Module]:
    """``model.out_head`` and ``model.tok_emb`` where each is a plain bias-free linear layer
    or embedding on the CPU whose weight nothing else shares (the book's GPTModel: both).

    On the CPU only: that is where the slices were checked bit for bit against the whole
    (CUDA's embedding backward sums in another order than ``index_add_``)."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    found = (getattr(model, name, None) for name in ("out_head", "tok_emb"))
    return [m for m in found if isinstance(m, nn.Module) and _plain(m)
            and m.weight.requires_grad and m.weight.device.type == "cpu"
            and uses.get(id(m.weight)) == 1]


def stream_weight_grads(module: nn.Module, owner: RowStepper) -> Callable[[], None]:
    """Swap ``module``'s forward for the streamed one; returns what undoes it."""
    forward = _linear_forward if isinstance(module, nn.Linear) else _embedding_forward
    before = vars(module).get("forward")
    module.forward = functools.partial(forward, module, owner)

    def undo() -> None:
        del module.forward
        if before is not None:
            module.forward = before

    return undo
