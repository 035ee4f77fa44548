import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from book_reference import BookGPTDatasetV1
from diygpt.data import (
    GPTDatasetV1,
    create_dataloader_v1,
    num_windows,
    prepare_loaders,
    read_text,
    split_text,
)
from diygpt.errors import DataError


@pytest.mark.parametrize("max_length,stride", [(256, 256), (4, 1), (16, 8), (32, 50)])
def test_windows_equal_the_books(verdict_text, tokenizer, max_length, stride):
    ours = GPTDatasetV1(verdict_text, tokenizer, max_length, stride)
    book = BookGPTDatasetV1(verdict_text, tokenizer, max_length, stride)
    assert len(ours) == len(book) == num_windows(5145, max_length, stride)
    for i in (0, 1, len(book) // 2, len(book) - 1):
        assert torch.equal(ours[i][0], book[i][0]) and torch.equal(ours[i][1], book[i][1])
    assert ours[0][0].dtype == torch.long
    # One shared token array: memory grows with tokens, not with windows.
    assert ours.tokens.numel() == 5145
    # The book's attributes and negative indices, made on demand
    assert torch.equal(ours[-1][0], book[-1][0]) and torch.equal(ours[-1][1], book[-1][1])
    if len(book) < 300:
        assert all(torch.equal(a, b) for a, b in zip(ours.input_ids, book.input_ids, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(ours.target_ids, book.target_ids, strict=True))
    with pytest.raises(IndexError):
        ours[-len(book) - 1]


def test_shuffled_batches_match_the_books_order(verdict_text, tokenizer):
    torch.manual_seed(123)
    ours = [x for x, _ in create_dataloader_v1(verdict_text[:4000], 3, 16, 16, tokenizer=tokenizer)]
    torch.manual_seed(123)
    book_ds = BookGPTDatasetV1(verdict_text[:4000], tokenizer, 16, 16)
    book = [x for x, _ in DataLoader(book_ds, batch_size=3, shuffle=True, drop_last=True)]
    assert len(ours) == len(book) and all(torch.equal(a, b) for a, b in zip(ours, book, strict=True))


def test_split_is_by_characters_like_the_book(verdict_text):
    train, val = split_text(verdict_text, 0.9)
    assert len(train) == int(0.9 * 20479) and train + val == verdict_text
    with pytest.raises(DataError, match="train ratio"):
        split_text(verdict_text, 1.5)


def test_read_files_and_folders(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.md").write_text("not text data")
    assert read_text(tmp_path) == "first<|endoftext|>second"
    assert read_text([tmp_path / "a.txt"]) == "first"


@pytest.mark.parametrize(
    "content,message",
    [(b"", "is empty"), (b"  \n", "is empty"), (b"\xff\xfe\xfa bad", "not valid UTF-8"),
     (b"abc\x00\x01", "binary")],
)
def test_unusable_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_text(path)


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_text(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="no .txt files"):
        read_text(tmp_path)


def test_too_short_text_says_how_many_tokens(tokenizer):
    with pytest.raises(DataError, match=r"has \d+ tokens but needs at least 257"):
        prepare_loaders("just a few words", tokenizer, 2, 256)


def test_the_books_loader_on_too_short_text(tokenizer):
    # Shuffled, torch's sampler would fail deep inside on zero windows: one clear line instead.
    with pytest.raises(DataError, match=r"has 2 tokens but needs at least 17 .* max_length 16"):
        create_dataloader_v1("Hello world", batch_size=2, max_length=16, stride=16,
                             tokenizer=tokenizer)
    # Unshuffled, the book's empty loader (calc_loss_loader gives nan on it).
    loader = create_dataloader_v1("Hello world", batch_size=2, max_length=16, stride=16,
                                  shuffle=False, tokenizer=tokenizer)
    assert len(loader) == 0


def test_batch_larger_than_windows_with_drop_last(verdict_text, tokenizer):
    with pytest.raises(DataError, match="larger than the"):
        prepare_loaders(verdict_text, tokenizer, batch_size=100, max_length=256)
    train, _ = prepare_loaders(verdict_text, tokenizer, 100, 256, drop_last=False)
    assert len(train) == 1


def test_empty_validation_split_warns(verdict_text, tokenizer):
    warnings = []
    _, val = prepare_loaders(verdict_text, tokenizer, 2, 256, train_ratio=1.0, warn=warnings.append)
    assert len(val) == 0 and "validation" in warnings[0]


@pytest.mark.parametrize("max_length,stride", [(4, 2.0), (4.0, 2), (True, 2), (4, 0), (-1, 2)])
def test_window_sizes_must_be_positive_integers(tokenizer, max_length, stride):
    with pytest.raises(DataError, match="max_length and stride must be positive integers"):
        GPTDatasetV1("some text to window", tokenizer, max_length, stride)


def test_numpy_window_sizes_are_integers(tokenizer):
    import numpy as np

    assert len(GPTDatasetV1("one two three four five six", tokenizer, np.int64(2), np.int32(1))) > 0


def test_a_folder_reads_its_txt_files_in_any_case_but_not_hidden_ones(tmp_path):
    (tmp_path / "nested").mkdir()
    (tmp_path / ".ipynb_checkpoints").mkdir()
    for name, text in [("a.txt", "alpha"), ("nested/b.TXT", "beta"), (".hidden.txt", "secret"),
                       (".ipynb_checkpoints/a-checkpoint.txt", "copy"), ("notes.md", "md")]:
        (tmp_path / name).write_text(text)
    text = read_text(tmp_path)
    assert "alpha" in text and "beta" in text
    assert not any(word in text for word in ("secret", "copy", "md"))


def test_items_are_separate_tensors_and_slices_give_lists_as_the_books(verdict_text, tokenizer):
    ours = GPTDatasetV1(verdict_text, tokenizer, 8, 4)
    book = BookGPTDatasetV1(verdict_text, tokenizer, 8, 4)
    x, y = ours[0]
    x[1] = -1  # the book's input and target are two tensors: one edit leaves the other
    assert torch.equal(y, book[0][1])
    xs, ys = ours[1:4]
    assert all(torch.equal(a, b) for a, b in zip(xs + ys, book[1:4][0] + book[1:4][1], strict=True))


def test_a_token_file_stays_on_disk_window_by_window(tmp_path, verdict_text, tokenizer):
    ids = np.array(tokenizer.encode(verdict_text), dtype=np.uint16)
    ids.tofile(tmp_path / "t.bin")
    mapped = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r")
    ours = GPTDatasetV1(None, None, 16, 16, token_ids=mapped)
    book = BookGPTDatasetV1(verdict_text, tokenizer, 16, 16)
    assert isinstance(ours.tokens, np.memmap)  # no copy of the corpus in memory
    for i in (0, 7, len(book) - 1):
        assert torch.equal(ours[i][0], book[i][0]) and ours[i][1].dtype == torch.long


def test_a_file_given_twice_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    (tmp_path / "sub").mkdir()
    a, spelled = tmp_path / "a.txt", tmp_path / "sub" / ".." / "a.txt"  # pathlib keeps ".."
    for twice, ways in (([a, a], f"as {a} and as {a}"),
                        ([tmp_path, a], f"in the folder {tmp_path} and as {a}"),
                        ([spelled, a], f"as {spelled} and as {a}")):
        with pytest.raises(DataError) as refused:
            read_text(twice)
        assert str(refused.value) == f"{a} is given twice ({ways}); give each file once"


def test_a_folder_named_like_a_token_file_is_refused(tmp_path, tokenizer):
    from diygpt.data import load_training_data

    (tmp_path / "x.bin").mkdir()
    (tmp_path / "x.bin" / "a.txt").write_text("text, not token ids")
    with pytest.raises(DataError, match="is a folder, not a token file"):
        load_training_data([tmp_path / "x.bin"], tokenizer)


def test_windows_and_old_mac_line_ends_read_as_the_books_text_mode(tmp_path, verdict_text,
                                                                    tokenizer):
    # The book's open(path, encoding="utf-8").read() turns "\r\n" and "\r" into "\n": a
    # Windows copy of the-verdict is its 20479 characters and 5145 tokens there, and here.
    from diygpt.data import load_training_data, read_text

    crlf = tmp_path / "the-verdict-crlf.txt"
    crlf.write_bytes(verdict_text.replace("\n", "\r\n").encode("utf-8"))
    with open(crlf, encoding="utf-8") as f:
        book_text = f.read()
    assert read_text(crlf) == book_text == verdict_text and len(book_text) == 20479
    (tmp_path / "mac.txt").write_bytes(b"one\rtwo\r\nthree\n")
    assert read_text(tmp_path / "mac.txt") == "one\ntwo\nthree\n"
    plain = tmp_path / "plain.txt"
    plain.write_text(verdict_text, encoding="utf-8")
    a, b = (load_training_data(p, tokenizer) for p in (crlf, plain))
    assert a.train_ids.tolist() == b.train_ids.tolist() and a.val_ids.tolist() == b.val_ids.tolist()
    assert a.digest == b.digest
    assert len(tokenizer.encode(read_text(crlf))) == 5145


def test_a_split_inside_an_endoftext_moves_to_its_end():
    # Two files joined by <|endoftext|>: a split at any of its 13 characters would have cut
    # the token into plain-text pieces on both sides.
    text = "a" * 90 + "<|endoftext|>" + "b" * 7
    for ratio in [i / len(text) for i in range(90, 104)]:
        train, val = split_text(text, ratio)
        assert train + val == text
        assert "<|endoftext|>" in train or "<|endoftext|>" in val
    assert split_text(text, 95 / len(text)) == ("a" * 90 + "<|endoftext|>", "b" * 7)
    assert split_text("x" * 100, 0.9) == ("x" * 90, "x" * 10)  # the book's split otherwise


def test_token_ids_of_shape_1_by_t_are_one_sequence(tokenizer):
    # text_to_token_ids gives (1, T); other shapes say what is wanted.
    from diygpt.errors import DataError
    from diygpt.tokenizer import text_to_token_ids

    ids = text_to_token_ids("Every effort moves you forward, step by step.", tokenizer)
    flat = GPTDatasetV1(None, None, 4, 4, token_ids=ids[0])
    batched = GPTDatasetV1(None, None, 4, 4, token_ids=ids)
    assert len(batched) == len(flat) > 0 and torch.equal(batched[0][0], flat[0][0])
    with pytest.raises(DataError, match=r"one sequence of ids, \(T,\) or \(1, T\); got shape \(2, 5\)"):
        GPTDatasetV1(None, None, 4, 4, token_ids=torch.zeros(2, 5, dtype=torch.long))


def test_text_data_is_held_as_uint16_with_the_books_ids(tmp_path, verdict_text, tokenizer):
    # 2 bytes a token, not a list of Python ints (~36): a large --data text fits in memory
    from diygpt.data import load_token_ids, load_training_data, split_text
    from diygpt.tokenizer import encode_array

    text = verdict_text + "<|endoftext|>naïve 東京 \U0001F600"
    ids = encode_array(text, tokenizer)
    assert ids.dtype == np.uint16
    assert ids.tolist() == tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    (tmp_path / "v.txt").write_text(verdict_text, encoding="utf-8")
    data = load_training_data(tmp_path / "v.txt", tokenizer)
    train_text, val_text = split_text(verdict_text)
    assert data.train_ids.dtype == data.val_ids.dtype == np.uint16
    assert data.train_ids.tolist() == tokenizer.encode(train_text)
    assert data.val_ids.tolist() == tokenizer.encode(val_text)
    assert load_token_ids(tmp_path / "v.txt", tokenizer).tolist() == tokenizer.encode(verdict_text)
    whole = load_training_data(tmp_path / "v.txt", tokenizer, 1.0)
    assert whole.val_ids.dtype == np.uint16 and len(whole.val_ids) == 0


def test_text_with_lone_surrogates_encodes_as_tiktoken_repairs_it(tokenizer):
    from diygpt.tokenizer import encode_array

    text = "Hello \udce9 world"
    assert encode_array(text, tokenizer).tolist() == tokenizer.encode(text)
