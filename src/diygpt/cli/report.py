"""How the CLI speaks on stderr: one line per message, each rank naming itself."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from diygpt.errors import OutputError

PROG = "diygpt"


class Reported(Exception):
    """The error was printed already (each rank of a run said its line before any left);
    the command only exits with status 2."""


def say(line: str) -> None:
    # One write per line: Python's stderr writes through, so print() would send the text and
    # its newline in two calls, and under torchrun another rank's line could land in between.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def error(message: str) -> None:
    # Under torchrun each rank that meets an error says so; the others name their rank.
    rank = os.environ.get("RANK", "0")
    tag = "" if rank == "0" else f" (rank {rank})"
    say(f"{PROG}: error{tag}: {message}")


def out(text: str, stream: TextIO | None = None) -> None:
    """``text`` to the standard output (or ``stream``), flushed: a failed write (a full disk
    behind ``> out.txt``) is one line naming the output; a reader that left (``| head``)
    stays BrokenPipeError, which ends the command quietly."""
    stream = stream if stream is not None else sys.stdout
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError(f"cannot write the output: {exc.strerror or exc}") from None
