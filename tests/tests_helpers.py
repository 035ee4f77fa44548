"""Paths and small builders shared by the tests (importable, unlike conftest)."""

from conftest import ASSETS, ROOT, TOKENIZER_DIR, VERDICT

__all__ = ["ASSETS", "ROOT", "TOKENIZER_DIR", "VERDICT", "forget_kernel"]


def forget_kernel(monkeypatch, loaded, no_compiler_in=None) -> None:
    """Make a ``diygpt.native.CheckedKernel`` build and check again at its next ``load()``;
    with ``no_compiler_in`` (a folder), with no C compiler and an empty cache there."""
    monkeypatch.setattr(loaded, "kernel", None)
    monkeypatch.setattr(loaded, "reason", None)
    if no_compiler_in is not None:
        monkeypatch.setenv("CC", str(no_compiler_in / "no-such-cc"))
        monkeypatch.setenv("DIYGPT_CACHE_DIR", str(no_compiler_in))
