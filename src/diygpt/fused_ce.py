"""Cross entropy over a GPU's bf16 logits in two Triton kernels (``--compile`` on CUDA).

For gpt2-small at batch 32 x 1024 the logits are 3.3 GB of bf16. The compiled
:func:`~diygpt.losses.logsumexp_cross_entropy` spends 5.7 ms a step on them on an H200: its
forward reduction reads them more than once, and its backward reads them again and writes
their gradient (BENCHMARKS.md, seventh pass). Here:

- forward, one program per row: an online logsumexp (running max and sum, one read of the
  row) that also picks the target's logit; it keeps only the row's logsumexp (N floats);
- backward, one program per block of a row: softmax minus the one-hot, times the incoming
  gradient over the number of counted rows, read from device memory (no host sync).

The logits may be wider than the vocabulary: with ``vocab_size`` given, only the first
``vocab_size`` columns count and the gradient of the rest is zero. That lets a padded head
(:class:`diygpt.speed.PaddedHead`) hand over its whole (N, 50304) output, so the slice and
its backward (a zero-filled copy of the gradient) never run.

Triton runs on CUDA; under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors,
which is how the tests check them without a GPU.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheel of torch comes without triton
    triton = None

IGNORE_INDEX = -100
# Columns per loop step (forward) or per program (backward). On a GPU each kernel is
# autotuned at its first call over (block, warps) pairs, none of them yet timed by this
# project; the interpreter cannot time, so there BLOCK is used.
BLOCK = 4096
FORWARD_CONFIGS = [(4096, 8), (8192, 16), (16384, 16), (32768, 32)]
BACKWARD_CONFIGS = [(1024, 4), (2048, 8), (4096, 8), (8192, 16)]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device | str) -> bool:
    """Whether the kernels can run on ``device`` (CUDA with triton installed)."""
    return triton is not None and torch.device(device).type == "cuda"


if triton is not None:

    @triton.jit
    def _forward_kernel(logits_ptr, row_stride, targets_ptr, lse_ptr, loss_ptr, n_vocab,
                        ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride  # int64: batch 64 x 1024 x 50304 passes 2**31
        target = tl.load(targets_ptr + row)
        top = float("-inf")
        total = 0.0
        for start in range(0, n_vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n_vocab, other=float("-inf")).to(tl.float32)
            new_top = tl.maximum(top, tl.max(x, 0))
            total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top), 0)
            top = new_top
        lse = top + tl.log(total)
        tl.store(lse_ptr + row, lse)
        kept = target != ignore_index
        picked = tl.load(base + tl.where(kept, target, 0)).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(kept, lse - picked, 0.0))

    @triton.jit
    def _backward_kernel(logits_ptr, row_stride, grad_ptr, targets_ptr, lse_ptr, scale_ptr,
                         n_vocab, n_cols, ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        target = tl.load(targets_ptr + row)
        lse = tl.load(lse_ptr + row)
        scale = tl.where(target != ignore_index, tl.load(scale_ptr), 0.0)
        x = tl.load(logits_ptr + row * row_stride + cols, mask=cols < n_vocab,
                    other=float("-inf")).to(tl.float32)
        grad = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale  # 0 past n_vocab
        tl.store(grad_ptr + row * n_cols + cols, grad.to(grad_ptr.dtype.element_ty),
                 mask=cols < n_cols)

    def _autotuned(kernel, configs: list[tuple[int, int]], key: str):
        if INTERPRETED:
            return None
        return triton.autotune([triton.Config({"BLOCK": b}, num_warps=w) for b, w in configs],
                               key=[key])(kernel)

    _forward_tuned = _autotuned(_forward_kernel, FORWARD_CONFIGS, "n_vocab")
    _backward_tuned = _autotuned(_backward_kernel, BACKWARD_CONFIGS, "n_cols")


def _launch(kernel, tuned, grid, *args) -> None:
    """``tuned`` (autotuned) where there is one, else ``kernel`` with ``BLOCK``; ``grid``
    maps the launch's meta-parameters to the grid, as triton's launchers take it."""
    if tuned is None:
        kernel[grid({"BLOCK": BLOCK})](*args, BLOCK=BLOCK, num_warps=8)
    else:
        tuned[grid](*args)


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, vocab_size: int
                ) -> torch.Tensor:
        n, n_cols = logits.shape
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        per_row = torch.empty_like(lse)
        _launch(_forward_kernel, _forward_tuned, lambda meta: (n,),
                logits, logits.stride(0), targets, lse, per_row, vocab_size, IGNORE_INDEX)
        count = (targets != IGNORE_INDEX).sum().float()
        ctx.save_for_backward(logits, targets, lse, count)
        ctx.vocab_size = vocab_size
        return per_row.sum() / count  # 0 / 0 = nan when every target is ignored, as in torch

    @staticmethod
    @torch.autograd.function.once_differentiable  # its gradient has no graph of its own
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, targets, lse, count = ctx.saved_tensors
        n, n_cols = logits.shape
        scale = (grad.float() / count).reshape(1)
        out = torch.empty((n, n_cols), dtype=logits.dtype, device=logits.device)
        _launch(_backward_kernel, _backward_tuned,
                lambda meta: (n, triton.cdiv(n_cols, meta["BLOCK"])),
                logits, logits.stride(0), out, targets, lse, scale, ctx.vocab_size, n_cols,
                IGNORE_INDEX)
        return out, None, None


def fused_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                        vocab_size: int | None = None) -> torch.Tensor:
    """Mean cross entropy of logits (..., V') against targets (...), over the first
    ``vocab_size`` columns (all by default); targets of -100 are left out of the mean.

    Computed in fp32 whatever the logits' dtype; the gradient has the logits' dtype and
    shape, zero in the columns past ``vocab_size``. Targets must lie in [0, vocab_size) or
    be -100: they are not checked on the device, which would cost a host sync each step
    (in training they are the next inputs, which the embedding has already looked up).
    """
    if triton is None:
        raise RuntimeError("fused_cross_entropy needs triton (pip install triton)")
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V'): a view of a padded head's output
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    vocab = flat.shape[-1] if vocab_size is None else vocab_size
    if not 0 < vocab <= flat.shape[-1]:
        raise ValueError(f"vocab_size {vocab} does not fit logits of width {flat.shape[-1]}")
    if targets.numel() != flat.shape[0]:
        raise ValueError(f"{targets.numel()} targets for {flat.shape[0]} rows of logits")
    if not (logits.is_cuda or INTERPRETED):
        raise ValueError(f"fused_cross_entropy runs on CUDA tensors, not {logits.device.type} "
                         "ones (or in triton's interpreter: TRITON_INTERPRET=1)")
    return _FusedCrossEntropy.apply(flat, targets.reshape(-1).contiguous(), vocab)
