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


# The seed's own code (sections 1.1-3), its imports pointed at diygpt.seed_names.
GPT_CONFIG_124M = {"vocab_size": 50257, "context_length": 256, "emb_dim": 768, "n_heads": 12,
                   "n_layers": 12, "drop_rate": 0.1, "qkv_bias": False}


def test_the_seeds_code_runs_under_its_own_names(tokenizer):
    from diygpt.seed_names import (
        DiyGPTModel,
        compute_loss_batch,
        generate_text_simple,
        text_to_tokens_ids,
        token_ids_to_text,
    )

    torch.manual_seed(123)
    diy_gpt_model = DiyGPTModel(GPT_CONFIG_124M)
    diy_gpt_model.to("cpu")
    diy_gpt_model.eval()
    token_ids = generate_text_simple(gpt_model=diy_gpt_model,
                                     index_array=text_to_tokens_ids("Every effort moves you", tokenizer),
                                     max_new_tokens=25,
                                     context_size=GPT_CONFIG_124M["context_length"])
    assert token_ids_to_text(token_ids, tokenizer) == (
        "Every effort moves you rentingetic wasnم refres RexMeCHicular stren Mortgage TT remember "
        "gard ACTIONSussedOND Land Engeleddedemate breaths proxies GalaxyForm")
    # generate_and_print_sample in the seed reads the context length from position_emb
    assert diy_gpt_model.position_emb.weight.shape[0] == 256
    assert diy_gpt_model.position_emb is diy_gpt_model.pos_emb
    assert list(diy_gpt_model.state_dict()) == list(GPTModel(GPT_CONFIG_124M).state_dict())
    inputs = torch.tensor([[16822, 3626, 6100], [40, 1107, 588]])
    targets = torch.tensor([[3626, 6100, 345], [1107, 588, 11311]])
    with torch.no_grad():
        assert round(compute_loss_batch(inputs, targets, diy_gpt_model, "cpu").item(), 4) == 10.8449


@pytest.mark.slow
def test_the_seeds_initial_losses_under_its_own_names(verdict_text):
    from diygpt.seed_names import DiyGPTModel, compute_loss_loader, create_data_loader_v1

    train_ratio = 0.9
    split_index = int(train_ratio * len(verdict_text))
    train_data, test_data = verdict_text[:split_index], verdict_text[split_index:]
    torch.manual_seed(123)
    kw = dict(batch_size=2, max_length=GPT_CONFIG_124M["context_length"],
              stride=GPT_CONFIG_124M["context_length"], drop_last=False, shuffle=False,
              num_workers=0)
    train_data_loader = create_data_loader_v1(train_data, **kw)
    test_data_loader = create_data_loader_v1(test_data, **kw)
    torch.manual_seed(123)
    diy_gpt_model = DiyGPTModel(GPT_CONFIG_124M)
    diy_gpt_model.eval()
    with torch.no_grad():
        train_loss = compute_loss_loader(train_data_loader, diy_gpt_model, "cpu")
        test_loss = compute_loss_loader(test_data_loader, diy_gpt_model, "cpu")
    # The seed prints 10.987583584255642 and 10.981106758117676; eager attention gives the
    # first to every digit on an x86 CPU with AVX2 (1e-7 off with torch's generic kernels),
    # the second to 6 decimals (the book's code gives the same).
    assert train_loss == pytest.approx(10.987583584255642, abs=1e-6)
    assert test_loss == pytest.approx(10.981106758117676, abs=1e-5)


def test_the_seeds_training_loop_under_its_own_names(verdict_text, tokenizer, capsys):
    # Against the book's own model and hand-written loop, not diygpt's loop under its names
    from book_reference import BookGPTModel, book_train_model_simple
    from diygpt.seed_names import DiyGPTModel, create_data_loader_v1, train_model_simple

    context = "Every effort moves you"

    def seeds(model, train_loader, test_loader, optimizer):
        return train_model_simple(model, train_loader, test_loader, optimizer, "cpu", 1,
                                  eval_frequency=5, eval_iter=2, start_context=context,
                                  tokenizer=tokenizer)

    def books(model, train_loader, val_loader, optimizer):
        return book_train_model_simple(model, train_loader, val_loader, optimizer, "cpu", 1,
                                       eval_freq=5, eval_iter=2, start_context=context,
                                       tokenizer=tokenizer)

    tiny = {**GPT_CONFIG_124M, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2}
    kw = dict(batch_size=2, max_length=32, stride=32, drop_last=False, shuffle=False,
              num_workers=0, tokenizer=tokenizer)
    results = []
    for train, build in ((seeds, DiyGPTModel), (books, BookGPTModel)):
        torch.manual_seed(123)
        loaders = (create_data_loader_v1(verdict_text[:3000], **kw),
                   create_data_loader_v1(verdict_text[3000:3600], **kw))
        torch.manual_seed(123)
        model = build(tiny)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)
        results.append((train(model, *loaders, optimizer), capsys.readouterr().out))
    assert results[0] == results[1] and len(results[0][0][0]) > 1
    assert results[0][1].startswith("Ep 1 (Step 000000): Train loss ")
