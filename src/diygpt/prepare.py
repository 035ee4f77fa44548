"""Tokenize a text corpus once into a flat uint16 token file (nanoGPT's ``train.bin`` format).

Streams: files are read in blocks cut after a newline, a batch of blocks is encoded by
tiktoken's ``encode_ordinary_batch`` on several threads (its Rust core releases the GIL),
and the ids are appended to the output at once. Memory is bounded by one batch of blocks,
whatever the corpus size. Documents are separated by ``<|endoftext|>`` (id 50256), as
:func:`diygpt.data.read_text` joins them; the text itself is encoded as ordinary text.

Blocks are cut only after a newline that sits between two visible ASCII characters
(``x\ny``): GPT-2's pre-tokenizer makes such a newline a token of its own, so the ids are
exactly those of encoding the whole text in one call.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from diygpt.data import _expand
from diygpt.errors import DataError
from diygpt.tokenizer import EOT_ID

BLOCK_BYTES = 1 << 20  # 1 MiB of text per block: ~250k tokens


@dataclass
class PrepareStats:
    files: int
    bytes_read: int
    tokens: int


def _is_visible_ascii(byte: int) -> bool:
    return 0x21 <= byte <= 0x7E


def safe_cut(data: bytes) -> int:
    """Index just after the last newline with a visible ASCII character on each side, or 0.

    Whitespace next to a newline can merge with it into one token (``"\n\n"`` is id 628),
    so a cut anywhere else could change the ids.
    """
    end = len(data) - 1
    while (i := data.rfind(b"\n", 0, end)) > 0:
        if _is_visible_ascii(data[i - 1]) and _is_visible_ascii(data[i + 1]):
            return i + 1
        end = i
    return 0


def read_blocks(path: Path, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[str, int]]:
    """Yield (text, raw byte count) blocks of a UTF-8 file, each cut at a :func:`safe_cut`."""
    carry = b""
    offset = 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(block_bytes)
            data = carry + raw
            if not raw:
                if data:
                    yield _decode(data, path, offset), len(data)
                return
            cut = safe_cut(data)
            if cut == 0:  # no safe cut yet: read on until one, or the end
                carry = data
                continue
            carry = data[cut:]
            yield _decode(data[:cut], path, offset), cut
            offset += cut


def _decode(data: bytes, path: Path, offset: int) -> str:
    if b"\x00" in data:
        raise DataError(f"{path} looks like a binary file (it contains NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid UTF-8 (byte {offset + exc.start})") from None


def _batches(files: list[Path], batch: int, block_bytes: int) -> Iterator[list[tuple[str, int]]]:
    """Blocks of all files in order, grouped; an empty string marks a document boundary."""
    pending: list[tuple[str, int]] = []
    for i, path in enumerate(files):
        if i > 0:
            pending.append(("", 0))
        for block in read_blocks(path, block_bytes):
            pending.append(block)
            if len(pending) >= batch:
                yield pending
                pending = []
    if pending:
        yield pending


def encode_blocks(tokenizer, texts: list[str], threads: int) -> np.ndarray:
    """Token ids of the blocks, concatenated as uint16; "" stands for <|endoftext|>."""
    encoded = tokenizer.encode_ordinary_batch(texts, num_threads=threads)
    parts = [np.array([EOT_ID] if t == "" else ids, dtype=np.uint16)
             for t, ids in zip(texts, encoded, strict=True)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def prepare_tokens(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    tokenizer,
    threads: int | None = None,
    block_bytes: int = BLOCK_BYTES,
    progress: bool = True,
) -> PrepareStats:
    """Tokenize text files (or folders of .txt) into ``out``, a flat uint16 array of ids."""
    if tokenizer.n_vocab > np.iinfo(np.uint16).max + 1:
        raise DataError(f"a vocabulary of {tokenizer.n_vocab} does not fit uint16 ids")
    files = _expand(paths)
    threads = threads or os.cpu_count() or 1
    total = sum(f.stat().st_size for f in files)
    stats = PrepareStats(files=len(files), bytes_read=0, tokens=0)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", file=sys.stderr,
               disable=None if progress else True)
    try:
        with open(out, "wb") as f:
            # 4 blocks per thread keeps every thread busy while bounding memory.
            for batch in _batches(files, 4 * threads, block_bytes):
                ids = encode_blocks(tokenizer, [text for text, _ in batch], threads)
                ids.tofile(f)
                done = sum(n for _, n in batch)
                stats.bytes_read += done
                stats.tokens += len(ids)
                bar.update(done)
    finally:
        bar.close()
    return stats


def load_tokens(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a token file written by :func:`prepare_tokens` (nothing is read up front)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token file {path} does not exist")
    if path.stat().st_size % 2:
        raise DataError(f"{path} has an odd size, so it is not a uint16 token file")
    return np.memmap(path, dtype=np.uint16, mode="r")
