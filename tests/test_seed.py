"""The seed's printed numbers (chapter 5, sections 1.1-1.3), reproduced with book-124m."""

import pytest
import torch

from diygpt import (
    GPTModel,
    calc_loss_batch,
    calc_loss_loader,
    create_dataloader_v1,
    generate_text_simple,
    get_preset,
    split_text,
    text_to_token_ids,
    token_ids_to_text,
)


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def seeded_model(request):
    torch.manual_seed(123)
    model = GPTModel(get_preset("book-124m").with_updates(attn_impl=request.param))
    return model.eval()


def test_untrained_greedy_text(seeded_model, tokenizer):
    out = generate_text_simple(
        seeded_model, text_to_token_ids("Every effort moves you", tokenizer), 10, 256
    )
    assert out[0, :6].tolist() == [6109, 3626, 6100, 345, 34245, 5139]
    assert token_ids_to_text(out, tokenizer) == (
        "Every effort moves you rentingetic wasnم refres RexMeCHicular stren"
    )


def test_cross_entropy_of_the_two_examples(seeded_model):
    inputs = torch.tensor([[16822, 3626, 6100], [40, 1107, 588]])
    targets = torch.tensor([[3626, 6100, 345], [1107, 588, 11311]])
    with torch.no_grad():
        loss = calc_loss_batch(inputs, targets, seeded_model, "cpu")
    assert round(loss.item(), 4) == 10.8449


def test_verdict_statistics(verdict_text, tokenizer):
    assert len(verdict_text) == 20479
    assert len(tokenizer.encode(verdict_text)) == 5145


@pytest.mark.slow
def test_initial_train_and_val_loss_on_the_verdict(verdict_text, tokenizer):
    train_text, val_text = split_text(verdict_text, 0.9)
    torch.manual_seed(123)
    kw = dict(batch_size=2, max_length=256, stride=256, drop_last=False, shuffle=False,
              num_workers=0, tokenizer=tokenizer)
    train_loader = create_dataloader_v1(train_text, **kw)
    val_loader = create_dataloader_v1(val_text, **kw)
    assert (len(train_loader), len(val_loader)) == (9, 1)
    assert all(x.shape[1] == 256 == y.shape[1] for x, y in train_loader)
    torch.manual_seed(123)
    model = GPTModel(get_preset("book-124m").with_updates(attn_impl="eager")).eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, "cpu")
        val_loss = calc_loss_loader(val_loader, model, "cpu")
    assert round(train_loss, 4) == 10.9876
    assert round(val_loss, 4) == 10.9811
