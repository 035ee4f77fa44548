"""Tokenize a text corpus once into a flat uint16 token file (nanoGPT's ``train.bin`` format).

Streams: each file is read in blocks of about 1 MiB, a batch of blocks is encoded on several
threads (tiktoken's Rust core releases the GIL), and the ids are appended to a temp file that
replaces the output only once the whole corpus is done. Memory is bounded by one batch of
blocks (at most 64 MiB of text, or a block a thread), whatever the corpus size.

The ids are those ``diygpt train --data`` gets from the same text files: files are joined by
``<|endoftext|>`` (id 50256), and a literal ``<|endoftext|>`` in the text is that token too,
as in the book's ``tokenizer.encode(text, allowed_special={"<|endoftext|>"})``.

Where a block is cut: just before a whitespace byte that follows a character that is not
whitespace. GPT-2's pre-tokenizer regex has no look-behind and never puts a non-whitespace
character and the whitespace after it in one piece, so a piece of the whole text ends there,
that piece is matched the same without what follows, and matching goes on from there as it
does in the whole text: the two blocks' ids, concatenated, are the whole text's. A file with
no such place for a long stretch is read on until one comes, or the file ends.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from diygpt.checkpointing import atomic_write, describe_os_error, output_path
from diygpt.errors import DataError
from diygpt.textfiles import decode_text, expand_paths
from diygpt.tokenizer import ENDOFTEXT, encode_array

BLOCK_BYTES = 1 << 20  # 1 MiB of text per block: ~250k tokens
MAX_BATCH_BYTES = 64 << 20  # text read ahead of the encoding threads, at most

# A whitespace byte (every ASCII whitespace byte is \s to GPT-2's regex) after a visible
# ASCII byte or the last byte of a longer UTF-8 character, which :func:`safe_cut` decodes to
# make sure it is not whitespace (U+00A0, U+3000, ...). Spelled reversed: a search of the
# reversed bytes finds the last such place first.
_CUT_REVERSED = re.compile(rb"[\t\n\x0b\x0c\r ][\x21-\x7e\x80-\xbf]")

@dataclass
class PrepareStats:
    files: int
    bytes_read: int
    tokens: int


def safe_cut(data: bytes | bytearray, start: int = 0) -> int:
    """Index of the last place in ``data[start:]`` where a block may end (see the module's
    docstring): a whitespace byte after a non-whitespace character. 0 if there is none."""
    reversed_ = bytes(data[start:])[::-1]
    pos = 0
    while match := _CUT_REVERSED.search(reversed_, pos):
        cut = len(data) - 1 - match.start()
        if data[cut - 1] < 0x80 or not _char_ending_at(data, cut).isspace():
            return cut
        pos = match.start() + 1
    return 0


def _char_ending_at(data: bytes | bytearray, end: int) -> str:
    """The UTF-8 character whose last byte is ``data[end - 1]`` (" " if it is no valid one,
    so that no cut is made after it)."""
    begin = end - 1
    while begin > max(end - 4, 0) and 0x80 <= data[begin] < 0xC0:
        begin -= 1
    try:
        return bytes(data[begin:end]).decode("utf-8")
    except UnicodeDecodeError:
        return " "


def read_blocks(path: Path, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[str, int]]:
    """Yield (text, raw byte count) blocks of a UTF-8 file, each ending at a :func:`safe_cut`.

    A block ends before a whitespace byte that follows a visible one, never between "\r"
    and "\n": each block's line ends read as the whole file's do."""
    carry = bytearray()
    offset = 0
    try:
        with open(path, "rb") as f:
            while raw := f.read(block_bytes):
                # Only the new bytes, and the one before them, can hold a cut not seen before.
                searched = max(len(carry) - 1, 0)
                carry += raw
                cut = safe_cut(carry, searched)
                if cut:
                    yield decode_text(bytes(carry[:cut]), path, offset), cut
                    del carry[:cut]
                    offset += cut
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if carry:
        yield decode_text(bytes(carry), path, offset), len(carry)


def _blocks(files: list[Path], block_bytes: int) -> Iterator[tuple[str, int]]:
    """(text, raw bytes) of every file's blocks in order; a literal <|endoftext|> between
    two files, which the encoder's ``allowed_special`` makes its token, as train's join does."""
    for i, path in enumerate(files):
        if i > 0:
            yield ENDOFTEXT, 0
        blank = True
        for text, size in read_blocks(path, block_bytes):
            blank = blank and text.isspace()
            yield text, size
        if blank:  # the rule `train --data` applies to a text file
            raise DataError(f"data file {path} is empty or holds only whitespace")


def _merged(blocks: Iterator[tuple[str, int]], block_bytes: int) -> Iterator[tuple[str, int]]:
    """Neighbouring blocks joined up to ``block_bytes`` characters: a corpus of many small
    files is then a few large tasks, not one per file (2.3x faster for 1 kB files). Each
    block ends at a :func:`safe_cut`, so the joined text's ids are the blocks' ids."""
    texts: list[str] = []
    chars = size = 0
    for text, n in blocks:
        if texts and chars + len(text) > block_bytes:
            yield "".join(texts), size
            texts, chars, size = [], 0, 0
        texts.append(text)
        chars += len(text)
        size += n
    if texts:
        yield "".join(texts), size


def _batches(files: list[Path], batch: int, block_bytes: int) -> Iterator[list[tuple[str, int]]]:
    """The merged blocks of all files in order, ``batch`` at a time."""
    pending: list[tuple[str, int]] = []
    for entry in _merged(_blocks(files, block_bytes), block_bytes):
        pending.append(entry)
        if len(pending) >= batch:
            yield pending
            pending = []
    if pending:
        yield pending


def encode_blocks(
    encode: Callable[[str], np.ndarray],
    texts: Sequence[str],
    map_: Callable = map,
) -> np.ndarray:
    """Token ids of the blocks, concatenated as uint16."""
    parts = list(map_(lambda t: encode(t).astype(np.uint16, copy=False), texts))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def _check_out(out: Path, files: list[Path]) -> None:
    if out.is_dir():
        raise DataError(f"--out {out} is a folder; name the token file, e.g. {out / 'train.bin'}")
    if out.exists() and any(os.path.samefile(f, out) for f in files):
        raise DataError(f"--out {out} is one of the input files; writing it would destroy that "
                        "text (choose another name, e.g. train.bin)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(describe_os_error(exc, out)) from None


def prepare_tokens(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    tokenizer,
    threads: int | None = None,
    block_bytes: int = BLOCK_BYTES,
    progress: bool = True,
) -> PrepareStats:
    """Tokenize text files (or folders of .txt) into ``out``, a flat array of uint16 ids.

    ``out`` is replaced only when every file has been read: on an error or Ctrl-C an older
    ``out`` is left as it was, and no part-written file is left behind.
    """
    if tokenizer.n_vocab > np.iinfo(np.uint16).max + 1:
        raise DataError(f"a vocabulary of {tokenizer.n_vocab} does not fit uint16 ids")
    files = expand_paths(paths)
    out = output_path(out)  # through a symlink, as the shell's `>` writes
    _check_out(out, files)
    # One core is left to the reading, cutting and writing in this thread: on the 2-core
    # benchmark machine one encoding thread ran 28 MB/s and two 20 MB/s (BENCHMARKS.md).
    threads = threads or max(1, _usable_cpus() - 1)
    stats = PrepareStats(files=len(files), bytes_read=0, tokens=0)
    encode = functools.partial(encode_array, tokenizer=tokenizer)

    def write(tmp: Path) -> None:
        bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
                   desc="tokenize", file=sys.stderr, disable=None if progress else True)
        with bar, open(tmp, "wb") as f, ThreadPoolExecutor(threads) as pool:
            for batch in _batches(files, batch_blocks(threads, block_bytes), block_bytes):
                ids = encode_blocks(encode, [text for text, _ in batch], pool.map)
                ids.tofile(f)
                done = sum(n for _, n in batch)
                stats.bytes_read += done
                stats.tokens += len(ids)
                bar.update(done)

    atomic_write(out, write)
    return stats


def batch_blocks(threads: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Blocks read before each round of encoding: 4 a thread keeps every thread busy, but
    text in flight is capped (at one block a thread at least), or on a 64-core machine a
    100 MB corpus would be read whole and memory would grow with it."""
    return max(threads, min(4 * threads, MAX_BATCH_BYTES // block_bytes))


def _usable_cpus() -> int:
    """The CPUs this process may use: those it may run on (taskset, cpusets), fewer under a
    container's CPU quota, not all the machine's."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on every OS
        cpus = os.cpu_count() or 2
    quota = _cgroup_cpu_quota()
    return min(cpus, quota) if quota else cpus


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The CPU quota of a container, rounded up (cgroup v2's cpu.max, or v1's cfs files);
    None when unlimited or unknown."""
    for read in (lambda: (root / "cpu.max").read_text().split()[:2],
                 lambda: [(root / "cpu" / f"cpu.cfs_{n}_us").read_text() for n in ("quota", "period")]):
        try:
            quota, period = (int(v) for v in read())
        except (OSError, ValueError):  # "max" (v2's unlimited), no such file, not Linux
            continue
        if quota > 0 and period > 0:  # v1 writes -1 when unlimited
            return max(1, math.ceil(quota / period))
    return None


def load_tokens(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a token file written by :func:`prepare_tokens` (nothing is read up front),
    or llm.c's GPT-2 token file (its header skipped)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a token file from `diygpt prepare`")
    if not path.is_file():
        raise DataError(f"token file {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"token file {path} is empty (0 tokens)")
    if size >= LLMC_HEADER_BYTES and _llmc_header(path) is not None:
        return _llmc_tokens(path, size)
    if size % 2:
        raise DataError(f"{path} has an odd size, so it is not a uint16 token file")
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    _refuse_wide_ids(path, tokens)
    return tokens


def _refuse_wide_ids(path: Path, tokens: np.ndarray) -> None:
    """GPT-2 ids saved as int32 or int64 read as uint16 are every id followed by zeros: a
    model would train on garbage without an error, since every value is a valid id."""
    head = np.asarray(tokens[:8192])
    if len(head) < 64 or not head[0::2].any():
        return
    for width, name in ((4, "int64"), (2, "int32")):
        if len(tokens) % width or head.reshape(-1, width)[:, 1:].any():
            continue
        # Text can make the same pattern ("Go!" repeated: an id, then "!", id 0), but with
        # few ids at the even places; real text saved wide has many.
        ids = head[0::width]
        if len(np.unique(ids)) >= min(16, len(ids) // 4):
            raise DataError(
                f"{path} looks like {name} token ids (every id is followed by zero bytes), not "
                "the uint16 ids diygpt reads; convert it with numpy: "
                f"np.fromfile(path, np.{name}).astype(np.uint16).tofile(new_path)"
            )


# llm.c's token files (its dev/data scripts): 256 int32s (magic, version, token count), then
# the ids; version 1 is GPT-2's uint16 ids, the same tokens as diygpt's headerless files.
LLMC_HEADER_BYTES = 256 * 4
_LLMC_MAGIC = 20240520


def _llmc_header(path: Path) -> np.ndarray | None:
    header = np.fromfile(path, dtype="<i4", count=256)
    return header if header[0] == _LLMC_MAGIC else None


def _llmc_tokens(path: Path, size: int) -> np.ndarray:
    header = _llmc_header(path)
    version, count = int(header[1]), int(header[2])
    if version != 1:
        raise DataError(f"{path} is an llm.c token file of version {version}; only version 1 "
                        "(GPT-2's uint16 ids) is read")
    if size != LLMC_HEADER_BYTES + 2 * count:
        raise DataError(f"{path}: its llm.c header says {count} tokens, but the file holds "
                        f"{(size - LLMC_HEADER_BYTES) / 2:g} (truncated?)")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=LLMC_HEADER_BYTES)
