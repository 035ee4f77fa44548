"""GPT-2's byte-pair tokenizer (tiktoken), usable offline, and the book's conversion helpers."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from diygpt.errors import TokenizerError

if TYPE_CHECKING:  # torch only where tensors are made: `diygpt prepare` starts without it
    import torch

ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256
TOKENIZER_ENV = "DIYGPT_TOKENIZER_DIR"
# GPT-2's pre-tokenisation regex (tiktoken's r50k pattern).
_GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_FILES = ("encoder.json", "vocab.bpe")


def _encoding_from_dir(folder: Path):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(folder / "vocab.bpe"), encoder_json_file=str(folder / "encoder.json")
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=_GPT2_PAT,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT_ID},
    )


def _has_files(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _FILES)


@lru_cache(maxsize=4)
def _load(tokenizer_dir: str | None):
    if tokenizer_dir is not None:
        folder = Path(tokenizer_dir).expanduser()
        if not _has_files(folder):
            raise TokenizerError(
                f"tokenizer folder {folder} must contain encoder.json and vocab.bpe"
            )
        try:
            return _encoding_from_dir(folder)
        except (ValueError, AssertionError, KeyError, OSError) as exc:  # JSON errors included
            raise TokenizerError(
                f"tokenizer folder {folder}: encoder.json and vocab.bpe are unreadable or not "
                f"GPT-2's ({type(exc).__name__}); copy them again"
            ) from None
    # tiktoken reads its own cache first and downloads only if the files are not there.
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # network errors come in many types
        raise TokenizerError(
            "cannot load the GPT-2 tokenizer (no network?): put encoder.json and vocab.bpe "
            f"in a folder and pass --tokenizer-dir DIR (get_tokenizer(DIR) in Python) or set "
            f"{TOKENIZER_ENV}=DIR "
            f"({type(exc).__name__})"
        ) from exc


def get_tokenizer(tokenizer_dir: str | os.PathLike | None = None):
    """Return GPT-2's BPE as a ``tiktoken.Encoding``.

    Looks in ``tokenizer_dir``, then ``$DIYGPT_TOKENIZER_DIR``, then tiktoken's cache, then
    downloads. Offline with none of these it raises :class:`TokenizerError` saying what to do.
    """
    if tokenizer_dir is None:
        tokenizer_dir = os.environ.get(TOKENIZER_ENV) or None
    return _load(None if tokenizer_dir is None else str(tokenizer_dir))


def encode_array(text: str, tokenizer) -> np.ndarray:
    """The book's ``tokenizer.encode(text, allowed_special={"<|endoftext|>"})`` as a compact
    array: uint16 when the vocabulary fits (GPT-2's does), else int32.

    A corpus of N tokens is then 2N bytes; a list of Python ints holds about 36N.
    """
    allowed = {ENDOFTEXT}
    try:  # tiktoken >= 0.9: no list of Python ints
        ids = tokenizer.encode_to_numpy(text, allowed_special=allowed)
    except (AttributeError, UnicodeEncodeError):  # lone surrogates: encode repairs them
        ids = None
    if ids is None:
        ids = np.asarray(tokenizer.encode(text, allowed_special=allowed), dtype=np.int64)
    n_vocab = getattr(tokenizer, "n_vocab", None)
    small = n_vocab is not None and n_vocab <= np.iinfo(np.uint16).max + 1
    return ids.astype(np.uint16 if small else np.int32, copy=False)


def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    """Encode text to a (1, T) tensor of token ids; ``<|endoftext|>`` is allowed."""
    import torch

    encoded = tokenizer.encode(text, allowed_special={ENDOFTEXT})
    return torch.tensor(encoded, dtype=torch.long).unsqueeze(0)  # add the batch dimension


def token_ids_to_text(token_ids: torch.Tensor, tokenizer) -> str:
    """Decode a (1, T) or (T,) tensor of token ids back to text."""
    flat = token_ids[0] if token_ids.dim() == 2 and len(token_ids) == 1 else token_ids
    if flat.dim() != 1:
        raise ValueError(f"token_ids_to_text decodes one sequence, got shape "
                         f"{tuple(token_ids.shape)}; decode each row: token_ids_to_text(ids[i], ...)")
    return tokenizer.decode(flat.tolist())
