import pytest
import torch

from book_reference import book_generate
from diygpt import GPTModel, generate, generate_text_simple, stream_generate
from diygpt.errors import GenerationError
from diygpt.generation import apply_top_k, apply_top_p, sample_next

CFG = {"vocab_size": 120, "context_length": 16, "emb_dim": 32, "n_heads": 4,
       "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}
LOGITS = torch.tensor([[4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79]])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return GPTModel(CFG).eval()


def test_seed_multinomial_counts():
    # The seed's section 3.1.1: 1000 draws at temperature 1 from these logits.
    torch.manual_seed(123)
    draws = [sample_next(LOGITS, temperature=1.0).item() for _ in range(1000)]
    counts = torch.bincount(torch.tensor(draws), minlength=9).tolist()
    assert counts[:8] == [73, 0, 0, 582, 2, 0, 0, 343]


def test_top_k_keeps_k_logits_and_greedy_is_argmax():
    kept = apply_top_k(LOGITS, 3)
    assert torch.isfinite(kept).sum() == 3 and kept[0, 3] == 6.75
    assert sample_next(LOGITS).item() == 3


def test_vanishing_temperature_is_greedy_not_nan():
    # 1e-41 is a float32 denormal: logits / T overflows to inf (found by hypothesis).
    for t in (1e-41, 1e-30):
        for top_p in (None, 0.9):
            assert sample_next(LOGITS, temperature=t, top_p=top_p).item() == 3
    assert sample_next(-LOGITS.abs() - 1, temperature=1e-41).item() == 1  # all -inf after /T
    # 1e-300 is 0 in float32: a logit of exactly 0 gives 0 / 0
    assert sample_next(torch.tensor([[-1.0, 0.0, -2.0]]), temperature=1e-300).item() == 1


def test_a_temperature_past_float32s_range_samples_the_top_k_evenly():
    # 1e39 is inf in float32: the -inf that top-k leaves would become NaN.
    torch.manual_seed(0)
    draws = {sample_next(LOGITS, temperature=1e39, top_k=3).item() for _ in range(60)}
    assert draws == {0, 3, 7}


def test_top_p_keeps_the_nucleus():
    probs = torch.softmax(LOGITS, -1)[0]
    kept = torch.isfinite(apply_top_p(LOGITS, 0.5))[0]
    assert kept.tolist() == [i == 3 for i in range(9)]  # "forward" alone has p > 0.5
    kept = torch.isfinite(apply_top_p(LOGITS, 0.9))[0]
    assert set(kept.nonzero().flatten().tolist()) == {3, 7} and probs[[3, 7]].sum() > 0.9
    kept = torch.isfinite(apply_top_p(LOGITS, 0.95))[0]
    assert set(kept.nonzero().flatten().tolist()) == {0, 3, 7}
    assert torch.isfinite(apply_top_p(LOGITS, 1.0)).all()
    # A top_p that float32 rounds to 0 still keeps the most likely token, and sampling works.
    tiny = 4.491026917538724e-158
    assert torch.isfinite(apply_top_p(LOGITS, tiny))[0].tolist() == [i == 3 for i in range(9)]
    assert sample_next(LOGITS, temperature=1.0, top_p=tiny).item() == 3


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.4, 25), (0.7, None), (1.0, 3)])
def test_generate_draws_the_books_tokens(model, temperature, top_k):
    prompt = torch.tensor([[5, 17, 99, 3]])
    torch.manual_seed(123)
    book = book_generate(model, prompt, 30, 16, temperature, top_k)
    for use_cache in (False, True):
        torch.manual_seed(123)
        ours = generate(model, prompt, 30, 16, temperature, top_k, use_cache=use_cache)
        assert torch.equal(ours, book), use_cache


def test_cached_greedy_equals_uncached_across_window_overflow(model):
    prompt = torch.randint(0, 120, (3, 10), generator=torch.Generator().manual_seed(11))
    a = generate(model, prompt, 25, 16, use_cache=False)  # 35 tokens > context 16
    b = generate(model, prompt, 25, 16, use_cache=True)
    assert torch.equal(a, b) and a.shape == (3, 35)


def test_generate_text_simple_matches_greedy_generate(model):
    prompt = torch.tensor([[1, 2, 3]])
    assert torch.equal(generate_text_simple(model, prompt, 8, 16), generate(model, prompt, 8, 16))


