import pytest
import torch

from book_reference import BookGPTModel
from diygpt import GPTModel, KVCache, get_preset
from diygpt.model import FeedForward, TransformerBlock

TINY_BOOK = {
    "vocab_size": 300, "context_length": 32, "emb_dim": 48, "n_heads": 4,
    "n_layers": 2, "drop_rate": 0.1, "qkv_bias": False,
}


def test_parameter_names_and_order_are_the_books():
    torch.manual_seed(0)
    ours = GPTModel(TINY_BOOK)
    book = BookGPTModel(TINY_BOOK)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in book.named_parameters()]
    names = dict(ours.named_parameters())
    for name in ["tok_emb.weight", "pos_emb.weight", "trf_blocks.1.att.W_query.weight",
                 "trf_blocks.0.ff.layers.2.bias", "trf_blocks.0.norm2.shift",
                 "final_norm.scale", "out_head.weight"]:
        assert name in names


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_seeded_init_and_eager_logits_equal_the_books(qkv_bias):
    cfg = {**TINY_BOOK, "qkv_bias": qkv_bias}
    torch.manual_seed(123)
    book = BookGPTModel(cfg).eval()
    torch.manual_seed(123)
    ours = GPTModel({**cfg, "attn_impl": "eager"}).eval()
    ours_w, book_w = ours.state_dict(), dict(book.named_parameters())
    assert list(ours_w) == list(book_w)  # the same names, created in the same order
    for name, weight in ours_w.items():
        assert torch.equal(weight, book_w[name]), name
    x = torch.randint(0, 300, (3, 20))
    with torch.no_grad():
        assert torch.equal(ours(x), book(x))
        ours.set_attn_impl("sdpa")
        torch.testing.assert_close(ours(x), book(x), atol=1e-5, rtol=1e-5)


def test_training_mode_dropout_draws_match_the_book():
    torch.manual_seed(5)
    book = BookGPTModel(TINY_BOOK).train()
    ours = GPTModel({**TINY_BOOK, "attn_impl": "eager"}).train()
    ours.load_state_dict(book.state_dict())
    x = torch.randint(0, 300, (2, 16))
    torch.manual_seed(9)
    a = book(x)
    torch.manual_seed(9)
    b = ours(x)
    assert torch.equal(a, b)
    # Backward too: the same gradients to the bit (the book projects keys first, and
    # autograd sums the three projections' input gradients in reverse creation order).
    y = torch.randint(0, 300, (2, 16))
    for logits in (a, b):
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    book_grads = {n: p.grad for n, p in book.named_parameters()}
    for name, param in ours.named_parameters():
        assert torch.equal(param.grad, book_grads[name]), name


def test_the_chapter_4_blocks_take_the_books_dict():
    block = TransformerBlock(TINY_BOOK)
    assert block.att.W_query.in_features == TINY_BOOK["emb_dim"]
    assert FeedForward(TINY_BOOK).layers[0].out_features == 4 * TINY_BOOK["emb_dim"]


def test_book_state_dict_with_mask_buffers_loads_strictly():
    book = BookGPTModel(TINY_BOOK)
    sd = book.state_dict()
    assert any(k.endswith("att.mask") for k in sd)
    ours = GPTModel(TINY_BOOK)
    ours.load_state_dict(sd)  # strict by default
    assert torch.equal(ours.tok_emb.weight, book.tok_emb.weight)


def test_book_124m_parameter_count():
    with torch.device("meta"):
        model = GPTModel(get_preset("book-124m"))
    assert model.num_parameters() == 162_419_712
    assert model.num_parameters(exclude_out_head=True) == 162_419_712 - 50257 * 768


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_kv_cache_matches_full_forward(attn):
    torch.manual_seed(1)
    model = GPTModel({**TINY_BOOK, "attn_impl": attn}).eval()
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, batch_size=2)
        part = [model(x[:, :5], cache=cache)]  # prefill
        part += [model(x[:, 5:8], cache=cache)]  # a chunk with an offset mask
        part += [model(x[:, i:i + 1], cache=cache) for i in range(8, 12)]  # decode
    torch.testing.assert_close(torch.cat(part, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 12


def test_a_cache_too_small_or_for_another_batch_is_one_line():
    model = GPTModel(TINY_BOOK).eval()
    cache = KVCache(model.cfg, batch_size=1, max_len=4)
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="5 positions do not fit the KV cache's 4"):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="a batch of 2 does not match the KV cache's 1 rows"):
            model(torch.zeros(2, 1, dtype=torch.long), cache=cache)


def test_too_long_input_is_refused():
    model = GPTModel(TINY_BOOK)
    with pytest.raises(ValueError, match="exceeds the context length 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
