"""diygpt.fast_adamw: torch's AdamW weights and moments, bit for bit, from one pass."""

from __future__ import annotations

import copy
import ctypes

import pytest
import torch
from cli_helpers import train_tiny

from diygpt import GPTModel
from diygpt import fast_adamw as fa
from diygpt.resume import read_training_checkpoint

pytestmark = pytest.mark.skipif(fa.load_kernel() is None,
                                reason=f"kernel unavailable: {fa.unavailable_reason()}")

TINY = {"vocab_size": 300, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": True}


def _counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes the kernel is called with, from now on."""
    calls: list[int] = []
    kernel = fa.load_kernel()
    monkeypatch.setattr(fa, "_kernel", lambda p, *rest: calls.append(p.numel()) or kernel(p, *rest))
    return calls


def _run(cls, params: list[torch.Tensor], grads: list[list[torch.Tensor]], **kwargs):
    """``cls`` stepped once per entry of ``grads``; (params, optimizer)."""
    params = [p.detach().clone().requires_grad_() for p in params]
    opt = cls(params, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    return params, opt


def _assert_same(a: tuple, b: tuple) -> None:
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa.state[x][key], ob.state[y][key]), key
    assert oa.state_dict()["param_groups"] == ob.state_dict()["param_groups"]


def _grads(shapes, steps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Gradients from 1e-7 to 10 in size, as a training step's are."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) * 10.0 ** torch.randint(-7, 2, s, generator=gen)
             for s in shapes] for _ in range(steps)]


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 33, 2047, 2049, 131_072, 140_001])
@pytest.mark.parametrize("kwargs", [
    {"lr": 4e-4, "weight_decay": 0.1},
    {"lr": 1e-2, "weight_decay": 0.0, "betas": (0.3, 0.99), "eps": 1e-6},  # lerp's other form
    {"lr": 3e-3, "weight_decay": 0.5, "betas": (0.5, 0.95)},  # a weight of exactly 0.5
])
def test_weights_and_moments_equal_torchs(n: int, kwargs, monkeypatch) -> None:
    calls = _counted(monkeypatch)
    params = [torch.randn(n, generator=torch.Generator().manual_seed(n))]
    grads = _grads([(n,)], steps=4)
    _assert_same(_run(fa.FastAdamW, params, grads, **kwargs),
                 _run(torch.optim.AdamW, params, grads, **kwargs))
    assert calls == [n] * 4


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_model_with_two_groups_on_any_thread_count(threads: int, monkeypatch) -> None:
    """A part per thread for the large tensors; the same bits however they are split."""
    calls = _counted(monkeypatch)
    torch.manual_seed(0)
    model = GPTModel(TINY)
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    grads = _grads(shapes, steps=3, seed=1)

    def run(cls):
        copies, _ = _run(cls, params, [])
        opt = cls([{"params": copies[::2], "weight_decay": 0.1},
                   {"params": copies[1::2], "weight_decay": 0.0, "lr": 1e-3}], lr=4e-4)
        for step_grads in grads:
            for p, g in zip(copies, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        return copies, opt

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _assert_same(run(fa.FastAdamW), run(torch.optim.AdamW))
    finally:
        torch.set_num_threads(before)
    assert len(calls) == 3 * len(params)


def test_state_dict_is_adamws_both_ways() -> None:
    params = [torch.randn(70_000), torch.randn(5)]
    grads = _grads([(70_000,), (5,)], steps=5)
    for first, second in ((fa.FastAdamW, torch.optim.AdamW), (torch.optim.AdamW, fa.FastAdamW)):
        a, opt_a = _run(first, params, grads[:2], lr=4e-4, weight_decay=0.1)
        b = [p.detach().clone().requires_grad_() for p in a]
        opt_b = second(b, lr=4e-4, weight_decay=0.1)
        opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # it would share the moments
        for step_grads in grads[2:]:
            for x, y, g in zip(a, b, step_grads, strict=True):
                x.grad, y.grad = g.clone(), g.clone()
            opt_a.step()
            opt_b.step()
        _assert_same((a, opt_a), (b, opt_b))


@pytest.mark.parametrize("case", ["amsgrad", "maximize", "foreach", "float64", "transposed",
                                  "tensor lr"])
def test_what_the_kernel_does_not_cover_is_torchs(case: str, monkeypatch) -> None:
    calls = _counted(monkeypatch)
    kwargs = {"lr": 4e-4, "weight_decay": 0.1}
    base = torch.randn(6, 40)
    if case in ("amsgrad", "maximize", "foreach"):
        kwargs[case] = True
    elif case == "tensor lr":
        kwargs["lr"] = torch.tensor(4e-4)
    elif case == "float64":
        base = base.double()
    params = [base.t() if case == "transposed" else base, torch.randn(7)]
    grads = [[g.to(p.dtype).reshape(p.shape) for g, p in zip(step, params, strict=True)]
             for step in _grads([(240,), (7,)], steps=3)]
    ours = _run(fa.FastAdamW, params, grads, **kwargs)
    theirs = _run(torch.optim.AdamW, params, grads, **kwargs)
    _assert_same(ours, theirs)
    # A tensor that does not fit is updated by torch alone; a group that does not, all of it.
    assert calls == ([7] * 3 if case in ("float64", "transposed") else [])


def test_unavailable_kernel_is_reported_not_raised(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(fa, "_kernel", None)
    monkeypatch.setattr(fa, "_reason", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("DIYGPT_CACHE_DIR", str(tmp_path))
    assert fa.load_kernel() is None
    assert "no-such-cc" in (fa.unavailable_reason() or "")
    params = [torch.randn(100)]
    grads = _grads([(100,)], steps=2)
    _assert_same(_run(fa.FastAdamW, params, grads, lr=1e-3),
                 _run(torch.optim.AdamW, params, grads, lr=1e-3))


def test_a_kernel_that_rounds_differently_is_not_used(monkeypatch) -> None:
    library = ctypes.CDLL(str(fa.native.build(fa.SOURCE)))
    kernel = fa._bind(library, fa._torch_sqrt())
    assert fa._agrees_with_torch(kernel)

    def off_by_one_ulp(p, g, m, v, scalars) -> None:
        kernel(p, g, m, v, scalars)
        p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))

    monkeypatch.setattr(fa, "_kernel", None)
    monkeypatch.setattr(fa, "_reason", None)
    monkeypatch.setattr(fa, "_bind", lambda library, sqrt: off_by_one_ulp)
    assert fa.load_kernel() is None
    assert "rounds differently" in fa.unavailable_reason()


def test_cli_uses_it_by_default_on_the_cpu_with_the_same_result(data, tmp_path, capsys,
                                                                monkeypatch) -> None:
    calls = _counted(monkeypatch)
    runs = []
    for extra in ([], ["--no-fast-adamw"], ["--no-optim-in-backward"], ["--fused-adamw"]):
        out = tmp_path / f"run{len(runs)}"
        before = len(calls)
        rc, stdout, err = train_tiny(capsys, data, out, "--max-steps", "3", "--save-every", "3",
                                     *extra)
        assert rc == 0, err
        assert (len(calls) > before) == (extra in ([], ["--no-optim-in-backward"]))
        ckpt = read_training_checkpoint(out / "ckpt-000002")
        runs.append(((out / "model.safetensors").read_bytes(), stdout, ckpt.optimizer))
    for run in runs[1:3]:
        assert run[:2] == runs[0][:2]
        for key, state in runs[0][2]["state"].items():
            for name, value in state.items():
                assert torch.equal(value, run[2]["state"][key][name]), name
    assert runs[3][0] != runs[0][0]  # torch's fused AdamW rounds otherwise


def test_cli_says_in_one_line_when_the_kernel_is_unavailable(data, tmp_path, capsys,
                                                             monkeypatch) -> None:
    monkeypatch.setattr(fa, "load_kernel", lambda: None)
    monkeypatch.setattr(fa, "_reason", "no C compiler found (set CC)")
    rc, _, err = train_tiny(capsys, data, tmp_path / "run", "--max-steps", "1")
    assert rc == 0, err
    assert "torch's AdamW update, not the fast one: no C compiler found (set CC)" in err
