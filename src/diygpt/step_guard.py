"""The optimizer step that keeps a non-finite loss or gradient away from the weights.

Asking the host whether a step is finite makes it wait for the GPU halfway through every
step, which then idles while the CPU queues the update and the next forward. Fused AdamW can
take the answer as a device tensor instead (``found_inf``, the hook ``GradScaler`` uses): the
kernel then leaves the weights, the moments and the step count as they were. The host reads
the flag only once the step's loss has been read (the progress bar reads it every step), when
the GPU has nothing left to do. Any other optimizer, or fp16's scaler, gets the host check.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diygpt.precision import Precision

# on_bad(loss, grad_norm) warns (nan_policy "skip") or raises (nan_policy "stop")
OnBad = Callable[[torch.Tensor, torch.Tensor], None]


def skips_on_device(optimizer: torch.optim.Optimizer, precision: Precision,
                    sharded: bool = False) -> bool:
    """Whether ``optimizer`` can skip a bad step from a device flag: Adam or AdamW with every
    group fused (``load_state_dict`` takes ``fused`` from the saved groups, so the groups are
    asked, not the constructor's defaults), no GradScaler (which sets the same flag itself),
    on plain, unsharded tensors. Fused SGD reads the flag too, but a skipped first step would
    leave its momentum buffer unset."""
    return (isinstance(optimizer, torch.optim.Adam)
            and all(group.get("fused") for group in optimizer.param_groups)
            and precision.scaler is None and not sharded)


class StepGuard:
    """``step`` updates the weights only if the loss and the gradient norm are finite."""

    def __init__(self, optimizer: torch.optim.Optimizer, precision: Precision,
                 sharded: bool = False) -> None:
        self.optimizer, self.precision, self.sharded = optimizer, precision, sharded
        self._unread: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def step(self, loss: torch.Tensor, grad_norm: torch.Tensor, on_bad: OnBad) -> None:
        self.check(on_bad)  # an earlier step nobody checked: reported, not lost
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        if skips_on_device(self.optimizer, self.precision, self.sharded):
            self.optimizer.found_inf = (~finite).float()  # read by the fused kernel
            try:
                self.precision.step(self.optimizer)
            finally:  # left set, it would silence every later step() made without the guard
                del self.optimizer.found_inf
            self._unread = (finite, loss, grad_norm)
            return
        if not bool(finite):
            scaler = self.precision.scaler
            if scaler is not None and bool(torch.isfinite(loss)):
                self.precision.step(self.optimizer)  # fp16 overflow: the scaler lowers its scale
                return
            on_bad(loss, grad_norm)  # raises under nan_policy "stop"
            self.optimizer.zero_grad()
            if scaler is not None:
                scaler.update()  # closes this step's unscale_, which the next one repeats
            return
        self.precision.step(self.optimizer)

    def check(self, on_bad: OnBad) -> None:
        """Call once the step's loss has been read: reports a step the device skipped."""
        if self._unread is None:
            return
        finite, loss, grad_norm = self._unread
        self._unread = None
        if not bool(finite):
            on_bad(loss, grad_norm)
