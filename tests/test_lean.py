"""Lean GELU and dropout: the book modules' outputs, gradients and RNG use, with less kept."""

from __future__ import annotations

import copy

import pytest
import torch

from diygpt.config import get_preset
from diygpt.lean import lean_activations
from diygpt.losses import calc_loss_batch
from diygpt.model import GPTModel

CFG = get_preset("tiny").with_updates(vocab_size=300, context_length=32, drop_rate=0.1)


def _step(model: GPTModel, x: torch.Tensor, y: torch.Tensor):
    """Loss, gradients, the RNG state after, and the bytes kept for backward."""
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        kept[storage.data_ptr()] = storage.nbytes()
        return t

    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = calc_loss_batch(x, y, model, "cpu")
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss, grads, torch.get_rng_state(), sum(n for k, n in kept.items() if k not in params)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bit_identical_to_the_book_modules_with_less_kept(attn):
    torch.manual_seed(0)
    plain = GPTModel(CFG.with_updates(attn_impl=attn)).train()
    lean = lean_activations(copy.deepcopy(plain))
    x, y = torch.randint(0, 300, (3, 32)), torch.randint(0, 300, (3, 32))
    for _ in range(2):  # two steps: the dropout masks of each are drawn alike
        loss_a, grads_a, rng_a, kept_a = _step(plain, x, y)
        loss_b, grads_b, rng_b, kept_b = _step(lean, x, y)
        assert torch.equal(loss_a, loss_b)
        assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
        assert torch.equal(rng_a, rng_b)
    # per block, GELU keeps 1 of its 4 tensors, and each dropout a bool mask
    assert kept_b < 0.8 * kept_a


def test_evaluation_and_state_dict_are_unchanged():
    torch.manual_seed(0)
    plain = GPTModel(CFG).eval()
    lean = lean_activations(copy.deepcopy(plain))
    assert lean.state_dict().keys() == plain.state_dict().keys()
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(lean(x), plain(x))
    lean.train()
    torch.manual_seed(1)
    with torch.no_grad():  # no gradient: F.dropout itself, the same draw
        a = lean(x)
    torch.manual_seed(1)
    with torch.no_grad():
        assert torch.equal(a, plain.train()(x))
