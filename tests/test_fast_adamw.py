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
from tests_helpers import forget_kernel

pytestmark = pytest.mark.skipif(fa.load_kernel() is None,
                                reason=f"kernel unavailable: {fa.unavailable_reason()}")

TINY = {"vocab_size": 300, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": True}


def _counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the tensors the kernel updates, from now on."""
    calls: list[int] = []
    kernel = fa.load_kernel()

    def counted(p, *rest) -> bool:
        done = kernel(p, *rest)
        if done:
            calls.append(p.numel())
        return done

    monkeypatch.setattr(fa._loaded, "kernel", counted)
    return calls


def _run(cls, params: list[torch.Tensor], grads: list[list[torch.Tensor]], **kwargs):
    """``cls`` stepped once per entry of ``grads``; (params, optimizer)."""
    params = [p.detach().clone().requires_grad_() for p in params]
    opt = cls(params, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g if g.is_neg() else g.clone()  # a clone would resolve the negation
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
    assert calls == ([n] * 4 if n else [])  # empty tensors share the null storage: torch's


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_model_with_two_groups_on_any_thread_count(threads: int, monkeypatch) -> None:
    """A part per thread for the large tensors; the same bits however they are split."""
    calls = _counted(monkeypatch)
    torch.manual_seed(0)
    model = GPTModel(TINY)
    # and one parameter large enough for three threads' parts (each at least 65,536)
    params = [*model.parameters(), torch.randn(200_000)]
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


@pytest.mark.parametrize("case", ["amsgrad", "maximize", "foreach", "fused", "tensor lr", "tensor betas", "float64", "transposed",
                                  "negated gradient"])
def test_what_the_kernel_does_not_cover_is_torchs(case: str, monkeypatch) -> None:
    calls = _counted(monkeypatch)
    kwargs = {"lr": 4e-4, "weight_decay": 0.1}
    base = torch.randn(6, 40)
    if case in ("amsgrad", "maximize", "foreach", "fused"):
        kwargs[case] = True
    elif case == "tensor lr":
        kwargs["lr"] = torch.tensor(4e-4)
    elif case == "tensor betas":
        kwargs["betas"] = (torch.tensor(0.9), torch.tensor(0.999))
    elif case == "float64":
        base = base.double()
    params = [base.t() if case == "transposed" else base, torch.randn(7)]
    grads = [[g.to(p.dtype).reshape(p.shape) for g, p in zip(step, params, strict=True)]
             for step in _grads([(240,), (7,)], steps=3)]
    if case == "negated gradient":  # contiguous float32, its values negated on reading
        grads = [[torch._neg_view(-g) for g in step] for step in grads]
    ours = _run(fa.FastAdamW, params, grads, **kwargs)
    theirs = _run(torch.optim.AdamW, params, grads, **kwargs)
    _assert_same(ours, theirs)
    # A tensor that does not fit is updated by torch alone; a group that does not, all of it.
    assert calls == ([7] * 3 if case in ("float64", "transposed") else [])


def test_an_lr_past_float32_raises_as_torchs_does() -> None:
    for cls in (torch.optim.AdamW, fa.FastAdamW):
        with pytest.raises(RuntimeError, match="overflow"):
            _run(cls, [torch.randn(5)], _grads([(5,)], steps=1), lr=1e39, weight_decay=0.1)


def test_a_gradient_that_is_the_weight_itself_is_torchs(monkeypatch) -> None:
    calls = _counted(monkeypatch)
    runs = []
    for cls in (fa.FastAdamW, torch.optim.AdamW):
        p = torch.randn(1000, generator=torch.Generator().manual_seed(3)).requires_grad_()
        opt = cls([p], lr=0.1, weight_decay=0.1)
        for _ in range(3):
            p.grad = p.detach()  # read and written in one pass would not be torch's order
            opt.step()
        runs.append(([p], opt))
    _assert_same(*runs)
    assert calls == []


@pytest.mark.skipif(not torch.set_flush_denormal(False), reason="no flush-to-zero mode here")
def test_flush_to_zero_leaves_the_update_to_torch(monkeypatch) -> None:
    """torch's flush-to-zero is the calling thread's only: its result is torch's to make."""
    calls = _counted(monkeypatch)
    params = [torch.randn(200_000)]
    grads = [[g * 1e-19 for g in step] for step in _grads([(200_000,)], steps=3)]  # denormal g**2
    torch.set_flush_denormal(True)
    try:
        ours = _run(fa.FastAdamW, params, grads, lr=4e-4, weight_decay=0.1)
        theirs = _run(torch.optim.AdamW, params, grads, lr=4e-4, weight_decay=0.1)
    finally:
        torch.set_flush_denormal(False)
    _assert_same(ours, theirs)
    assert calls == []
    _run(fa.FastAdamW, params, grads, lr=4e-4, weight_decay=0.1)
    assert calls == [200_000] * 3


@pytest.mark.parametrize("fits", [True, False])
def test_hooks_run_once_and_the_closure_is_called(fits: bool, monkeypatch) -> None:
    calls = _counted(monkeypatch)
    seen = []
    p = torch.randn(10, requires_grad=True)
    opt = fa.FastAdamW([p], lr=1e-3, amsgrad=not fits)
    opt.register_step_pre_hook(lambda *args: seen.append("pre"))
    opt.register_step_post_hook(lambda *args: seen.append("post"))
    torch.optim.AdamW([torch.randn(2, requires_grad=True)])  # torch wraps AdamW.step in hooks

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    assert opt.step(closure) is not None
    assert seen == ["pre", "post"]
    assert calls == ([10] if fits else [])


def test_unavailable_kernel_is_reported_not_raised(monkeypatch, tmp_path) -> None:
    forget_kernel(monkeypatch, fa._loaded, no_compiler_in=tmp_path)
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
    assert not fa._agrees_with_torch(lambda *args: False)  # torch's values, but never the kernel's

    def off_by_one_ulp(p, g, m, v, scalars) -> None:
        kernel(p, g, m, v, scalars)
        p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))

    forget_kernel(monkeypatch, fa._loaded)
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
