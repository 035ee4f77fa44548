"""diygpt.fast_gelu: the book's GELU and autograd's gradient of it, bit for bit, in one pass."""

from __future__ import annotations

import copy

import pytest
import torch
from cli_helpers import train_tiny

from diygpt import fast_gelu as fg
from diygpt.config import get_preset
from diygpt.lean import lean_activations
from diygpt.losses import calc_loss_batch
from diygpt.model import GELU, GPTModel
from tests_helpers import forget_kernel

pytestmark = pytest.mark.skipif(fg.load_kernel() is None,
                                reason=f"kernel unavailable: {fg.unavailable_reason()}")

CFG = get_preset("tiny").with_updates(vocab_size=300, context_length=32, drop_rate=0.1)


def _counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """'forward' or 'backward' for each call the kernel serves, from now on."""
    calls: list[str] = []
    kernel = fg.load_kernel()

    class Counted:
        def forward(self, x, parts):
            calls.append("forward")
            return kernel.forward(x, parts)

        def backward(self, grad, x, t):
            calls.append("backward")
            return kernel.backward(grad, x, t)

    monkeypatch.setattr(fg._loaded, "kernel", Counted())
    return calls


def _values(n: int, seed: int) -> torch.Tensor:
    """From subnormal to saturating, with both zeros, infinities and a NaN."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-4, 2, (n,), generator=gen)
    x[::5] *= 1e-40  # subnormal, and their cubes underflow
    if n > 10:
        x[:5] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0])
    return x


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same bits (so -0.0 is not 0.0), and NaN where the other has NaN."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(torch.int32),
                                                       b[~nan].view(torch.int32))


@pytest.mark.parametrize("n", [1, 17, 2047, 2049, 70_000, 200_000])
def test_forward_and_backward_equal_torchs_ops(n: int) -> None:
    kernel = fg.load_kernel()
    x, grad = _values(n, n), _values(n, n + 1)
    y, half, t = fg.torch_parts(x)
    assert _same(GELU.forward(None, x), y)  # the model's own formula: the same ops
    assert all(map(_same, kernel.forward(x, parts=True), (y, half, t)))
    assert _same(kernel.forward(x, parts=False)[0], y)
    expected = fg.torch_backward(grad, x, half, t)
    assert _same(kernel.backward(grad, x, t), expected)
    assert _same(kernel.backward(grad, x, None), expected)  # t remade from x


@pytest.mark.parametrize("recompute", [True, False])
def test_training_gradients_equal_the_book_modules(recompute: bool, monkeypatch) -> None:
    calls = _counted(monkeypatch)
    torch.manual_seed(0)
    plain = GPTModel(CFG.with_updates(attn_impl="eager")).train()
    lean = lean_activations(copy.deepcopy(plain), recompute=recompute)
    x, y = torch.randint(0, 300, (3, 32)), torch.randint(0, 300, (3, 32))
    results = []
    for model, fast in ((plain, False), (lean, True)):
        torch.manual_seed(7)
        with fg.fast_gelu(fast) as on:
            assert on == fast
            loss = calc_loss_batch(x, y, model, "cpu")
            loss.backward()
        results.append((loss, [p.grad for p in model.parameters()], torch.get_rng_state()))
    (loss_a, grads_a, rng_a), (loss_b, grads_b, rng_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(rng_a, rng_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    # each block's GELU: its forward, with recompute its parts again in backward, its backward
    layers = CFG.n_layers
    assert calls.count("forward") == layers * (2 if recompute else 1)
    assert calls.count("backward") == layers


def test_torchs_ops_outside_the_block_and_for_other_tensors(monkeypatch) -> None:
    calls = _counted(monkeypatch)
    x = torch.randn(4, 6)
    assert fg.forward(x) is None and fg.backward(x, x, None) is None
    with fg.fast_gelu():
        with fg.fast_gelu():  # nests
            assert fg.forward(x) is not None
        assert fg.forward(x) is not None
        assert fg.forward(x.double()) is None
        assert fg.forward(x.t()) is None
        assert fg.backward(x.t(), x, None) is None
        assert fg.backward(torch.randn(3), x, None) is None  # another shape
        assert fg.forward(x.clone().requires_grad_()) is None  # would leave autograd's graph
        with torch.no_grad():
            assert fg.forward(x.clone().requires_grad_()) is not None
        empty, offset = torch.randn(0, 5), torch.randn(10)[3:]
        assert fg.forward(empty)[0].shape == (0, 5)
        assert _same(fg.forward(offset)[0], GELU.forward(None, offset))
    assert fg.forward(x) is None and fg._users == 0
    with fg.fast_gelu(enabled=False) as on:
        assert not on and fg.forward(x) is None
    assert calls == ["forward"] * 5


def test_a_non_contiguous_gradient_takes_torchs_backward(monkeypatch) -> None:
    calls = _counted(monkeypatch)
    x = torch.randn(8, 6)
    results = []
    for fast in (True, False):
        leaf = x.clone().requires_grad_()
        with fg.fast_gelu(fast):
            y = lean_activations(torch.nn.Sequential(GELU()))(leaf)
            (y.t() * torch.arange(48.0).reshape(6, 8)).sum().backward()  # grad arrives as y.t()'s
        results.append((y, leaf.grad))
    assert all(map(_same, *results))
    assert calls == ["forward"]


@pytest.mark.skipif(not torch.set_flush_denormal(False), reason="no flush-to-zero mode here")
def test_flush_to_zero_leaves_gelu_to_torchs_ops(monkeypatch) -> None:
    """torch's flush-to-zero is the calling thread's only: the split among threads decides."""
    calls = _counted(monkeypatch)
    x = _values(200_000, 5)
    GELU.forward(None, x)  # torch's threads are up before the mode is set
    torch.set_flush_denormal(True)
    try:
        with fg.fast_gelu():
            assert fg.forward(x) is None and fg.backward(x, x, None) is None
    finally:
        torch.set_flush_denormal(False)
    assert calls == ["forward", "backward"]  # asked, and refused


def test_unavailable_kernel_is_reported_not_raised(monkeypatch, tmp_path) -> None:
    forget_kernel(monkeypatch, fg._loaded, no_compiler_in=tmp_path)
    assert fg.load_kernel() is None
    assert "no-such-cc" in (fg.unavailable_reason() or "")
    with fg.fast_gelu() as on:
        assert not on and fg.forward(torch.randn(3)) is None


def test_a_kernel_that_rounds_differently_is_not_used(monkeypatch) -> None:
    kernel = fg.load_kernel()

    class OneUlpOff:
        def forward(self, x, parts):
            outs = kernel.forward(x, parts)
            return (torch.nextafter(outs[0], torch.full_like(x, float("inf"))), *outs[1:])

        def backward(self, grad, x, t):
            return kernel.backward(grad, x, t)

    assert fg._agrees_with_torch(kernel)
    assert not fg._agrees_with_torch(OneUlpOff())
    forget_kernel(monkeypatch, fg._loaded)
    monkeypatch.setattr(fg, "_Kernel", lambda library, tanh: OneUlpOff())
    assert fg.load_kernel() is None
    assert "round differently" in fg.unavailable_reason()


def test_cli_uses_it_by_default_on_the_cpu_with_the_same_result(data, tmp_path, capsys,
                                                                monkeypatch) -> None:
    calls = _counted(monkeypatch)
    runs = []
    for extra in ([], ["--no-fast-gelu"], ["--no-recompute"]):
        out = tmp_path / f"run{len(runs)}"
        before = len(calls)
        rc, stdout, err = train_tiny(capsys, data, out, "--max-steps", "3", "--attn", "eager",
                                     "--drop-rate", "0.1", *extra)
        assert rc == 0, err
        assert (len(calls) > before) == ("--no-fast-gelu" not in extra)
        runs.append(((out / "model.safetensors").read_bytes(), stdout))
    assert runs[0] == runs[1] == runs[2]
