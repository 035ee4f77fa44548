"""Paths and small builders shared by the tests (importable, unlike conftest)."""

from conftest import ASSETS, ROOT, TOKENIZER_DIR, VERDICT

__all__ = ["ASSETS", "ROOT", "TOKENIZER_DIR", "VERDICT"]
