"""Shared test fixtures: the offline GPT-2 tokenizer and the book's training text."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("DIYGPT_ASSETS", ROOT.parent / "shared" / "assets"))
TOKENIZER_DIR = ASSETS / "gpt2"
VERDICT = ASSETS / "the-verdict.txt"

# Every test, and every CLI subprocess a test starts, reads the tokenizer from the assets.
os.environ.setdefault("DIYGPT_TOKENIZER_DIR", str(TOKENIZER_DIR))
# Without a GPU, Triton kernels (diygpt.fused_ce) run in triton's interpreter on CPU tensors;
# it is chosen when a kernel is defined, so before anything imports them. `make setup` puts
# triton in a folder of its own (see the Makefile), found here if the venv lacks it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_DIR = ROOT / ".venv" / "triton-tests"
if TRITON_DIR.is_dir() and importlib.util.find_spec("triton") is None:
    sys.path.append(str(TRITON_DIR))


# Tests that take ``device`` run on the CPU everywhere, and on CUDA too where there is one
# (bench/gpu.sh runs them on a lent GPU): the accelerator paths' correctness checks.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tokenizer():
    from diygpt.tokenizer import get_tokenizer

    return get_tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="session")
def verdict_text() -> str:
    return VERDICT.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def verdict_path() -> Path:
    return VERDICT


@pytest.fixture(scope="session")
def data(tmp_path_factory, verdict_text) -> Path:
    """The first 1,200 characters of the-verdict: enough for tiny runs of a few steps."""
    path = tmp_path_factory.mktemp("data") / "short.txt"
    path.write_text(verdict_text[:1200], encoding="utf-8")
    return path
