"""Mixed precision for training: autocast around the forward pass, GradScaler for fp16.

Applied from outside the model: the Trainer asks a :class:`Precision` for the autocast
context, the backward pass and the optimizer step. With ``fp32`` every call is the plain
one (no autocast, ``loss.backward()``, ``optimizer.step()``), so the book's path keeps its
exact ops and numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from diygpt.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def parse_precision(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}") from None


class Precision:
    """Autocast + (for fp16) loss scaling for one device.

    bf16 keeps fp32's exponent range, so it needs no scaler; fp16 underflows small
    gradients without one.
    """

    def __init__(self, device: torch.device | str = "cpu", dtype: str = "fp32") -> None:
        self.device = torch.device(device)
        self.name = dtype
        self.dtype = parse_precision(dtype)
        self.scaler: torch.amp.GradScaler | None = None
        if self.dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(self.device.type)

    @property
    def is_default(self) -> bool:
        return self.dtype == torch.float32

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Matmuls in the low dtype, reductions (softmax, norms, loss) kept in fp32."""
        if self.is_default:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.dtype):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients back to their true size before clipping them."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            # Skips the step when the scaled gradients overflowed, then adapts the scale.
            self.scaler.step(optimizer)
            self.scaler.update()


def enable_tf32() -> None:
    """Let fp32 matmuls and convolutions use TF32 tensor cores (CUDA Ampere and later)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
