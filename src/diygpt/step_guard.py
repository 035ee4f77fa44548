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
    """Whether ``optimizer`` can skip a bad step from a device flag: fused AdamW (or Adam)
    without a GradScaler (which sets the same flag itself) and on plain, unsharded tensors."""
    fused = bool(getattr(optimizer, "defaults", {}).get("fused"))
    return fused and getattr(optimizer, "_step_supports_amp_scaling", False) \
        and precision.scaler is None and not sharded


class StepGuard:
    """``step`` updates the weights only if the loss and the gradient norm are finite."""

    def __init__(self, optimizer: torch.optim.Optimizer, precision: Precision,
                 on_device: bool) -> None:
        self.optimizer, self.precision, self.on_device = optimizer, precision, on_device
        self._unread: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def step(self, loss: torch.Tensor, grad_norm: torch.Tensor, on_bad: OnBad) -> None:
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        if self.on_device:
            self.optimizer.found_inf = (~finite).float()  # read by the fused kernel
            self.precision.step(self.optimizer)
            self._unread = (finite, loss, grad_norm)
            return
        if not bool(finite):
            if self.precision.scaler is not None and bool(torch.isfinite(loss)):
                self.precision.step(self.optimizer)  # fp16 overflow: the scaler lowers its scale
                return
            on_bad(loss, grad_norm)
            self.optimizer.zero_grad()
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
