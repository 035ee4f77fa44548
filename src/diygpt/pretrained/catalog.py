"""The four released GPT-2 sizes: their names in each source and where they are kept."""

from __future__ import annotations

import os
from pathlib import Path

# Our name -> (OpenAI's folder name, Hugging Face repository)
GPT2_MODELS: dict[str, tuple[str, str]] = {
    "gpt2-small": ("124M", "openai-community/gpt2"),
    "gpt2-medium": ("355M", "openai-community/gpt2-medium"),
    "gpt2-large": ("774M", "openai-community/gpt2-large"),
    "gpt2-xl": ("1558M", "openai-community/gpt2-xl"),
}

# Our name -> (width n_embd, depth n_layer), as OpenAI's hparams.json and HF's config.json say
GPT2_SHAPES: dict[str, tuple[int, int]] = {
    "gpt2-small": (768, 12),
    "gpt2-medium": (1024, 24),
    "gpt2-large": (1280, 36),
    "gpt2-xl": (1600, 48),
}


def diygpt_home() -> Path:
    """``$DIYGPT_HOME``, by default ``~/.cache/diygpt``."""
    return Path(os.environ.get("DIYGPT_HOME") or Path.home() / ".cache" / "diygpt").expanduser()


def model_dir(name: str, download_dir: Path | str | None = None) -> Path:
    """Where ``diygpt download NAME`` puts the files and ``--pretrained NAME`` looks."""
    return Path(download_dir) if download_dir is not None else diygpt_home() / "models" / name
