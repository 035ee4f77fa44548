"""Text files -> token ids -> sliding windows (the book's chapter 2) -> batches."""

from __future__ import annotations

import hashlib
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from diygpt.errors import DataError
from diygpt.textfiles import read_text, refuse_twice, split_text
from diygpt.tokenizer import ENDOFTEXT, EOT_ID, encode_array, get_tokenizer

PathLike = str | os.PathLike


def num_windows(num_tokens: int, max_length: int, stride: int) -> int:
    """How many (input, target) windows the book's loop ``range(0, n - max_length, stride)`` makes."""
    return len(range(0, num_tokens - max_length, stride))


class GPTDatasetV1(Dataset):
    """The book's sliding windows, stored as one token array rather than a tensor per window.

    Window i is ``tokens[i*stride : i*stride + max_length]`` and its target is the same
    slice shifted by one, so memory grows with the number of tokens only.
    """

    def __init__(
        self,
        txt: str | None,
        tokenizer,
        max_length: int,
        stride: int,
        token_ids: torch.Tensor | Sequence[int] | None = None,
    ) -> None:
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0
               for v in (max_length, stride)):
            raise DataError(f"max_length and stride must be positive integers, got {max_length!r} "
                            f"and {stride!r}")
        if token_ids is None:
            token_ids = tokenizer.encode(txt, allowed_special={ENDOFTEXT})
        shape = getattr(token_ids, "shape", None)
        if shape is not None and len(shape) == 2 and shape[0] == 1:
            token_ids = token_ids[0]  # text_to_token_ids' (1, T)
        elif shape is not None and len(shape) != 1:
            raise DataError(f"token_ids must be one sequence of ids, (T,) or (1, T); got shape "
                            f"{tuple(shape)}")
        if isinstance(token_ids, np.ndarray):
            # e.g. a uint16 memmap from `diygpt prepare`: kept as it is, so a corpus larger
            # than memory is read from disk window by window
            self.tokens = token_ids
        else:
            # int32 halves the memory of int64 and holds any GPT-2 id; batches are int64.
            self.tokens = torch.as_tensor(token_ids).to(torch.int32)
        self.max_length = max_length
        self.stride = stride
        self.n_windows = num_windows(len(self.tokens), max_length, stride)

    def __len__(self) -> int:
        return self.n_windows

    # The book's dataset keeps a tensor per window in these lists; here they are made on
    # demand from the one token array.
    @property
    def input_ids(self) -> list[torch.Tensor]:
        return [self[i][0] for i in range(self.n_windows)]

    @property
    def target_ids(self) -> list[torch.Tensor]:
        return [self[i][1] for i in range(self.n_windows)]

    def _ids(self, start: int, stop: int) -> torch.Tensor:
        if isinstance(self.tokens, np.ndarray):
            return torch.from_numpy(self.tokens[start:stop].astype(np.int64))
        return self.tokens[start:stop].long()

    def __getitem__(self, idx):
        """(input, target) of window ``idx``; a slice gives two lists, as the book's does."""
        if isinstance(idx, slice):
            pairs = [self[i] for i in range(*idx.indices(self.n_windows))]
            return [x for x, _ in pairs], [y for _, y in pairs]
        if idx < 0:  # as the book's lists index
            idx += self.n_windows
        if not 0 <= idx < self.n_windows:
            raise IndexError(idx)
        start = idx * self.stride
        # Two tensors, not two views of one: changing an input in place leaves its target.
        end = start + self.max_length
        return self._ids(start, end), self._ids(start + 1, end + 1)


def create_dataloader_v1(
    txt: str,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    tokenizer=None,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """The book's loader: same windows, same batches, same order for the same seed."""
    tokenizer = get_tokenizer() if tokenizer is None else tokenizer
    dataset = GPTDatasetV1(txt, tokenizer, max_length, stride)
    if shuffle and len(dataset) == 0:  # torch's sampler would fail deep inside; unshuffled,
        # the book's empty loader stays (its loss is nan)
        raise DataError(
            f"the text has {len(dataset.tokens)} tokens but needs at least {max_length + 1} "
            f"for one window of max_length {max_length}; use more text or a smaller max_length"
        )
    return make_loader(dataset, batch_size, shuffle, drop_last, num_workers, generator)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    num_workers: int = 0,
    generator: torch.Generator | None = None,
) -> DataLoader:
    if batch_size <= 0:
        raise DataError(f"batch size must be positive, got {batch_size}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=generator,
    )


def check_token_ids(ids, vocab_size: int, what: str = "the data") -> None:
    """A clear error for an id the model has no embedding for (torch's is an IndexError)."""
    if len(ids) and (top := int(np.max(ids))) >= vocab_size:
        raise DataError(
            f"{what} has token id {top}, outside the model's vocabulary of {vocab_size}: the "
            "model and the data were not made with the same tokenizer"
        )


def check_enough_tokens(num_tokens: int, max_length: int, what: str,
                        hint: str = "use more text, a larger train ratio, or a smaller "
                        "--context-length") -> None:
    """Raise a clear error when text is too short for a single window."""
    if num_tokens <= max_length:
        raise DataError(
            f"{what} has {num_tokens} tokens but needs at least {max_length + 1} for one window "
            f"of context length {max_length}; {hint}"
        )


