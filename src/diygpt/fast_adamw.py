"""AdamW on the CPU with torch's numbers, 2-4x faster: one pass over memory, not eight.

The book trains with ``torch.optim.AdamW``, which on the CPU updates each parameter with
torch's single-tensor code: eight elementwise ops, each a full pass over the parameter,
its gradient or its moments. For book-124m's 162.4M parameters that is about 540 ms a
step on two cores when all are stepped at once, 400 ms when each is stepped inside
backward as ``diygpt train`` does (torch's ``fused=True`` takes 100 ms, but rounds
differently, so a seeded run would drift from the book's). ``adamw_step.c`` does the same
float32 operations, rounded where torch rounds them, block by block while the block is in
cache, the blocks shared among torch's own OpenMP threads: 140 ms and 205 ms, with the same
weights and moments bit for bit.

- :class:`FastAdamW` is ``torch.optim.AdamW`` with that update for CPU float32 tensors;
  anything else (a group with a GPU parameter, another dtype, amsgrad, maximize, foreach,
  fused, capturable, differentiable, tensor hyperparameters, a non-contiguous, negated or
  subclassed tensor, a gradient sharing the weight's storage, a learning rate past float32,
  flush-to-zero mode) takes torch's own code.
  Its ``state_dict`` is AdamW's, so checkpoints load either way.
- :func:`load_kernel` builds the C file once per machine (:func:`diygpt.native.build`) and
  compares it with torch's AdamW before it is used. Without a compiler, or if they ever
  disagree (another torch rounding another way), it returns None, :func:`unavailable_reason`
  says why, and :class:`FastAdamW` is torch's AdamW.

torch's sqrt on x86 is MKL's ``vmsSqrt`` (high-accuracy mode, not always the correctly
rounded root); the kernel calls that same function from torch's library where torch
exports it, and C's ``sqrtf`` (the exact root, as torch's own vectorized sqrt) elsewhere.
tests/test_fast_adamw.py compares weights and moments with torch's AdamW.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.optim.adam import adam as torch_adam  # the functional form of its step

from diygpt import native

SOURCE = Path(__file__).with_name("adamw_step.c")
_VML_MODE = native.VML_MODE

# kernel(param, grad, exp_avg, exp_avg_sq, scalars) -> whether it updated them (False: refused,
# nothing written: flush-to-zero is on, see adamw_step.c)
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Sequence[float]], bool]
_FLOAT_MAX = torch.finfo(torch.float32).max


def _torch_sqrt() -> int | None:
    return native.torch_vml("vmsSqrt")


def _bind(library: ctypes.CDLL, sqrt: int | None) -> Kernel:
    """A :data:`Kernel` over the C function."""
    fn = library.diygpt_adamw_f32
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.POINTER(ctypes.c_double),
                                           ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    fn.restype = ctypes.c_int

    def kernel(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
               scalars: Sequence[float]) -> bool:
        return fn(p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel(),
                  (ctypes.c_double * 7)(*scalars), sqrt, _VML_MODE, torch.get_num_threads()) == 0

    return kernel


def _agrees_with_torch(kernel: Kernel) -> bool:
    """Weights and moments equal torch's AdamW's over three steps, in a few settings."""
    gen = torch.Generator().manual_seed(0)
    calls = []

    def counted(*args) -> bool:
        calls.append(kernel(*args))
        return calls[-1]

    # Sizes: vector tails; several blocks; enough for two threads' halves.
    cases = ((1, (0.9, 0.999), 0.1), (37, (0.3, 0.99), 0.0), (5000, (0.9, 0.999), 0.1),
             (140_000, (0.9, 0.95), 0.1))
    for n, betas, decay in cases:
        start = torch.randn(n, generator=gen, dtype=torch.float32)
        params = [start.clone().requires_grad_() for _ in range(2)]
        optimizers = [cls(params=[p], lr=4e-4, betas=betas, weight_decay=decay)
                      for cls, p in zip((torch.optim.AdamW, FastAdamW), params, strict=True)]
        optimizers[1].kernel = counted  # load_kernel has not returned it yet
        for _ in range(3):  # gradients from 1e-7 to 10, as a training step has
            grad = (torch.randn(n, generator=gen, dtype=torch.float32)
                    * 10.0 ** torch.randint(-7, 2, (n,), generator=gen))
            for p, opt in zip(params, optimizers, strict=True):
                p.grad = grad.clone()
                opt.step()
        theirs, ours = (opt.state[p] for opt, p in zip(optimizers, params, strict=True))
        if not (torch.equal(params[0], params[1]) and
                all(torch.equal(ours[k], theirs[k]) for k in ("exp_avg", "exp_avg_sq", "step"))):
            return False
    return calls == [True] * 3 * len(cases)  # it ran each time: no check passes by default


# MKL's root first, as torch's x86 builds use it; C's exact sqrtf otherwise.
_loaded = native.CheckedKernel(
    SOURCE, native.vml_first("vmsSqrt", lambda library, sqrt: _bind(library, sqrt)),
    _agrees_with_torch,
    f"torch {torch.__version__}'s AdamW rounds differently from {SOURCE.name}")


def load_kernel() -> Kernel | None:
    """The checked kernel, built on first use; None when it cannot be had (see the reason)."""
    return _loaded.load()


def unavailable_reason() -> str | None:
    return _loaded.reason


def _group_fits(group: dict[str, Any]) -> bool:
    """Whether torch runs its single-tensor AdamW, without amsgrad, on the CPU for this group.

    (With a parameter on a GPU torch would pick its foreach code: the group is left to torch.)
    """
    numbers = (group["lr"], *group["betas"], group["eps"], group["weight_decay"])
    flags = ("amsgrad", "maximize", "foreach", "fused", "capturable", "differentiable")
    return (all(isinstance(x, (int, float)) for x in numbers)
            and not any(group.get(k) for k in flags) and group.get("decoupled_weight_decay", True)
            and all(p.device.type == "cpu" for p in group["params"]))


def _tensors_fit(*tensors: torch.Tensor) -> bool:
    """Plain contiguous CPU float32 tensors (not a subclass, such as FSDP's DTensor, nor a
    lazily negated view) with storages of their own (the kernel reads all, then writes)."""
    return (all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"
                and t.dtype == torch.float32 and t.layout == torch.strided and t.is_contiguous()
                and not t.is_neg() and not t.is_conj() for t in tensors)
            and len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors))


def _scalars(group: dict[str, Any], step: float) -> tuple[float, ...]:
    """The kernel's seven numbers, computed in float64 as torch's _single_tensor_adam does."""
    lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    return (1 - lr * decay, 1 - beta1, beta2, 1 - beta2, bias_correction2**0.5, eps, -step_size)


def _as_floats(scalars: Sequence[float]) -> bool:
    """Whether ATen converts each to float32 (it raises for a finite value out of range)."""
    return all(not math.isfinite(x) or abs(x) <= _FLOAT_MAX for x in scalars)


class FastAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose CPU float32 updates run ``adamw_step.c``: the same bits.

    The constructor and ``state_dict`` are AdamW's. What the kernel does not cover goes
    through torch's code (see the module's doc).
    """

    kernel: Kernel | None = None  # None: load_kernel()'s; an instance may be given another

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        kernel = self.kernel or load_kernel()
        if (kernel is None or torch.compiler.is_compiling()
                or getattr(self, "grad_scale", None) is not None
                or getattr(self, "found_inf", None) is not None
                or not all(_group_fits(g) for g in self.param_groups)):
            return self._torch_step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, [], steps)
            for p, g, m, v, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
                if _tensors_fit(p, g, m, v):
                    step_t += 1
                    scalars = _scalars(group, step_t.item())
                    if _as_floats(scalars) and kernel(p, g, m, v, scalars):
                        continue
                    step_t -= 1  # exact: a whole number below 2**24
                _torch_update(group, p, g, m, v, step_t)
        return loss

    def _torch_step(self, closure: Callable[[], float] | None) -> float | None:
        """AdamW's own step, without running the optimizer hooks a second time.

        torch wraps each optimizer class's ``step`` in its hook runner when the first
        instance is made; ``self.step`` has run them already.
        """
        step = torch.optim.AdamW.step
        return (step.__wrapped__ if getattr(step, "hooked", False) else step)(self, closure)


def _torch_update(group: dict[str, Any], p: torch.Tensor, g: torch.Tensor, m: torch.Tensor,
                  v: torch.Tensor, step_t: torch.Tensor) -> None:
    """torch's own single-tensor AdamW update of one parameter."""
    torch_adam(
        [p], [g], [m], [v], [], [step_t], foreach=False, decoupled_weight_decay=True,
        amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
        weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
    )
