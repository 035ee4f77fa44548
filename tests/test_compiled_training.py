"""``--compile`` on the CPU trains along the eager model's curve: the same dropout masks."""

from __future__ import annotations

import shutil

import pytest
import torch

from diygpt.chunked_head import chunk_head
from diygpt.config import get_preset
from diygpt.losses import token_cross_entropy
from diygpt.model import GPTModel
from diygpt.speed import compile_loss, compile_model, make_adamw

# Dropout on, as in the book's 124M run: the masks are what compiling could change.
CFG = get_preset("tiny").with_updates(vocab_size=300, context_length=16, drop_rate=0.1)


def _train(compiled: bool, steps: int = 3, sliced_head: bool = False) -> tuple[list[float], GPTModel]:
    """The losses of ``steps`` AdamW steps on one batch, and the model after them."""
    torch.manual_seed(123)
    model = GPTModel(CFG).train()
    if sliced_head:
        chunk_head(model, chunk=64)  # 300 = 4 slices of 64 and a shorter one
    optimizer = make_adamw(model.parameters(), 4e-4, 0.1, fused=compiled)
    forward, loss_fn = (compile_model(model), compile_loss()) if compiled else (model, token_cross_entropy)
    x = torch.randint(0, CFG.vocab_size, (2, CFG.context_length))
    y = torch.roll(x, -1, dims=1)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(forward(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model


def test_compile_model_keeps_torchs_generator_on_the_cpu_only(monkeypatch):
    seen = []
    monkeypatch.setattr("diygpt.speed.torch.compile", lambda model, **kw: seen.append(kw) or model)
    compile_model(GPTModel(CFG))
    compile_model(GPTModel(CFG).to("meta"))  # stands in for a GPU: inductor draws there
    assert seen == [{"options": {"fallback_random": True}}, {}]


def test_compile_model_max_autotune_goes_in_as_options(monkeypatch):
    """torch.compile refuses mode= with options=, so the mode's own options are passed, with
    the CPU's generator setting kept; CUDA graphs (max-autotune's other form) stay off."""
    seen = []
    monkeypatch.setattr("diygpt.speed.torch.compile", lambda model, **kw: seen.append(kw) or model)
    compile_model(GPTModel(CFG), "max-autotune")
    compile_model(GPTModel(CFG).to("meta"), "max-autotune")
    compile_model(GPTModel(CFG).to("meta"), "max-autotune-aten")
    tuned = {"max_autotune": True, "coordinate_descent_tuning": True}
    aten = {**tuned, "max_autotune_gemm_backends": "ATEN"}  # no Triton templates
    assert seen == [{"options": {**tuned, "fallback_random": True}}, {"options": tuned},
                    {"options": aten}]
    with torch._inductor.config.patch(aten):  # names inductor knows (a typo would raise)
        assert torch._inductor.config.max_autotune_gemm_backends == "ATEN"
    with pytest.raises(ValueError, match="compile mode 'fast'"):
        compile_model(GPTModel(CFG), "fast")


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_training_follows_the_eager_curve_with_dropout():
    torch._dynamo.reset()
    eager, _ = _train(compiled=False)
    compiled, _ = _train(compiled=True)
    # The same masks: only the fused kernels' rounding differs. Other masks would move the
    # first loss already by 2e-2 at this size.
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-5)
    assert eager[-1] < eager[0]  # the steps do train


def test_compiled_training_with_the_sliced_head_follows_the_plain_heads_run():
    """diygpt.chunked_head's operators inside the compiled step, dropout on: the same losses
    and weights as the plain head (torch's generator is not moved either)."""
    losses, model = _train(compiled=True, steps=2, sliced_head=True)
    want_losses, want_model = _train(compiled=True, steps=2)
    assert losses == pytest.approx(want_losses, rel=1e-6)
    want = want_model.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6)


def test_compiled_training_with_fast_draws_equals_torchs_draws(monkeypatch):
    """diygpt.fast_draws under a compiled model: inductor's calls to torch's bernoulli_ reach
    the kernel, and the run is the same to the bit (the same masks, in the same order)."""
    from diygpt import fast_draws as fd

    if fd.load_kernel() is None:
        pytest.skip(f"fast draws unavailable: {fd.unavailable_reason()}")
    want_losses, want_model = _train(compiled=True, steps=2)
    want_rng = torch.get_rng_state()
    calls = []
    kernel = fd._loaded.kernel
    monkeypatch.setattr(fd._loaded, "kernel", lambda *args: calls.append(args[2]) or kernel(*args))
    with fd.fast_draws():
        losses, model = _train(compiled=True, steps=2)
    # one embedding dropout and three per block (attention's weights, two shortcuts), 2 steps
    assert len(calls) == 2 * (1 + 3 * CFG.n_layers)
    assert losses == want_losses
    assert torch.equal(torch.get_rng_state(), want_rng)
    want = want_model.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, want[name]), name
