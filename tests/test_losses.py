"""The CPU's in-place cross entropy: the loss and gradient of F.cross_entropy, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diygpt import losses
from diygpt.losses import cross_entropy


def _loss_and_grad(fn, logits: torch.Tensor, targets: torch.Tensor, scale: float):
    x = logits.clone().requires_grad_()
    loss = fn(x, targets)
    (loss * scale).backward()  # an upstream factor, as grad accumulation's weights give
    return loss.detach(), x.grad


@pytest.mark.parametrize(("rows", "vocab", "spread"), [(512, 50257, 3.0), (37, 300, 10.0),
                                                      (5, 7, 0.1)])
def test_same_loss_and_gradient_as_f_cross_entropy(rows, vocab, spread, monkeypatch):
    # Slices of 8 rows (and so a short last slice) for the smaller shapes.
    monkeypatch.setattr(losses, "CE_SLICE_BYTES", 8 * vocab * 4 if vocab < 50257
                        else losses.CE_SLICE_BYTES)
    torch.manual_seed(rows)
    logits = torch.randn(rows, vocab) * spread
    targets = torch.randint(0, vocab, (rows,))
    for scale in (1.0, 0.37):
        expected = _loss_and_grad(F.cross_entropy, logits, targets, scale)
        got = _loss_and_grad(cross_entropy, logits, targets, scale)
        assert torch.equal(got[0], expected[0])
        assert torch.equal(got[1], expected[1])


def test_uses_the_in_place_backward_only_where_it_applies():
    logits = torch.randn(6, 11, requires_grad=True)
    targets = torch.randint(0, 11, (6,))
    assert type(cross_entropy(logits, targets).grad_fn).__name__ == "_CrossEntropyInPlaceBackward"
    ignored = targets.clone()
    ignored[0] = -100  # ignore_index: F.cross_entropy's own path, which leaves the row out
    loss = cross_entropy(logits, ignored)
    assert torch.equal(loss, F.cross_entropy(logits, ignored))
    assert type(loss.grad_fn).__name__ != "_CrossEntropyInPlaceBackward"
    with torch.no_grad():  # evaluation: nothing to save
        assert cross_entropy(logits, targets).grad_fn is None
    # uint8 targets, which F.cross_entropy takes and an index would read as a mask
    small = targets.to(torch.uint8)
    loss = cross_entropy(logits, small)
    assert type(loss.grad_fn).__name__ != "_CrossEntropyInPlaceBackward"
    assert torch.equal(loss, F.cross_entropy(logits, targets))


def test_a_second_order_gradient_is_refused_not_silently_wrong():
    layer = torch.nn.Linear(4, 11)
    loss = cross_entropy(layer(torch.randn(6, 4)), torch.randint(0, 11, (6,)))
    with pytest.raises(RuntimeError, match="no second-order gradient; pass calc_loss_batch"):
        torch.autograd.grad(loss, layer.weight, create_graph=True)


def test_a_second_backward_through_a_retained_graph_says_what_to_do():
    # the first gradient overwrote the saved log-probabilities; torch's own message named
    # "an inplace operation" and a tensor version, not the way out
    layer = torch.nn.Linear(4, 11)
    loss = cross_entropy(layer(torch.randn(6, 4)), torch.randint(0, 11, (6,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagates once .* pass calc_loss_batch loss_fn="):
        loss.backward()
    # without retain_graph, torch's own message (which names retain_graph) is the right one
    loss = cross_entropy(layer(torch.randn(6, 4)), torch.randint(0, 11, (6,)))
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_calc_loss_loader_caps_batches_gives_nan_when_empty_and_refuses_zero():
    from diygpt import GPTModel, calc_loss_batch, calc_loss_loader
    from diygpt.errors import DataError

    torch.manual_seed(0)
    model = GPTModel({"vocab_size": 50, "context_length": 8, "emb_dim": 16, "n_heads": 2,
                      "n_layers": 1, "drop_rate": 0.0, "qkv_bias": False}).eval()
    batches = [(torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))) for _ in range(3)]
    with torch.no_grad():
        each = [calc_loss_batch(x, y, model, "cpu").item() for x, y in batches]
        assert calc_loss_loader(batches, model, "cpu", num_batches=2) == sum(each[:2]) / 2
        assert calc_loss_loader(batches, model, "cpu", num_batches=99) == sum(each) / 3
        assert calc_loss_loader([], model, "cpu") != calc_loss_loader([], model, "cpu")  # nan
        for bad in (0, -1):  # the book divides by zero, or by a negative count
            with pytest.raises(DataError, match="num_batches must be positive"):
                calc_loss_loader(batches, model, "cpu", num_batches=bad)
