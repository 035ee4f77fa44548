"""Run the diygpt CLI in-process and capture what the user sees (shared by the bad-input tests)."""

from __future__ import annotations

from pathlib import Path

TINY = ["--preset", "tiny", "--context-length", "16", "--emb-dim", "16", "--n-heads", "2"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``diygpt argv``; argparse's exits count as exit codes.

    ``capsys=None`` (for module-scoped fixtures) leaves the output uncaptured.
    """
    from diygpt.cli.main import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = int(exc.code or 0)
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    assert "Traceback" not in err + out
    return rc, out, err


def one_line_error(capsys, *argv: str) -> str:
    """The single ``diygpt: error: ...`` line a bad input must produce (exit code 2)."""
    rc, _, err = run_cli(capsys, *argv)
    lines = [ln for ln in err.splitlines() if ln.startswith("diygpt: error:")]
    assert rc == 2 and len(lines) == 1, err
    return lines[0]


def train_tiny(capsys, data: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(
        capsys, "train", "--data", data, *TINY, "--batch-size", "2", "--eval-freq", "2",
        "--eval-iter", "1", "--sample-prompt", "", "--no-progress", "--out", out, *extra,
    )
