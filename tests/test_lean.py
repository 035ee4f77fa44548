"""Lean activations: the book modules' outputs, gradients and RNG use, with less kept."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch

from diygpt import lean, recompute
from diygpt.config import get_preset
from diygpt.data import prepare_loaders
from diygpt.lean import lean_activations
from diygpt.losses import calc_loss_batch
from diygpt.model import GPTModel
from diygpt.training import TrainConfig, Trainer

CFG = get_preset("tiny").with_updates(vocab_size=300, context_length=32, drop_rate=0.1)


def _step(model: GPTModel, x: torch.Tensor, y: torch.Tensor, monkeypatch):
    """Loss, gradients, the RNG state after, and the bytes kept for backward."""
    kept: dict[int, int] = {}

    def count(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        kept[storage.data_ptr()] = storage.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        count(t)
        return t

    def count_recipe(made: recompute._Made) -> None:  # a recipe keeps its inputs
        for arg in made.recipe.args:
            if isinstance(arg, torch.Tensor):
                count(arg)
            elif isinstance(arg, recompute._Made):  # made again by another recipe
                count_recipe(arg)

    def pack_or_recipe(t: torch.Tensor) -> object:
        packed = recompute_pack(t)
        if isinstance(packed, torch.Tensor):
            count(packed)
        else:
            count_recipe(packed)
        return packed

    # Inside the lean model's forward its own hooks replace ours: count what they keep.
    recompute_pack = recompute._pack
    monkeypatch.setattr(recompute, "_pack", pack_or_recipe)
    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = calc_loss_batch(x, y, model, "cpu")
    monkeypatch.setattr(recompute, "_pack", recompute_pack)
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss, grads, torch.get_rng_state(), sum(n for k, n in kept.items() if k not in params)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bit_identical_to_the_book_modules_with_less_kept(attn, monkeypatch):
    torch.manual_seed(0)
    plain = GPTModel(CFG.with_updates(attn_impl=attn)).train()
    lean = lean_activations(copy.deepcopy(plain))
    x, y = torch.randint(0, 300, (3, 32)), torch.randint(0, 300, (3, 32))
    for _ in range(2):  # two steps: the dropout masks of each are drawn alike
        loss_a, grads_a, rng_a, kept_a = _step(plain, x, y, monkeypatch)
        loss_b, grads_b, rng_b, kept_b = _step(lean, x, y, monkeypatch)
        assert torch.equal(loss_a, loss_b)
        assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
        assert torch.equal(rng_a, rng_b)
    # GELU keeps 1 of its 4 tensors, each dropout a bool mask, and LayerNorm and GELU
    # outputs, x - mean, the normalized x and attention's weights after dropout are
    # recomputed; with eager attention its softmax output too (0.36 before that)
    assert kept_b < (0.33 if attn == "eager" else 0.5) * kept_a
    assert not recompute._marks  # forgotten once the forward pass is over


def test_evaluation_and_state_dict_are_unchanged(monkeypatch):
    torch.manual_seed(0)
    plain = GPTModel(CFG).eval()
    model = lean_activations(copy.deepcopy(plain))
    assert model.state_dict().keys() == plain.state_dict().keys()
    made = []
    for module in (recompute, lean):
        monkeypatch.setattr(module, "Recipe", lambda *args: made.append(args))
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    assert not made  # no recipe bookkeeping where nothing is kept for backward
    monkeypatch.undo()
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():  # no gradient: F.dropout itself, the same draw
        a = model(x)
    torch.manual_seed(1)
    with torch.no_grad():
        assert torch.equal(a, plain.train()(x))


def test_each_recipe_runs_once_in_backward_and_a_retained_graph_runs_again(monkeypatch):
    calls = []
    parts = lean._layer_norm_parts

    def counted(*args):
        calls.append(len(args))
        return parts(*args)

    monkeypatch.setattr(lean, "_layer_norm_parts", counted)
    torch.manual_seed(0)
    plain = GPTModel(CFG).train()
    model = lean_activations(copy.deepcopy(plain))
    x, y = torch.randint(0, 300, (2, 32)), torch.randint(0, 300, (2, 32))
    losses = {}
    for name, m in (("plain", plain), ("lean", model)):
        torch.manual_seed(3)  # F.cross_entropy: calc_loss_batch's writes over its log-probs
        losses[name] = torch.nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten())
    forward_calls = len(calls)  # one per LayerNorm, with the recipe as 5th argument
    assert forward_calls == 2 * CFG.n_layers + 1 and set(calls) == {5}
    for backward in range(2):  # the second through the retained graph recomputes again
        losses["plain"].backward(retain_graph=True)
        losses["lean"].backward(retain_graph=True)
        if backward == 0:
            # each LayerNorm's recipe serves its output (saved three times by the query, key
            # and value projections), x - mean and the normalized x from one run
            assert len(calls) - forward_calls == 2 * CFG.n_layers + 1
        for a, b in zip(plain.parameters(), model.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad)


def test_a_tensor_changed_in_place_after_its_mark_is_kept_as_it_is():
    x = torch.randn(8, 4, requires_grad=True)
    with recompute.recomputing():
        a = x * 2
        recompute.mark(a, recompute.Recipe(lambda t: (t * 2,), x.detach()))
        a.add_(1)  # the recipe would now give the old values
        b = a * a
    b.sum().backward()
    assert torch.equal(x.grad, 4 * (2 * x.detach() + 1))


def test_adamw_inside_backward_reads_weights_before_their_update(verdict_text, tokenizer):
    # AdamW steps each parameter inside backward as soon as its gradient is complete; a
    # recipe reads LayerNorm's scale and shift, which must not be stepped before.
    runs = []
    for lean_on, in_backward in ((False, False), (True, True)):
        torch.manual_seed(5)
        train, val = prepare_loaders(verdict_text[:4000], tokenizer, 2, 32, shuffle=False)
        torch.manual_seed(5)
        model = GPTModel(CFG.with_updates(vocab_size=50257, attn_impl="eager"))
        if lean_on:
            lean_activations(model)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.1)
        trainer = Trainer(model, opt, train, val, "cpu", TrainConfig(
            num_epochs=1, max_steps=4, eval_freq=10, eval_iter=1, start_context=None,
            progress=False, optim_in_backward=in_backward))
        trainer.fit()
        runs.append(trainer)
    assert runs[0].history.train_losses == runs[1].history.train_losses
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_recipe_no_op_keeps_holds_nothing():
    # The residual dropouts' outputs only feed a sum, which keeps nothing: their input must
    # be freed after forward, as with the book's dropout (inside --low-memory's
    # checkpointed blocks too, where no recipe is ever used).
    x = torch.randn(64, 32, requires_grad=True)
    with recompute.recomputing():
        h = x * 2  # kept by nothing: a product with a number keeps no tensor
        out = lean.LeanDropout.apply(h, 0.5) + 1
    gone = weakref.ref(h)
    del h
    assert gone() is None
    out.sum().backward()
    assert x.grad is not None
