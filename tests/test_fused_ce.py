"""The Triton cross entropy (diygpt.fused_ce): on CUDA where there is one, and everywhere in
triton's interpreter (conftest sets TRITON_INTERPRET=1 when there is no GPU)."""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diygpt import fused_ce
from diygpt.config import get_preset
from diygpt.losses import token_cross_entropy
from diygpt.model import GPTModel
from diygpt.speed import PaddedHead, pad_vocab, training_loss

pytestmark = pytest.mark.skipif(fused_ce.triton is None, reason="triton is not installed")

TINY = get_preset("tiny").with_updates(vocab_size=257, context_length=16)


@pytest.fixture
def kernel_device(device: str, monkeypatch) -> Iterator[str]:
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs on CPU tensors only in its interpreter")
    monkeypatch.setattr(fused_ce, "BLOCK", 64)  # several blocks per row, a partial last one
    # full fp32 matmuls, whatever an earlier test (a --tf32 CLI run) left switched on
    was = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield device
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = was


def _reference(logits: torch.Tensor, targets: torch.Tensor, vocab: int, scale: float):
    """F.cross_entropy over the first ``vocab`` columns, in fp32, and its logits' gradient."""
    leaf = logits.detach().clone().requires_grad_()
    loss = F.cross_entropy(leaf[..., :vocab].float().reshape(-1, vocab), targets.flatten())
    (loss * scale).backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [257, 300])  # exact vocabulary, or a padded head's output
def test_loss_and_gradient_equal_cross_entropy(kernel_device, dtype, width):
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, width, device=kernel_device) * 4).to(dtype)
    targets = torch.randint(0, 257, (3, 5), device=kernel_device)
    targets[0, 1] = targets[2, 4] = -100  # left out of the mean
    want_loss, want_grad = _reference(logits, targets, 257, scale=0.5)

    leaf = logits.detach().clone().requires_grad_()
    loss = fused_ce.fused_cross_entropy(leaf, targets, vocab_size=257)
    (loss * 0.5).backward()  # the incoming gradient is read on the device, not assumed 1
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    assert leaf.grad.dtype == dtype and leaf.grad.shape == logits.shape
    tol = 1e-6 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(leaf.grad.float(), want_grad.float(), rtol=0, atol=tol)
    assert not leaf.grad[..., 257:].any()  # the padding columns get no gradient
    assert not leaf.grad[0, 1].any() and not leaf.grad[2, 4].any()


def test_reads_a_strided_slice_of_the_logits(kernel_device):
    torch.manual_seed(1)
    wide = torch.randn(2, 4, 320, device=kernel_device, requires_grad=True)
    targets = torch.randint(0, 257, (2, 4), device=kernel_device)
    fused_ce.fused_cross_entropy(wide[..., :257], targets).backward()
    want_loss, want_grad = _reference(wide, targets, 257, scale=1.0)
    torch.testing.assert_close(wide.grad, want_grad, rtol=0, atol=1e-6)
    assert not wide.grad[..., 257:].any()