def prepare_loaders(
    text: str,
    tokenizer,
    batch_size: int,
    max_length: int,
    stride: int | None = None,
    train_ratio: float = 0.9,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    warn=None,
) -> tuple[DataLoader, DataLoader]:
    """Split text as the book does (by characters) and build its train and validation loaders.

    See :func:`loaders_from_tokens` for the checks.
    """
    train_text, val_text = split_text(text, train_ratio)
    train_ids, val_ids = encode_array(train_text, tokenizer), encode_array(val_text, tokenizer)
    return loaders_from_tokens(
        train_ids, val_ids, batch_size, max_length, stride, shuffle, drop_last, num_workers, warn
    )


def split_tokens(token_ids, train_ratio: float = 0.9):
    """Split a token array (e.g. from ``diygpt prepare``) at ``int(train_ratio * len)``."""
    if not 0.0 < train_ratio <= 1.0:
        raise DataError(f"train ratio must be in (0, 1], got {train_ratio}")
    split_idx = int(train_ratio * len(token_ids))
    return token_ids[:split_idx], token_ids[split_idx:]


def loaders_from_tokens(
    train_ids,
    val_ids,
    batch_size: int,
    max_length: int,
    stride: int | None = None,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    warn=None,
) -> tuple[DataLoader, DataLoader]:
    """The train and validation loaders over two token arrays, with checks.

    The validation loader never shuffles and never drops its last batch. Text too short for
    one training window, or too few windows for one batch, raises DataError; an empty
    validation split only warns (its loss is reported as nan).
    """
    stride = max_length if stride is None else stride
    check_enough_tokens(len(train_ids), max_length, "the training split")
    train_ds = GPTDatasetV1(None, None, max_length, stride, token_ids=train_ids)
    val_ds = GPTDatasetV1(None, None, max_length, stride, token_ids=val_ids)
    if drop_last and len(train_ds) < batch_size:
        raise DataError(
            f"batch size {batch_size} is larger than the {len(train_ds)} training windows, so "
            "--drop-last leaves no batch; lower --batch-size or use --no-drop-last"
        )
    if len(val_ds) == 0 and warn is not None:
        warn(
            f"diygpt: warning: the validation split has {len(val_ids)} tokens, fewer than one window "
            f"of {max_length + 1}; validation loss will be nan (lower --train-ratio to fix)"
        )
    train_loader = make_loader(train_ds, batch_size, shuffle, drop_last, num_workers)
    val_loader = make_loader(val_ds, batch_size, False, False, num_workers)
    return train_loader, val_loader


@dataclass
class TrainingData:
    """Token ids of the train and validation splits, and a fingerprint of the source."""

    train_ids: np.ndarray
    val_ids: np.ndarray
    digest: str


def _token_files(paths: Sequence[PathLike]) -> list[PathLike] | None:
    """The ``.bin`` token files among ``paths``; None for text files; an error for a mix."""
    token_files = [p for p in paths if str(p).lower().endswith(".bin")]
    if token_files and len(token_files) != len(paths):
        raise DataError("give either text files or .bin token files (from `diygpt prepare`), not both")
    return token_files or None


def _read_token_files(token_files: Sequence[PathLike]) -> np.ndarray:
    """One file's ids memory-mapped; several joined by <|endoftext|>, as text files are
    (this copies them into memory)."""
    from diygpt.prepare import load_tokens

    refuse_twice([Path(p) for p in token_files])
    arrays = [load_tokens(p) for p in token_files]
    if len(arrays) == 1:
        return arrays[0]
    eot = np.array([EOT_ID], dtype=np.uint16)
    return np.concatenate([part for a in arrays for part in (eot, a)][1:])


def load_token_ids(paths: PathLike | Sequence[PathLike], tokenizer) -> np.ndarray:
    """All the ids of text files (encoded whole) or of ``.bin`` token files, unsplit."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    token_files = _token_files(paths)
    if token_files is not None:
        return _read_token_files(token_files)
    return encode_array(read_text(paths), tokenizer)


def load_training_data(
    paths: PathLike | Sequence[PathLike], tokenizer, train_ratio: float = 0.9
) -> TrainingData:
    """Text files (split by characters, as the book does) or ``.bin`` token files from
    ``diygpt prepare`` (split by tokens), ready for :func:`loaders_from_tokens`.

    The digest lets a resume refuse data that changed since its checkpoint.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    token_files = _token_files(paths)
    if token_files is None:
        text = read_text(paths)
        train_text, val_text = split_text(text, train_ratio)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        del text  # its two halves are all that is needed now
        return TrainingData(encode_array(train_text, tokenizer), encode_array(val_text, tokenizer),
                            digest)
    ids = _read_token_files(token_files)
    train_ids, val_ids = split_tokens(ids, train_ratio)
    return TrainingData(train_ids, val_ids, hashlib.sha256(memoryview(ids)).hexdigest())
