"""The ``diygpt`` command: one subcommand module each; user errors print one line, exit 2."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from diygpt import __version__
from diygpt.cli.report import PROG as _PROG
from diygpt.cli.report import Reported
from diygpt.cli.report import error as _error
from diygpt.cli.report import say as _say
from diygpt.errors import DiygptError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus a pointer to --help), not the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from diygpt.cli import download, evaluate, export, generate, prepare, train

    parser = _Parser(
        prog=_PROG,
        description="GPT-2 from scratch: pretrain on your text, evaluate, generate, "
        "and load OpenAI's GPT-2 weights.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (train, generate, evaluate, download, prepare, export):
        module.register(sub)
    for command in sub.choices.values():  # each command's own parser, for its errors
        command.set_defaults(parser=command)
    return parser


def _compile_failure(exc: BaseException) -> bool:
    """An error raised by torch.compile's machinery (dynamo or inductor)."""
    return any(cls.__module__.startswith(("torch._dynamo", "torch._inductor"))
               for cls in type(exc).__mro__)


def _out_of_memory(exc: BaseException) -> str | None:
    """What failed to allocate, when ``exc`` is torch running out of CPU or GPU memory."""
    torch = sys.modules.get("torch")
    text = str(exc)
    cuda = torch is not None and isinstance(exc, torch.OutOfMemoryError)
    if isinstance(exc, MemoryError):  # Python's or numpy's (a text read whole), no size said
        return _first_line(exc, 200) if str(exc).strip() else "a Python allocation failed"
    if not cuda and not (isinstance(exc, RuntimeError) and "can't allocate memory" in text):
        return None
    asked = re.search(r"tried to allocate (\d+) bytes", text)  # the CPU allocator's words
    if asked:
        size = int(asked.group(1))
        return f"tried to allocate {size / 1e9:.1f} GB" if size >= 1e9 else \
            f"tried to allocate {size / 1e6:.1f} MB"
    return _first_line(exc, 200)


def _tracebacks_wanted() -> bool:
    setting = os.environ.get("DIYGPT_TRACEBACK", "").strip().lower()
    return setting not in ("", "0", "false", "no", "off")


def _no_closed_streams() -> None:
    """``diygpt ... >&-``: Python leaves sys.stdout None (an AttributeError at the first
    print), and the next file opened would take descriptor 1. The output goes to /dev/null
    instead, as after ``| head`` leaves."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, "w", encoding="utf-8", closefd=False))


def _first_line(exc: BaseException, limit: int) -> str:
    """The first non-blank line of ``exc``'s message (torch's errors run to pages)."""
    first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return first.strip()[:limit]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for `train --resume` checks
    if unknown:  # argparse leaves them to the top parser, whose hint would be `diygpt --help`
        given = [str(a) for a in args.argv]
        # After the command, they are the command's to name; before it, the top parser's.
        after = unknown[0] not in given or given.index(unknown[0]) > given.index(args.command)
        (args.parser if after else parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    _no_closed_streams()
    try:
        return int(args.func(args) or 0)
    except Reported:
        return 2
    except DiygptError as exc:
        _error(str(exc))
        return 2
    except KeyboardInterrupt:
        _say(f"{_PROG}: interrupted")
        return 130
    except BrokenPipeError:  # e.g. `diygpt generate ... | head`
        return 0
    except Exception as exc:
        if _tracebacks_wanted():
            raise
        memory = _out_of_memory(exc)
        if memory:
            text = ("; a text too large to read at once: tokenize it with `diygpt prepare` "
                    "and pass the .bin" if isinstance(exc, MemoryError)
                    and args.command in ("train", "eval") else "")
            _error(f"out of memory: {memory}; use a smaller --batch-size or model{text} "
                   "(DIYGPT_TRACEBACK=1 shows the whole error)")
            return 2
        if not _compile_failure(exc):
            raise
        # torch.compile's errors are pages long; the first line says what went wrong.
        _error(f"--compile failed: {_first_line(exc, 300)}; run without --compile (on the CPU it "
               "needs a working C++ compiler; DIYGPT_TRACEBACK=1 shows the whole error)")
        return 2


if __name__ == "__main__":
    sys.exit(main())
