"""Dropout's draws on the CPU, the same values as torch's and about 5x faster.

On the CPU, every dropout mask comes from ``Tensor.bernoulli_(1 - p)``. torch (2.13 here)
fills it one element at a time from its MT19937 generator, on one core: for book-124m's batch, 28.7M
draws and about 150 ms of a training step, during which the second core idles. The values
are fixed by the generator, so a faster route must produce the same ones to keep a seeded
run, and the seed's log, what they are. ``mt_bernoulli.c`` does that: the same engine and
the same 53-bit comparison, written as loops the compiler vectorizes (about 30 ms).

- :func:`load_kernel` builds the C file once per machine (:func:`diygpt.native.build`: the
  system's C compiler, the library cached under ``$DIYGPT_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/diygpt``, else ``~/.cache/diygpt``) and compares it with torch's
  ``bernoulli_`` before it is used.
  Without a compiler, or if the two ever disagree (another torch version drawing another
  way), it returns None and :func:`unavailable_reason` says why; training then keeps
  torch's kernel.
- :func:`fast_draws` is a context manager that, while open, routes ``aten::bernoulli_.float``
  on CPU tensors to the kernel. Every caller goes through it: ``F.dropout``, attention's
  dropout inside ``scaled_dot_product_attention``, ``diygpt.lean``'s dropout, and a compiled
  model's dropout (``diygpt.speed.compile_model`` keeps inductor calling torch's draws on the
  CPU). The model itself is not changed.

The generator's state is read, advanced and written back as a whole, so two threads must
not draw from one generator at once while this is on (training draws from one).
tests/test_fast_draws.py checks values and generator state against torch's kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from diygpt import native

SOURCE = Path(__file__).with_name("mt_bernoulli.c")
# What torch's CPU bernoulli_ accepts (AT_DISPATCH_ALL_TYPES_AND3(Bool, BFloat16, Half)); the
# kernel writes float32 and one-byte 0/1 values itself, the rest through a float32 copy.
_DTYPES = frozenset({
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
})
_ONE_BYTE = frozenset({torch.bool, torch.uint8, torch.int8})

_lock = threading.Lock()  # the registration's count
_library: torch.library.Library | None = None
_users = 0


def _fill(kernel: Callable[..., None], out: torch.Tensor, p: float, gen: torch.Generator) -> None:
    """``out`` (contiguous; float32 or one byte) gets ``gen``'s next draws, ``gen`` advanced."""
    state = gen.get_state()
    kernel(state.data_ptr(), out.data_ptr(), out.numel(), math.ceil(p * 2**53),
           out.dtype in _ONE_BYTE)
    gen.set_state(state)


def _agrees_with_torch(kernel: Callable[..., None]) -> bool:
    """The kernel's values and final generator state equal torch's for a few draws."""
    cases = ((123, 0, 1, 0.9, torch.float32), (1, 5, 1000, 0.9, torch.float32),
             (7, 311, 5000, 0.3, torch.float32), (9, 3, 2000, 0.9, torch.bool))
    for seed, skip, n, p, dtype in cases:
        mine, theirs = (torch.Generator().manual_seed(seed) for _ in range(2))
        for gen in (mine, theirs):
            torch.empty(skip).bernoulli_(0.5, generator=gen)
        expected = torch.empty(n, dtype=dtype).bernoulli_(p, generator=theirs)
        got = torch.empty(n, dtype=dtype)
        _fill(kernel, got, p, mine)
        if not (torch.equal(got, expected) and torch.equal(mine.get_state(), theirs.get_state())):
            return False
    return True


def _bind(library: ctypes.CDLL) -> Callable[..., None]:
    """kernel(state pointer, output pointer, n, threshold, one_byte) over the C functions."""
    functions = library.diygpt_bernoulli_f32, library.diygpt_bernoulli_u8
    for fn in functions:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64]
        fn.restype = None

    def kernel(state: int, out: int, n: int, threshold: int, one_byte: bool) -> None:
        functions[one_byte](state, out, n, threshold)

    return kernel


_loaded = native.CheckedKernel(SOURCE, lambda: [_bind], _agrees_with_torch,
                               f"torch {torch.__version__} draws differently from {SOURCE.name}")


def load_kernel() -> Callable[..., None] | None:
    """The checked kernel, built on first use; None when it cannot be had (see the reason)."""
    return _loaded.load()


def unavailable_reason() -> str | None:
    return _loaded.reason


def _iteration_order(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed in the order torch's kernel fills it: its strides, largest first."""
    return t.permute(sorted(range(t.dim()), key=t.stride, reverse=True))


def _bernoulli_(
    self: torch.Tensor, p: float = 0.5, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """aten::bernoulli_.float for CPU tensors, with torch's checks and torch's values."""
    if not 0 <= p <= 1:
        raise RuntimeError(f"bernoulli_ expects p to be in [0, 1], but got p={p}")
    if self.dtype not in _DTYPES:
        raise RuntimeError(f'"bernoulli_scalar_cpu_" not implemented for \'{self.dtype}\'')
    if torch._debug_has_internal_overlap(self) == 1:
        raise RuntimeError("unsupported operation: more than one element of the written-to "
                           "tensor refers to a single memory location. Please clone() the "
                           "tensor before performing the operation.")
    gen = torch.default_generator if generator is None else generator
    if gen.device.type != "cpu":
        raise RuntimeError(f"Expected a 'cpu' device type for generator but found '{gen.device}'")
    direct = self.is_contiguous() and (self.dtype in _ONE_BYTE or self.dtype == torch.float32)
    out = self if direct else torch.empty(self.numel())  # float32, copied over in order below
    _fill(_loaded.kernel, out, p, gen)
    if not direct:
        view = _iteration_order(self)
        view.copy_(out.view(view.shape))
    return self


def _register() -> None:
    global _library, _users
    with _lock:
        if _users == 0:
            with warnings.catch_warnings():  # torch warns that a kernel is overridden: we mean it
                warnings.simplefilter("ignore")
                library = torch.library.Library("aten", "IMPL")
                try:
                    library.impl("bernoulli_.float", _bernoulli_, "CPU")
                except Exception:
                    library._destroy()
                    raise
            _library = library
        _users += 1


def _unregister() -> None:
    global _library, _users
    with _lock:
        _users -= 1
        if _users == 0 and _library is not None:
            _library._destroy()  # torch's own kernel is the CPU's again
            _library = None


@contextlib.contextmanager
def fast_draws(enabled: bool = True) -> Iterator[bool]:
    """While open, CPU ``bernoulli_`` (dropout's draws) runs the checked kernel.

    Yields whether it is on: False when ``enabled`` is False or the kernel is unavailable.
    Nests: torch's kernel comes back when the outermost block closes.
    """
    active = enabled and load_kernel() is not None
    if active:
        _register()
    try:
        yield active
    finally:
        if active:
            _unregister()
