"""Cross-entropy per batch and per loader, as in the book, plus perplexity."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from diygpt.errors import DataError

# Rows of logits whose gradient cross entropy's backward makes at once, on the CPU: small
# enough that its two temporaries fit holes in the heap instead of growing it.
CE_SLICE_BYTES = 4 << 20


class _CrossEntropyInPlace(torch.autograd.Function):
    """``F.cross_entropy`` (mean over rows) whose backward writes the logits' gradient over
    the saved log-probabilities, a slice of rows at a time.

    Autograd's backward makes two (rows, vocab) temporaries, nll's gradient and then
    log_softmax's: 2 x 103 MB for book-124m's batch, each a fresh mapping at the top of a
    step's memory. Here each slice calls the same two kernels' arithmetic (a one-hot of
    ``-grad / rows``, then ``_log_softmax_backward_data``), which are row by row, so the
    loss and the gradient are bit-identical (tests/test_losses.py).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, 1)  # (N, V), as F.cross_entropy computes it
        ctx.save_for_backward(logp, targets)
        return F.nll_loss(logp, targets)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if torch.is_grad_enabled():  # create_graph=True: the gradient below has no graph
            raise RuntimeError(_ONE_BACKWARD.format(what="gives no second-order gradient"))
        if getattr(ctx, "done", False):
            try:
                _ = ctx.saved_tensors
            except RuntimeError as exc:
                if "a second time" in str(exc):  # no retain_graph: torch's message says it all
                    raise
            # retain_graph=True kept them, but the first backward wrote over them.
            raise RuntimeError(_ONE_BACKWARD.format(
                what="backpropagates once (its gradient overwrites the saved log-probabilities)"))
        ctx.done = True
        logp, targets = ctx.saved_tensors
        n, v = logp.shape
        value = -(grad / n)  # nll_loss's gradient at each target, for a mean over n rows
        rows = max(1, CE_SLICE_BYTES // (v * logp.element_size()))
        for start in range(0, n, rows):
            part = logp[start:start + rows]  # (r, V): becomes the logits' gradient
            one_hot = torch.zeros_like(part)
            one_hot[torch.arange(part.shape[0]), targets[start:start + rows]] = value
            part.copy_(torch.ops.aten._log_softmax_backward_data(one_hot, part, 1, part.dtype))
        return logp, None


_ONE_BACKWARD = (
    "diygpt's CPU cross entropy {what}; pass calc_loss_batch loss_fn=lambda logits, targets: "
    "F.cross_entropy(logits.flatten(0, 1), targets.flatten())"
)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits (N, V), targets (N,))``; on the CPU with less memory."""
    # Only int64 targets: F.cross_entropy takes uint8 too, which indexing would read as a mask.
    if (logits.device.type == "cpu" and logits.requires_grad and torch.is_grad_enabled()
            and targets.dtype == torch.long and not torch.compiler.is_compiling()
            and not bool((targets < 0).any())):
        return _CrossEntropyInPlace.apply(logits, targets)
    return F.cross_entropy(logits, targets)  # also for ignore_index (-100) targets


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of logits (B, T, V), taken in fp32, against targets (B, T)."""
    return cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def logsumexp_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """:func:`token_cross_entropy` written for a compiler to fuse (``--compile``).

    Per row, the loss is logsumexp(logits) minus the target's logit. The target's logit is
    picked with a compare against the column index, not a gather, so backward is one
    elementwise pass, softmax minus the one-hot, where the log-softmax form scatters into a
    (rows, vocab) buffer of zeros and runs log-softmax's backward over it. Targets of -100
    are left out of the mean, as ``F.cross_entropy`` does.
    """
    flat = logits.flatten(0, 1).float()  # (N, V)
    t = targets.flatten()  # (N,)
    hit = torch.arange(flat.shape[-1], device=flat.device) == t[:, None]  # (N, V)
    per_row = torch.logsumexp(flat, dim=-1) - torch.where(hit, flat, 0.0).sum(-1)  # (N,)
    kept = t != -100
    return torch.where(kept, per_row, 0.0).sum() / kept.sum()


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def calc_loss_batch(
    input_batch: torch.Tensor,
    target_batch: torch.Tensor,
    model: nn.Module,
    device: torch.device | str,
    loss_fn: LossFn = token_cross_entropy,
) -> torch.Tensor:
    """Mean next-token cross entropy of one batch: logits (B, T, V) vs targets (B, T).

    ``loss_fn`` takes the logits and targets; ``--compile`` passes a compiled
    :func:`logsumexp_cross_entropy` (see :func:`diygpt.speed.compile_loss`). On the CPU
    the default's backward reuses the saved softmax's memory for the gradient, so the
    graph backpropagates once: for ``retain_graph=True`` or a second-order gradient, pass
    ``loss_fn=lambda logits, targets: F.cross_entropy(logits.flatten(0, 1),
    targets.flatten())``.
    """
    input_batch = input_batch.to(device)
    target_batch = target_batch.to(device)
    logits = model(input_batch)
    return loss_fn(logits, target_batch)


def calc_loss_loader(
    data_loader: Iterable,
    model: nn.Module,
    device: torch.device | str,
    num_batches: int | None = None,
) -> float:
    """Average of per-batch losses over the first ``num_batches`` batches (all by default).

    Returns NaN for an empty loader, as the book does.
    """
    if len(data_loader) == 0:
        return float("nan")
    if num_batches is not None and num_batches <= 0:  # the book divides by zero
        raise DataError(f"num_batches must be positive (or None for all), got {num_batches}")
    if num_batches is None:
        num_batches = len(data_loader)
    else:
        num_batches = min(num_batches, len(data_loader))
    total_loss = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


def token_mean_loss(
    data_loader: Iterable,
    model: nn.Module,
    device: torch.device | str,
    num_batches: int | None = None,
) -> tuple[float, int]:
    """(Mean cross entropy over every target token scored, how many) in the first
    ``num_batches`` batches; targets of -100 are not scored. :func:`calc_loss_loader`, the
    book's, averages batch means instead, so a short last batch weighs as much as a full one."""
    total, count = 0.0, 0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if num_batches is not None and i >= num_batches:
            break
        n = int((target_batch != -100).sum())
        total += calc_loss_batch(input_batch, target_batch, model, device).item() * n
        count += n
    return (total / count if count else float("nan")), count


def perplexity(loss: float) -> float:
    """exp(cross entropy): the effective number of tokens the model hesitates between."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")