def test_long_prompt_is_cropped_to_the_context(model):
    prompt = torch.randint(0, 120, (1, 40))
    out = generate(model, prompt, 3, 16)
    assert out.shape == (1, 43) and torch.equal(out[:, :40], prompt)
    assert torch.equal(out[:, -3:], generate(model, prompt[:, -16:], 3, 16)[:, -3:])


def test_eos_stops_like_the_book(model):
    prompt = torch.tensor([[7, 8]])
    first = generate(model, prompt, 1, 16)[0, -1].item()
    assert generate(model, prompt, 10, 16, eos_id=first).shape == (1, 2)
    assert torch.equal(book_generate(model, prompt, 10, 16, eos_id=first), prompt)


def test_a_model_in_training_mode_draws_the_books_tokens():
    # Dropout on: the book's loop re-reads the whole window, drawing masks for all of it.
    torch.manual_seed(4)
    model = GPTModel({**CFG, "drop_rate": 0.3}).train()
    prompt = torch.tensor([[5, 6, 7]])
    torch.manual_seed(9)
    want = book_generate(model, prompt, 8, 16, temperature=1.0, top_k=20)
    torch.manual_seed(9)
    assert torch.equal(generate(model, prompt, 8, 16, temperature=1.0, top_k=20), want)
    assert model.training


def test_streaming_takes_generates_arguments_in_the_same_order():
    import inspect

    assert (list(inspect.signature(stream_generate).parameters)
            == list(inspect.signature(generate).parameters))


def test_streaming_yields_each_token(model):
    prompt = torch.tensor([[4, 5]])
    streamed = [t.item() for t in stream_generate(model, prompt, 6, 16)]
    assert streamed == generate(model, prompt, 6, 16)[0, 2:].tolist()


