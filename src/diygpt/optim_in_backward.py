"""AdamW stepped inside the backward pass, so the gradients never all live at once.

PyTorch's recipe "fuse the optimizer step into the backward pass": a hook on each
parameter (``register_post_accumulate_grad_hook``) updates it as soon as its gradient is
complete and then drops that gradient. For book-124m in fp32 that is 650 MB of gradients
(162.4M parameters) that are never held together.

The one ordinary optimizer is kept, so its state_dict, the checkpoints and resume are
unchanged: in the hook of parameter p we call ``optimizer.step()`` and then set
``p.grad = None``. Adam and AdamW update only parameters whose ``.grad`` is not None
(``Adam._init_group``), and at that moment every other gradient is None: those finished
earlier were dropped, the rest are not produced yet (``zero_grad(set_to_none=True)`` ran
before the forward pass). Each parameter's update is elementwise and reads only its own
state (step count, moments), and the learning rate is set before backward, so weights and
optimizer state come out bit-identical to backward-then-step
(tests/test_optim_in_backward.py).

It is exact only where a step does not need all gradients first. The Trainer steps after
backward, as before, with gradient clipping (a global norm), gradient accumulation, fp16's
GradScaler (an unscale and inf check over all gradients), DDP/FSDP (gradients reduced
across ranks), ``nan_policy="skip"`` (a bad step must be skippable whole), an optimizer
other than Adam/AdamW, or a compiled model.

The NaN guard (``nan_policy="stop"``): a non-finite loss is seen before backward, which is
then not run, so nothing is updated, as before. A finite loss with a non-finite gradient
norm still stops the run, but the parameters that backward reached before the bad gradient
(those nearer the output) already hold this step's update in memory; the bad gradient and
all later ones are never applied, and nothing is saved after the step, so the last
checkpoint is the same as before.

By default (``optim_in_backward=None``) it is used where it applies and the model is on the
CPU, where it was measured to cost no speed. ``True`` asks for it on any device (``diygpt
train --low-memory`` does): each parameter is then stepped on its own, without foreach's
batching, and its gradient's finiteness read, one host sync per parameter on a GPU; so on a
GPU it is not the default. ``False`` turns it off.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from diygpt.streamed_grads import GradRows, stream_weight_grads, streamable_modules

if TYPE_CHECKING:
    from diygpt.training import Trainer

# A parameter holding this share of all the weights is stepped later: see OptimInBackward.
DEFER_SHARE = 0.1
# ... and in row slices of at most this size, so that AdamW's temporaries are small blocks
# from the heap's free space, not fresh mappings twice the parameter's size (glibc maps each
# allocation over 32 MiB on its own, and freed activations cannot serve them). Late in
# backward that free space is in holes among the remaining activations: 16 MiB slices
# often fitted none of them and grew the heap, 4 MiB slices fit (BENCHMARKS.md, eighth pass).
SLICE_BYTES = 4 << 20


class OptimInBackward:
    """Hooks on every trainable parameter of ``optimizer`` that step it inside backward.

    A parameter holding at least ``defer_share`` of all the weights (book-124m's untied
    output head and token embedding, a quarter each) is stepped later: once half of the
    parameters have had theirs, or at the end of backward. AdamW's update makes temporaries
    twice its size, and the output head's gradient is complete first, while nearly all
    activations are still held. It is then stepped in row slices of ``SLICE_BYTES``, whose
    temporaries fit the heap's free space (BENCHMARKS.md, fourth pass, has the peaks).

    ``streamed`` modules (:func:`diygpt.streamed_grads.streamable_modules`: book-124m's
    output head and token embedding) have their weight gradient made and applied a row
    slice at a time instead, from the second step on (the first makes AdamW's state): each
    would otherwise add 154 MB to the step's peak (BENCHMARKS.md, ninth pass).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, defer_share: float = DEFER_SHARE,
                 streamed: Sequence[nn.Module] = ()) -> None:
        self.optimizer = optimizer
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self._defer_numel = defer_share * sum(p.numel() for p in params)
        self._deferred: list[tuple[torch.Tensor, torch.Tensor]] = []
        # Each gradient's norm, written in place: a small tensor kept per parameter, made
        # after its update's temporaries, would pin them as holes in the heap.
        self._norms = torch.empty(len(params), device=params[0].device if params else None)
        self._count = 0
        self._finite = True
        self._flush_at = len(params) // 2
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]
        self._undo = [stream_weight_grads(m, self) for m in streamed
                      if any(m.weight is p for p in params)]

    def _hook(self, param: torch.Tensor) -> None:
        if param.grad is None:  # a streamed weight, already stepped by stream_rows
            return
        finite = self._record(torch.linalg.vector_norm(param.grad))
        if param.numel() >= self._defer_numel:
            self._deferred.append((param, param.grad))  # hidden from the steps in between
        elif finite:
            self.optimizer.step()  # updates only this parameter: all other grads are None
        param.grad = None
        self._flush_if_due()

    def _record(self, norm: torch.Tensor) -> bool:
        """Note one gradient norm; whether every gradient so far was finite."""
        self._norms[self._count] = norm
        self._count += 1
        # Once one gradient is bad, no later parameter (or row slice) is updated in this step.
        self._finite = self._finite and math.isfinite(norm.item())
        return self._finite

    def _flush_if_due(self) -> None:
        if self._count == self._flush_at:
            self._step_deferred()

    def _step_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for param, grad in deferred:
            if self._finite:
                self._step_in_slices(param, grad)

    def _slice_rows(self, param: torch.Tensor) -> int:
        """Rows per slice when ``param`` can be stepped in slices now, else 0."""
        rows = SLICE_BYTES // max(1, param[0].nbytes) if param.dim() > 1 else 0
        return rows if self.optimizer.state.get(param) and 0 < rows < param.shape[0] else 0

    def _step_in_slices(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """``optimizer.step()`` for ``param`` alone, a slice of rows at a time."""
        rows = self._slice_rows(param)
        if not rows:  # first step: AdamW makes the state
            param.grad = grad
            self.optimizer.step()
            param.grad = None
            return
        self._step_slices(param, ((s, grad[s]) for s in _row_slices(param, rows)))

    def _step_slices(self, param: torch.Tensor,
                     slices: Iterator[tuple[slice, torch.Tensor]]) -> None:
        """Step each (rows, gradient of those rows) of ``param`` as a parameter of its own.

        A slice is a view of ``param``, its gradient and its AdamW moments, with a copy of the
        step count, which is advanced once at the end. The update is elementwise, so the
        result is the whole step's, bit for bit.
        """
        state = self.optimizer.state[param]
        group = next(g for g in self.optimizer.param_groups if any(p is param for p in g["params"]))
        params, step, stepped = group["params"], state["step"], False
        try:
            for rows_of, grad in slices:
                view = torch.nn.Parameter(param.detach()[rows_of])
                view.grad = grad
                self.optimizer.state[view] = {
                    k: v.clone() if k == "step" else v[rows_of] for k, v in state.items()
                }
                group["params"] = [view]
                try:
                    self.optimizer.step()
                finally:
                    del self.optimizer.state[view]
                stepped = True
            if stepped:
                step += 1  # as AdamW advances it, in place
        finally:
            group["params"] = params

    def stream_rows(self, param: torch.Tensor, grad_rows: GradRows) -> bool:
        """Step ``param`` from its gradient made a row slice at a time by ``grad_rows``.

        False, with nothing done, where it cannot be sliced yet (the first step); the whole
        gradient must then reach ``param.grad``. A non-finite slice stops the updates there,
        as a non-finite parameter's gradient does.
        """
        rows = self._slice_rows(param)
        if not rows:
            return False
        slices = _row_slices(param, rows)
        norms = param.new_empty(len(slices))  # in place, as self._norms
        done = [0]

        def finite_slices() -> Iterator[tuple[slice, torch.Tensor]]:
            for i, rows_of in enumerate(slices):
                grad = grad_rows(rows_of)
                torch.linalg.vector_norm(grad, out=norms[i])
                done[0] = i + 1
                if not math.isfinite(norms[i].item()):
                    return
                yield rows_of, grad

        if self._finite:
            self._step_slices(param, finite_slices())
        for i in range(done[0], len(slices)):  # the rows not stepped
            torch.linalg.vector_norm(grad_rows(slices[i]), out=norms[i])
        self._record(torch.linalg.vector_norm(norms))
        self._flush_if_due()
        return True

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss.backward()``, stepping each parameter on the way; the total gradient norm.

        The norm is that of ``get_total_norm`` over all gradients (the last bits may differ,
        being summed in another order); it is non-finite if any gradient was.
        """
        self._count, self._finite, self._deferred = 0, True, []
        try:
            loss.backward()
            count = self._count
            self._step_deferred()
        finally:
            self._count, self._deferred = 0, []
        if not count:
            return torch.zeros((), device=loss.device)
        return torch.linalg.vector_norm(self._norms[:count])

    def step(self, loss: torch.Tensor, on_non_finite: Callable[..., None]) -> torch.Tensor:
        """Backward and update for an already computed ``loss``; the Trainer's NaN guard.

        ``on_non_finite(loss, grad_norm, partial)`` is called for a non-finite loss (then
        backward does not run) or gradient norm (``partial``: some parameters were updated).
        """
        if not bool(torch.isfinite(loss.detach())):
            on_non_finite(loss, loss, False)
            return loss.detach()
        grad_norm = self.backward(loss)
        if not bool(torch.isfinite(grad_norm)):
            on_non_finite(loss, grad_norm, True)
        return loss.detach()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for undo in self._undo:
            undo()
        self._undo = []


def _row_slices(param: torch.Tensor, rows: int) -> list[slice]:
    n = param.shape[0]
    return [slice(start, min(start + rows, n)) for start in range(0, n, rows)]


def blocker(trainer: Trainer) -> str | None:
    """Why stepping inside backward would not be exact for this trainer, or None."""
    c = trainer.cfg
    reasons = (
        (trainer.parallel is not None, "distributed training"),
        (c.grad_clip is not None, "--grad-clip"),
        (c.grad_accum > 1, "--grad-accum"),
        (trainer.precision.scaler is not None, "fp16's GradScaler"),
        (c.nan_policy != "stop", f"--nan-policy {c.nan_policy}"),
        (not isinstance(trainer.optimizer, (torch.optim.Adam, torch.optim.AdamW)),
         "an optimizer other than Adam/AdamW"),
        (hasattr(trainer.model, "_orig_mod"), "--compile"),
    )
    return next((why for blocked, why in reasons if blocked), None)


def _on_cpu(optimizer: torch.optim.Optimizer) -> bool:
    return all(p.device.type == "cpu" for g in optimizer.param_groups for p in g["params"])


@contextlib.contextmanager
def attached(trainer: Trainer) -> Iterator[OptimInBackward | None]:
    """``trainer.in_backward`` set for the duration where it is used (see the module doc)."""
    wanted = trainer.cfg.optim_in_backward
    why = blocker(trainer)
    if wanted is None:
        wanted = _on_cpu(trainer.optimizer)
    elif wanted and why is not None and trainer.is_main:
        print(f"diygpt: note: stepping AdamW inside backward (--optim-in-backward, or "
              f"--low-memory's) does not apply with {why}; the optimizer steps after backward",
              file=sys.stderr)
    if not wanted or why is not None:
        yield None
        return
    trainer.in_backward = OptimInBackward(trainer.optimizer,
                                          streamed=streamable_modules(trainer.model))
    try:
        yield trainer.in_backward
    finally:
        trainer.in_backward.remove()
        trainer.in_backward = None
