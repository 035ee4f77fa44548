"""Text files as the user gives them (files, folders of .txt) -> one string; no torch here, so
``diygpt prepare`` starts without it."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from diygpt.errors import DataError
from diygpt.tokenizer import ENDOFTEXT

PathLike = str | os.PathLike


def expand_paths(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """The files named, and the .txt files inside the folders named, each once."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    origins: list[Path] = []  # the argument each file came from: itself or its folder
    for raw in paths:
        if not os.fspath(raw).strip():  # Path("") is the current folder: all its .txt
            raise DataError(f"a data path is blank ({os.fspath(raw)!r}); name a file or folder")
        p = Path(raw)
        if p.is_dir():
            # .txt in any case; not inside hidden folders or hidden files (.git,
            # .ipynb_checkpoints): those are tools' copies, not the user's corpus
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() == ".txt" and f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise DataError(f"folder {p} contains no .txt files")
            files.extend(found)
            origins.extend([p] * len(found))
        elif p.is_file():
            files.append(p)
            origins.append(p)
        elif p.exists():
            # A pipe (`<(zcat x.gz)`) is read once, but the split and the progress bar need
            # the size up front, and a resume reads the data again.
            kind = "a pipe" if stat.S_ISFIFO(p.stat().st_mode) else "not a regular file"
            raise DataError(f"data file {p} is {kind}; write the text to a file first")
        elif p.is_symlink():
            raise DataError(f"data file {p} is a broken symbolic link (a loop, or its target "
                            "is missing)")
        else:
            raise DataError(f"data file {p} does not exist")
    if not files:
        raise DataError("no data files given")
    refuse_twice(files, origins)
    return files


def refuse_twice(files: Sequence[Path], origins: Sequence[Path] | None = None) -> None:
    # Read twice, a file would put copies of its text in both the train and val splits.
    def how(f: Path, origin: Path) -> str:
        return f"as {f}" if origin is f else f"in the folder {origin}"

    seen: dict[Path, tuple[Path, Path]] = {}
    for f, origin in zip(files, origins or files, strict=True):
        first = seen.setdefault(f.resolve(), (f, origin))
        if first[0] is not f:
            raise DataError(f"{f} is given twice ({how(*first)} and {how(f, origin)}); give "
                            "each file once")


def decode_text(raw: bytes, path: Path, offset: int = 0) -> str:
    """UTF-8 bytes (of ``path``, from byte ``offset``) as the book's ``open(path,
    encoding="utf-8").read()`` gives them: Windows' and old Macs' line ends read as "\n"."""
    if b"\x00" in raw:
        encoding = _utf16_kind(raw, offset)
        if encoding:
            # Windows Notepad's "Unicode": every ASCII character is followed or led by a NUL.
            raise DataError(f"{path} is UTF-16 text, not UTF-8; convert it, e.g. "
                            f"`iconv -f {encoding} -t utf-8 {path.name}`")
        raise DataError(f"{path} looks like a binary file (it contains NUL bytes), not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not valid UTF-8 (byte {offset + exc.start}); convert it, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name}`"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _utf16_kind(raw: bytes, offset: int) -> str | None:
    """iconv's name for the UTF-16 that ``raw`` looks like, or None."""
    if offset == 0 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf-16"  # the byte-order mark tells iconv the order
    head = raw[:4096]
    if len(head) < 8:
        return None
    # Mostly-ASCII UTF-16 without a byte-order mark: NULs at one parity only, and printable
    # ASCII at the other (16-bit numbers saved as .txt have NULs in one place too).
    even, odd = head[0::2], head[1::2]
    nuls, chars = (even, odd) if even.count(0) > odd.count(0) else (odd, even)
    printable = sum(32 <= b < 127 or b in b"\t\n\r" for b in chars)
    if chars.count(0) or nuls.count(0) < 0.9 * len(nuls) or printable < 0.9 * len(chars):
        return None
    return "utf-16be" if nuls is even else "utf-16le"  # the zero high byte comes first in BE


def read_text(paths: PathLike | Sequence[PathLike]) -> str:
    """Read a file, several files, or a folder of .txt files (sorted) as one string.

    A folder is searched in its sub-folders too, for ``.txt`` in any letter case, skipping
    hidden files and folders (``.git``, ``.ipynb_checkpoints``). Several documents are
    joined with ``<|endoftext|>`` so the model sees where each ends.
    """
    texts = []
    for path in expand_paths(paths):
        text = decode_text(path.read_bytes(), path)
        if not text.strip():
            raise DataError(f"data file {path} is empty or holds only whitespace")
        texts.append(text)
    return ENDOFTEXT.join(texts)


def split_text(text: str, train_ratio: float = 0.9) -> tuple[str, str]:
    """Split characters at ``int(train_ratio * len(text))``, as the book does; a split that
    would fall inside an ``<|endoftext|>`` (such as the one joining two files) moves to its
    end, so that the token is not cut into plain-text pieces."""
    if not 0.0 < train_ratio <= 1.0:
        raise DataError(f"train ratio must be in (0, 1], got {train_ratio}")
    split_idx = int(train_ratio * len(text))
    begin = text.find(ENDOFTEXT, max(split_idx - len(ENDOFTEXT) + 1, 0))
    if 0 <= begin < split_idx:
        split_idx = begin + len(ENDOFTEXT)
    return text[:split_idx], text[split_idx:]