def test_gpt2_wide_rows_on_cuda():
    """At gpt2's padded width the autotuned GPU kernels loop over several blocks per row
    (the CPU tests get that from the interpreter's BLOCK of 64)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(3)
    logits = (torch.randn(64, 50304, device="cuda") * 3).bfloat16()
    targets = torch.randint(0, 50257, (64,), device="cuda")
    targets[5] = -100
    want_loss, want_grad = _reference(logits, targets, 50257, scale=1.0)
    leaf = logits.detach().clone().requires_grad_()
    loss = fused_ce.fused_cross_entropy(leaf, targets, vocab_size=50257)
    loss.backward()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaf.grad.float(), want_grad.float(), rtol=0, atol=1e-4)
    assert not leaf.grad[:, 50257:].any()


def test_gradients_accumulate_and_are_not_differentiated_again(kernel_device):
    logits = torch.randn(4, 257, device=kernel_device, requires_grad=True)
    targets = torch.tensor([1, 2, 3, 4], device=kernel_device)
    fused_ce.fused_cross_entropy(logits, targets).backward()
    once = logits.grad.clone()
    fused_ce.fused_cross_entropy(logits, targets).backward()
    torch.testing.assert_close(logits.grad, 2 * once)
    upstream = torch.ones((), device=kernel_device, requires_grad=True)
    (grad,) = torch.autograd.grad(fused_ce.fused_cross_entropy(logits, targets), logits,
                                  grad_outputs=upstream, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()  # an error, not a silent zero second derivative


def test_every_target_ignored_gives_nan_as_torch_does(kernel_device):
    logits = torch.randn(1, 3, 257, device=kernel_device)
    targets = torch.full((1, 3), -100, device=kernel_device)
    assert torch.isnan(fused_ce.fused_cross_entropy(logits, targets))
    assert torch.isnan(F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def test_cpu_tensors_outside_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(fused_ce, "INTERPRETED", False)
    with pytest.raises(ValueError, match="runs on CUDA tensors, not cpu ones"):
        fused_ce.fused_cross_entropy(torch.zeros(2, 10), torch.zeros(2, dtype=torch.long))


def test_vocab_wider_than_the_logits_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        fused_ce.fused_cross_entropy(torch.zeros(2, 10), torch.zeros(2, dtype=torch.long), 11)


def test_as_many_targets_as_rows():
    with pytest.raises(ValueError, match="3 targets for 2 rows of logits"):
        fused_ce.fused_cross_entropy(torch.zeros(2, 10), torch.zeros(3, dtype=torch.long))


def test_padded_head_hands_over_its_whole_output_in_training(kernel_device, monkeypatch):
    """training_loss's model and loss give the gradients of the plain sliced head."""
    torch.manual_seed(2)
    model = pad_vocab(GPTModel(TINY)).to(kernel_device).train()
    x = torch.randint(0, 257, (2, 16), device=kernel_device)
    y = torch.randint(0, 257, (2, 16), device=kernel_device)
    token_cross_entropy(model(x), y).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    head: PaddedHead = model.out_head
    monkeypatch.setattr(fused_ce, "available", lambda d: True)  # as on a GPU
    loss_fn = training_loss(model, kernel_device, fused=True)
    assert head.keep_padding
    assert model(x).shape[-1] == 320  # training with gradients: the padded width
    loss_fn(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        assert model(x).shape[-1] == 257  # evaluation and generation: the vocabulary
    assert model.eval()(x).shape[-1] == 257


def test_training_loss_is_the_compiled_one_unless_fused_is_asked_for(monkeypatch):
    model = pad_vocab(GPTModel(TINY))
    monkeypatch.setattr(fused_ce, "available", lambda d: True)  # as on a GPU
    assert not isinstance(training_loss(model, "cuda"), functools.partial)
    assert not model.out_head.keep_padding
    fused = training_loss(model, "cuda", fused=True)
    assert fused.func is fused_ce.fused_cross_entropy and fused.keywords == {"vocab_size": 257}
    assert model.out_head.keep_padding
    training_loss(model, "cuda")  # another loss: the head slices again
    assert not model.out_head.keep_padding


def test_the_cli_compiles_with_the_fused_loss_where_it_runs(monkeypatch):
    from diygpt import speed
    from diygpt.cli import speed_flags

    monkeypatch.setattr(fused_ce, "available", lambda d: torch.device(d).type == "cuda")
    monkeypatch.setattr(speed, "peak_flops", lambda d: None)
    args = argparse.Namespace(dtype="fp32", compile=True, compile_mode="default",
                              pad_vocab=True, fused_adamw=True, tf32=False, lr=4e-4,
                              weight_decay=0.1)
    for device, fused in (("cuda", True), ("cpu", False)):
        model = pad_vocab(GPTModel(TINY))
        setup = speed_flags.setup_training(args, model, torch.device(device))
        assert isinstance(setup.loss_fn, functools.partial) is fused, device
        assert model.out_head.keep_padding is fused
    args.compile = False
    assert speed_flags.setup_training(args, model, torch.device("cuda")).loss_fn \
        is token_cross_entropy


def test_fused_loss_is_for_cuda_only():
    model = pad_vocab(GPTModel(TINY))
    assert not fused_ce.available("cpu")
    assert not isinstance(training_loss(model, "cpu", fused=True), functools.partial)
    assert not model.out_head.keep_padding


def test_kernels_compile_for_hopper():
    """The kernels go through triton's compiler to PTX for sm_90 (no GPU needed), in every
    autotuned configuration: what the interpreter cannot check, such as the types of the
    loop-carried values."""
    code = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from diygpt import fused_ce as f
        common = {"logits_ptr": "*bf16", "row_stride": "i32", "targets_ptr": "*i64",
                  "lse_ptr": "*fp32", "n_vocab": "i32", "ignore_index": "i32",
                  "BLOCK": "constexpr"}
        kernels = {
            f._forward_kernel: ({**common, "loss_ptr": "*fp32"}, f.FORWARD_CONFIGS),
            f._backward_kernel: ({**common, "grad_ptr": "*bf16", "scale_ptr": "*fp32",
                                  "n_cols": "i32"}, f.BACKWARD_CONFIGS),
        }
        for fn, (types, configs) in kernels.items():
            for dtype in ("*bf16", "*fp32"):  # the logits (and their gradient) of autocast, fp32
                sig = {name: types[name] for name in fn.arg_names}
                sig.update({k: dtype for k in ("logits_ptr", "grad_ptr") if k in sig})
                for block, warps in configs:  # every configuration the autotuner may pick
                    src = ASTSource(fn, sig, constexprs={"BLOCK": block})
                    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                         options={"num_warps": warps}).asm["ptx"]
                    assert ptx
        print("compiled")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    where = str(Path(fused_ce.triton.__file__).parents[1])  # maybe the Makefile's own folder
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [where, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "compiled" in done.stdout
