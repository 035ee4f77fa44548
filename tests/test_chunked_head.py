"""The sliced output head (``--compile`` on a CPU in fp32) computes the plain head's values.

In a compiled training step: tests/test_compiled_training.py.
"""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch
from torch import nn

from diygpt.chunked_head import ChunkedHead, chunk_head, head_forward, head_weight_grad
from diygpt.cli.speed_flags import prepare_model
from diygpt.config import get_preset
from diygpt.model import GPTModel
from diygpt.speed import pad_vocab

CFG = get_preset("tiny").with_updates(vocab_size=300, context_length=16)


@pytest.mark.parametrize("bias", [False, True])
def test_head_equals_linear_in_values_and_gradients(bias):
    torch.manual_seed(0)
    plain = nn.Linear(16, 37, bias=bias)
    sliced = nn.Linear(16, 37, bias=bias)
    sliced.load_state_dict(plain.state_dict())
    sliced.__class__, sliced.chunk = ChunkedHead, 8
    x = torch.randn(3, 5, 16, requires_grad=True)
    grad = torch.randn(3, 5, 37)
    want = plain(x)
    got = sliced(x)
    assert got.shape == (3, 5, 37)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    want_grads = torch.autograd.grad(want, (x, *plain.parameters()), grad)
    got_grads = torch.autograd.grad(got, (x, *sliced.parameters()), grad)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_ops_pass_torchs_operator_checks():
    """Fake tensors (compile's shapes), autograd registration, schema: torch's own checks."""
    x = torch.randn(15, 16, requires_grad=True)
    weight = torch.randn(37, 16, requires_grad=True)
    torch.library.opcheck(head_forward, (x, weight, 8))
    torch.library.opcheck(head_weight_grad, (torch.randn(15, 37), torch.randn(15, 16), 8))


def test_the_weights_gradient_alone_when_the_input_needs_none():
    x = torch.randn(6, 16)  # as the head's input would be with the rest of the model frozen
    weight = torch.randn(37, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(head_forward(x, weight, 8).sum(), weight)
    torch.testing.assert_close(grad, torch.ones(6, 37).t() @ x)


def test_chunk_head_keeps_the_state_dict_and_switches_plain_heads_only():
    model = GPTModel(CFG)
    keys = list(model.state_dict())
    assert chunk_head(model, chunk=64) is True
    assert type(model.out_head) is ChunkedHead and model.out_head.chunk == 64
    assert list(model.state_dict()) == keys
    assert chunk_head(model) is False  # already switched
    padded = pad_vocab(GPTModel(CFG))
    assert chunk_head(padded) is False
    assert type(padded.out_head) is not ChunkedHead


@pytest.mark.parametrize(
    ("compile_", "device", "dtype", "fsdp", "expected"),
    [
        (True, "cpu", "fp32", False, True),
        (False, "cpu", "fp32", False, False),
        (True, "cpu", "bf16", False, False),  # autocast's bf16 products stay
        (True, "cpu", "fp32", True, False),  # not measured under FSDP
        (True, "cuda", "fp32", False, False),  # measured on the CPU only
    ],
)
def test_prepare_model_slices_the_head_for_compiled_cpu_fp32_only(compile_, device, dtype,
                                                                  fsdp, expected):
    model = GPTModel(CFG)
    args = Namespace(tf32=False, pad_vocab=False, compile=compile_, dtype=dtype, fsdp=fsdp)
    prepare_model(args, model, torch.device(device))
    assert (type(model.out_head) is ChunkedHead) is expected