@pytest.mark.parametrize(
    "kwargs,message",
    [({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
     ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
     ({"max_new_tokens": -1}, "max_new_tokens"), ({"top_k": float("nan")}, "top_k"),
     ({"top_k": float("inf")}, "top_k"), ({"max_new_tokens": float("inf")}, "max_new_tokens")],
)
def test_invalid_sampling_parameters(model, kwargs, message):
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(GenerationError, match=message):
        generate(model, torch.tensor([[1]]), context_size=16, **args)


def test_empty_prompt_and_zero_tokens(model):
    with pytest.raises(GenerationError, match="empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3, 16)
    assert generate(model, torch.tensor([[1, 2]]), 0, 16).tolist() == [[1, 2]]


@pytest.mark.parametrize(
    "prompt,message",
    [(torch.tensor([1, 2, 3]), r"\(batch, tokens\) tensor, got shape \(3,\).*unsqueeze\(0\)"),
     (torch.tensor([[1.0, 2.0]]), "integer token ids, got torch.float32"),
     (torch.tensor([[True]]), "integer token ids, got torch.bool"),
     (torch.tensor([[3, -1, 999]]), "token id -1 is outside the model's vocabulary of 120"),
     (torch.tensor([[3, 999]]), "token id 999 is outside")],
)
def test_a_prompt_of_the_wrong_shape_or_type_is_named(model, prompt, message):
    # A tensor of ids without the batch dimension is a reader's easy slip: not "empty".
    with pytest.raises(GenerationError, match=message):
        generate(model, prompt, 3, 16)


@pytest.mark.parametrize("context_size", [0, -4, 2.5, True, float("nan")])
def test_context_size_must_be_a_positive_integer(model, context_size):
    for use_cache in (True, False):
        with pytest.raises(GenerationError, match=f"context_size .* got {context_size}"):
            generate(model, torch.tensor([[1, 2]]), 3, context_size, use_cache=use_cache)


def test_numpy_integers_are_integers(model):
    import numpy as np

    out = generate(model, torch.tensor([[1, 2]]), np.int64(3), np.int64(16), top_k=np.int32(5))
    assert out.shape == (1, 5)


def test_top_k_above_vocab_is_clamped(model):
    torch.manual_seed(0)
    out = generate(model, torch.tensor([[1]]), 3, 16, temperature=1.0, top_k=10**6)
    torch.manual_seed(0)
    assert torch.equal(out, generate(model, torch.tensor([[1]]), 3, 16, temperature=1.0))
    assert out.shape == (1, 4)


def test_generate_drives_any_model_as_the_book_does():
    # The reader's own chapter-4 model, and a wrapper around ours: no KV cache for either.
    from book_reference import BookGPTModel

    torch.manual_seed(3)
    book_model = BookGPTModel({**CFG, "drop_rate": 0.0}).eval()
    prompt = torch.tensor([[5, 17, 99, 3]])
    torch.manual_seed(123)
    want = book_generate(book_model, prompt, 20, 16, 1.0, 10)
    for wrapped in (book_model, torch.nn.Sequential(book_model)):
        torch.manual_seed(123)
        assert torch.equal(generate(wrapped, prompt, 20, 16, 1.0, 10), want)


def test_the_model_and_the_decoder_name_a_missing_or_extra_batch_dimension(model, tokenizer):
    from diygpt import token_ids_to_text

    with pytest.raises(ValueError, match=r"\(batch, tokens\), got shape \(3,\).*unsqueeze\(0\)"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"decodes one sequence, got shape \(2, 2\)"):
        token_ids_to_text(torch.tensor([[10, 11], [12, 13]]), tokenizer)
    assert token_ids_to_text(torch.tensor([[10, 11]]), tokenizer) == tokenizer.decode([10, 11])


def test_whole_floats_numpy_reals_and_narrow_int_prompts_work(model):
    import numpy as np

    idx = torch.tensor([[1, 2, 3]])
    expected = generate(model, idx, 3, 16)
    assert torch.equal(generate(model, idx, 3.0, 16), expected)  # was a TypeError in range()
    assert torch.equal(generate(model, idx.to(torch.int16), 3, 16), expected)  # the embedding
    torch.manual_seed(0)
    a = generate(model, idx, 3, 16, temperature=1.0, top_p=0.5)
    torch.manual_seed(0)
    b = generate(model, idx, 3, 16, temperature=1.0, top_p=np.float32(0.5))  # was refused
    assert torch.equal(a, b)


def test_the_stream_printer_prints_what_one_decode_gives(tokenizer):
    import io

    from diygpt.cli.generate import _StreamPrinter

    text = "naïve 東京 \U0001F600 ok <|endoftext|> \ufffd done"
    ids = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    out = io.StringIO()
    printer = _StreamPrinter(tokenizer, out)
    for token in ids:
        printer.feed(token)
    assert len(printer.pending) <= 1  # only what ends mid-character waits
    printer.close()
    assert out.getvalue() == tokenizer.decode(ids) + "\n"
    raw = io.StringIO()
    printer = _StreamPrinter(tokenizer, raw)
    for token in tokenizer.encode("\U0001F600" * 3):
        printer.feed(token)
    printer.close()
    assert raw.getvalue() == "\U0001F600" * 3 + "\n"


def test_an_empty_prompt_batch_is_a_generation_error(model):
    with pytest.raises(GenerationError, match="the prompt batch is empty"):
        generate(model, torch.zeros(0, 5, dtype=torch.long), 3, 16)


def test_a_head_wider_than_the_tokenizer_samples_only_ids_it_decodes(tmp_path, capsys):
    # nanoGPT's vocabulary padded to 50304, saved so: ids 50257+ cannot be decoded
    from diygpt.checkpoints import save_run
    from diygpt.cli.main import main
    from diygpt.config import get_preset

    torch.manual_seed(0)
    padded = GPTModel(get_preset("tiny").with_updates(vocab_size=50304))
    with torch.no_grad():
        padded.out_head.weight[:50257] = 0  # every padded row beats every real one
    save_run(tmp_path, padded, None, {})
    argv = ["generate", "--checkpoint", str(tmp_path), "--prompt", "Hi", "--max-new-tokens",
            "4", "--device", "cpu"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == "Hi!!!!\n"  # all 50257 real logits tie at 0: id 0 is "!"
    assert "the model has 50304 output rows; the tokenizer decodes 50257 ids" in captured.err


def test_characters_the_output_encoding_lacks_print_as_question_marks(monkeypatch):
    import io
    import sys

    from diygpt.cli.generate import _tolerant_stdout

    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="cp1252"))
    _tolerant_stdout()
    sys.stdout.write("π = 3.14")
    sys.stdout.flush()
    assert sys.stdout.buffer.getvalue() == b"? = 3.14"


def test_eos_on_a_vocabulary_without_it_says_it_changes_nothing(capsys):
    from pathlib import Path

    from diygpt.cli.main import main

    small = Path(__file__).parent / "fixtures" / "gpt2-tiny-hf"  # a vocabulary of 500
    assert main(["generate", "--weights", str(small), "--prompt", "a", "--eos",
                 "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert ("--eos stops at token 50256, which this model's vocabulary of 500 does not have"
            in capsys.readouterr().err)
