"""The book's GELU and its backward on the CPU, torch's values, each in one pass over memory.

``diygpt.lean``'s GELU runs the book's formula as eight torch ops and its backward as a
dozen more (autograd's formulas, in the order its engine runs them), each a pass over a
(B, T, 4C) tensor through freshly allocated memory. ``gelu_tanh.c`` computes the same
float32 values, rounded where torch rounds them (with MKL's own ``vmsTanh``, as torch's
``tanh`` on x86), block by block on torch's own OpenMP threads.

- :func:`load_kernel` builds it once per machine (:func:`diygpt.native.build`) and compares
  it with torch's ops before it is used; without a compiler, or if they disagree, it
  returns None and :func:`unavailable_reason` says why.
- :func:`fast_gelu` is a context manager; while it is open (and the kernel is there),
  :func:`forward` and :func:`backward` return the kernel's results for plain contiguous CPU
  float32 tensors of one shape, outside autograd's graph (as ``diygpt.lean``'s Function
  calls them) and not in flush-to-zero mode; otherwise None, and ``diygpt.lean`` then uses
  torch's ops as before.

tests/test_fast_gelu.py compares values with the book's GELU and with autograd's gradient.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from diygpt import native
from diygpt.model import _SQRT_2_OVER_PI, GELU

SOURCE = Path(__file__).with_name("gelu_tanh.c")
_CUBE = 0.044715

_lock = threading.Lock()  # the users' count
_users = 0


class _Kernel:
    """The two C functions, with the constants and torch's tanh bound."""

    def __init__(self, library: ctypes.CDLL, tanh: int | None) -> None:
        self._forward, self._backward = library.diygpt_gelu_forward, library.diygpt_gelu_backward
        p, f = ctypes.c_void_p, ctypes.c_float
        tail = [ctypes.c_int64, f, f, p, ctypes.c_int64, ctypes.c_int]
        self._forward.argtypes = [p, p, p, p, *tail]
        self._backward.argtypes = [p, p, p, p, *tail]
        self._forward.restype = self._backward.restype = ctypes.c_int
        self._tail = (_SQRT_2_OVER_PI, _CUBE, tanh, native.VML_MODE)

    def forward(self, x: torch.Tensor, parts: bool) -> tuple[torch.Tensor, ...] | None:
        """(GELU(x),) or, with ``parts``, (GELU(x), 0.5 x, tanh's output); None if refused
        (flush-to-zero mode, see gelu_tanh.c)."""
        outs = [torch.empty_like(x) for _ in range(3 if parts else 1)]
        half, t = (o.data_ptr() for o in outs[1:]) if parts else (None, None)
        refused = self._forward(x.data_ptr(), outs[0].data_ptr(), half, t, x.numel(),
                                *self._tail, torch.get_num_threads())
        return None if refused else tuple(outs)

    def backward(self, grad: torch.Tensor, x: torch.Tensor,
                 t: torch.Tensor | None) -> torch.Tensor | None:
        """x's gradient; None if refused."""
        dx = torch.empty_like(x)
        refused = self._backward(grad.data_ptr(), x.data_ptr(),
                                 None if t is None else t.data_ptr(), dx.data_ptr(), x.numel(),
                                 *self._tail, torch.get_num_threads())
        return None if refused else dx


def torch_halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of the book's GELU, op for op: 0.5 x and tanh's output."""
    return 0.5 * x, torch.tanh(_SQRT_2_OVER_PI * (x + _CUBE * torch.pow(x, 3)))


def torch_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the book's GELU of x, 0.5 x, tanh's output), with torch's ops."""
    half_x, t = torch_halves(x)
    return half_x * (1 + t), half_x, t


def torch_backward(grad: torch.Tensor, x: torch.Tensor, half_x: torch.Tensor,
                   t: torch.Tensor) -> torch.Tensor:
    """x's gradient with autograd's formulas for the book's GELU, in the order its engine
    runs them (the three contributions to x's gradient summed as its buffer sums them)."""
    grad_half_x, grad_t = grad * (1 + t), grad * half_x  # y = (0.5 x) * (1 + t)
    grad_inner = torch.ops.aten.tanh_backward(grad_t, t) * _SQRT_2_OVER_PI
    grad_cube = grad_inner * _CUBE
    # pow's backward is grad * (3 * x^2); x's buffer sums the inner, cube, half-x parts
    return (grad_inner + grad_cube * (3.0 * x.pow(2.0))) + grad_half_x * 0.5


def _agrees_with_torch(kernel: _Kernel) -> bool:
    """Both functions equal torch's ops at a few sizes, values from -10 to 10 and beyond."""
    gen = torch.Generator().manual_seed(0)
    for n in (1, 37, 5000, 70_000):
        x = torch.randn(n, generator=gen, dtype=torch.float32) * 4
        x[: n // 7] *= 10  # tanh saturates
        grad = torch.randn(n, generator=gen, dtype=torch.float32)
        y, half, t = torch_parts(x)
        mine, alone = kernel.forward(x, parts=True), kernel.forward(x, parts=False)
        if (mine is None or alone is None or not _bits_equal(GELU.forward(None, x), y)
                or not all(map(_bits_equal, (*mine, alone[0]), (y, half, t, y)))):
            return False
        expected = torch_backward(grad, x, half, t)
        for remade in (t, None):
            got = kernel.backward(grad, x, remade)
            if got is None or not _bits_equal(got, expected):
                return False
    return True


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))  # -0.0 is not 0.0 here


# MKL's tanh first, as torch's x86 builds use it; C's tanhf otherwise.
_loaded = native.CheckedKernel(
    SOURCE, native.vml_first("vmsTanh", lambda library, tanh: _Kernel(library, tanh)),
    _agrees_with_torch,
    f"torch {torch.__version__}'s GELU ops round differently from {SOURCE.name}")


def load_kernel() -> _Kernel | None:
    """The checked kernel, built on first use; None when it cannot be had (see the reason)."""
    return _loaded.load()


def unavailable_reason() -> str | None:
    return _loaded.reason


def _fits(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Plain contiguous CPU float32 tensors of x's shape, x not asking for a gradient (the
    kernel's results are not part of autograd's graph)."""
    return (not (torch.is_grad_enabled() and x.requires_grad)
            and all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"
                    and t.dtype == torch.float32 and t.is_contiguous() and not t.is_neg()
                    and t.shape == x.shape for t in (x, *others)))


def _active() -> _Kernel | None:
    return _loaded.kernel if _users > 0 else None


def forward(x: torch.Tensor, parts: bool = False) -> tuple[torch.Tensor, ...] | None:
    """The kernel's (GELU(x),) or (GELU(x), 0.5 x, t) inside :func:`fast_gelu`, else None."""
    kernel = _active()
    return kernel.forward(x, parts) if kernel is not None and _fits(x) else None


def backward(grad: torch.Tensor, x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor | None:
    """x's gradient (``t``: tanh's output, or None to remake it), or None outside the block."""
    kernel = _active()
    fits = kernel is not None and _fits(x, grad, *([] if t is None else [t]))
    return kernel.backward(grad, x, t) if fits else None


@contextlib.contextmanager
def fast_gelu(enabled: bool = True) -> Iterator[bool]:
    """While open, diygpt.lean's GELU runs the checked kernel. Nests; yields whether this
    block turned it on (False when ``enabled`` is False or the kernel is unavailable)."""
    global _users
    active = enabled and load_kernel() is not None
    with _lock:
        _users += active
    try:
        yield active
    finally:
        with _lock:
            _users -= active
