"""Lower peak memory for training without changing a single number.

Two tools, applied from outside the model (and see diygpt.lean, which keeps fewer
activations, and optim_in_backward, which never holds all gradients):

- :func:`tune_malloc` (on by default in ``diygpt train``; ``--no-malloc-tuning``): glibc's
  allocator keeps freed activation memory resident. Its mmap threshold grows to 32 MiB, so
  every activation below that comes from the heap, and AdamW's moments, made at the first
  step, land among them. Giving the moments mappings of their own takes ~120 MB off the
  seed run's peak. ``--trim-heap`` (the CLI's default on the CPU without ``--compile``)
  also hands the heap's free pages back after each training forward pass (60-115 MB less,
  2-5% slower; it is what keeps the seed's run under 3000 MiB); ``--low-memory`` does that and
  trims again before the big updates (slower, ~600 MB less with its recomputation). Where
  the CLI does not trim (``--compile``), blocks of up to 1 GiB are recycled in the
  heap instead, which saves the page faults of fresh mappings every step.
- :func:`recompute_blocks` (``--low-memory``): activation checkpointing of each transformer
  block. Only a block's input is kept for backward; its forward runs again during backward
  with the RNG state of the first run, so dropout draws the same masks and the gradients
  are bit-identical. Costs one more forward pass of the blocks.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from diygpt.optim_in_backward import DEFER_SHARE

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
STEADY_THRESHOLD = 32 << 20  # the ceiling of glibc's own dynamic threshold (64-bit)
RECYCLE_THRESHOLD = 1 << 30  # tune_malloc(recycle=True): only bigger blocks get mappings
RECYCLE_TRIM = (1 << 31) - 1  # ... and the heap's free top is kept, up to 2 GiB
# Set by the user, these leave glibc's allocator to them.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only (musl's mallopt is a no-op)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def _mallopt(param: int, value: int) -> bool:
    """glibc's mallopt; False elsewhere, or if the user set one of ``USER_SETTINGS``."""
    libc = _glibc()
    if libc is None or any(name in os.environ for name in USER_SETTINGS):
        return False
    return libc.mallopt(param, value) == 1


def _malloc_trim() -> None:
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def tune_malloc(model: nn.Module, optimizer: torch.optim.Optimizer,
                trim_after_forward: bool = False, trim_before_big_steps: bool = False,
                recycle: bool = False, thresholds: bool = True) -> bool:
    """Cut what glibc's allocator keeps resident around a training step; True if it set
    glibc's thresholds (``thresholds``, and the user set none of ``USER_SETTINGS``).

    - AdamW's moments are made at the first step, in the middle of the activations' heap,
      which then grows around them, and the holes freed activations leave stay resident.
      With the mmap threshold at 1 MiB until every parameter has its state they get
      mappings of their own; then it goes to 32 MiB, glibc's usual steady state, where
      activations are recycled in the heap. Costs the first step only.
    - ``trim_after_forward`` (``--trim-heap``, ``--low-memory``): ``malloc_trim(0)`` after
      each training forward pass hands back the heap's free pages (holes the forward's
      temporaries and the last backward left among the kept activations) at the step's
      peak, with all the forward kept. Backward faults some of them in again: 2-5% of a
      step on a 2-core CPU (BENCHMARKS.md, eighth and ninth passes).
    - ``trim_before_big_steps`` (``--low-memory``): also before the update of a parameter
      holding a tenth or more of all weights (whole, or the first of its row slices when
      AdamW steps inside backward), which comes once many activations are gone. On a 2-core
      CPU both trims together cost ~13% of a step in the fourth pass.
    - ``recycle`` (the CLI's choice on the CPU where it does not trim, as under
      ``--compile``): freed memory at the heap's top is kept (up to 2 GiB) instead of
      handed back, and after the first step the mmap threshold goes to 1 GiB instead of
      32 MiB. Blocks over 32 MiB, such as book-124m's 103 MB logits and their gradient and
      the 154 MB gradients of the head and the token embedding, are then reused from the
      heap instead of mapped afresh each step: those fresh pages' faults and zeroing had
      made a compiled step 1.10-1.19x slower. The heap keeps more, though: the whole compiled
      seed run peaked at 3812 MiB instead of 3439 (BENCHMARKS.md, sixteenth pass). glibc
      before 2.35 refuses a threshold over 32 MiB; there the steady 32 MiB is kept.

    The trims apply whatever the thresholds: ``malloc_trim`` does not depend on them.
    """
    if _glibc() is None:
        return False
    if trim_after_forward:
        model.register_forward_hook(_trim_after_forward)
    if trim_before_big_steps:
        _trim_before_big_steps(optimizer)
    if not (thresholds and _mallopt(M_MMAP_THRESHOLD, 1 << 20)):
        return False
    if recycle:
        _mallopt(M_TRIM_THRESHOLD, RECYCLE_TRIM)
    steady = RECYCLE_THRESHOLD if recycle else STEADY_THRESHOLD
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    seen = [len(optimizer.state)]

    def state_made(opt: torch.optim.Optimizer, args, kwargs) -> None:
        # Done once every parameter has state, or a step made none (some get no gradient).
        count = len(opt.state)
        if count == seen[0] or all(len(opt.state.get(p, ())) for p in params):
            if not _mallopt(M_MMAP_THRESHOLD, steady):  # an older glibc's ceiling
                _mallopt(M_MMAP_THRESHOLD, STEADY_THRESHOLD)
            handle.remove()
        seen[0] = count

    handle = optimizer.register_step_post_hook(state_made)
    return True


def _trim_after_forward(module: nn.Module, args, output) -> None:
    if module.training and torch.is_grad_enabled():
        _malloc_trim()


def _trim_before_big_steps(optimizer: torch.optim.Optimizer) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    total = sum(p.numel() for p in params)
    starts = {p.data_ptr() for p in params if p.numel() >= DEFER_SHARE * total}

    def before_step(opt: torch.optim.Optimizer, args, kwargs) -> None:
        # A big parameter is next: stepped whole, or its first row slice (optim_in_backward).
        if any(p.grad is not None and p.data_ptr() in starts
               for g in opt.param_groups for p in g["params"]):
            _malloc_trim()

    optimizer.register_step_pre_hook(before_step)


def recompute_blocks(model: nn.Module) -> None:
    """Recompute each transformer block's activations in backward instead of keeping them.

    Only while gradients are recorded and no KV cache is passed (evaluation and generation
    run as before). The model's parameters, state_dict and class are untouched: each block's
    ``forward`` is wrapped on the instance.
    """
    for block in model.trf_blocks:
        if not isinstance(block.forward, functools.partial):  # once
            block.forward = functools.partial(_checkpointed, block.forward)


def _checkpointed(forward, x: torch.Tensor, cache=None, layer: int = 0) -> torch.Tensor:
    if cache is not None or not torch.is_grad_enabled():
        return forward(x, cache, layer)
    return checkpoint(forward, x, None, layer, use_reentrant=False, preserve_rng_state=True)
