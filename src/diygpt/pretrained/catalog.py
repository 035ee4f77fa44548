"""The four released GPT-2 sizes: their names in each source and where they are kept."""

from __future__ import annotations

import json
import os
from pathlib import Path

# What `diygpt download --format` fetches: OpenAI's TF release or Hugging Face's files.
FORMATS = ("openai", "hf")
# The files of one model in each format, as their sources name them.
OPENAI_FILES = (
    "checkpoint",
    "hparams.json",
    "model.ckpt.index",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.meta",
)
HF_FILES = ("model.safetensors", "config.json")

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


DESCRIPTORS = ("hparams.json", "config.json")  # OpenAI's, Hugging Face's


def descriptor_shape(path: Path) -> tuple[int, int] | None:
    """(n_embd, n_layer) from hparams.json or config.json; None if absent or unreadable."""
    try:
        desc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(desc, dict):
        return None
    shape = desc.get("n_embd"), desc.get("n_layer")
    return shape if all(type(v) is int for v in shape) else None  # type: ignore[return-value]


def other_size(name: str, folder: Path) -> tuple[str, tuple[int, int]] | None:
    """(descriptor file, its shape) where one in ``folder`` says it is not ``name``'s size."""
    for file in DESCRIPTORS:
        shape = descriptor_shape(folder / file)
        if shape is not None and shape != GPT2_SHAPES[name]:
            return file, shape
    return None


def size_clash(name: str, file: str, shape: tuple[int, int]) -> str:
    """"gpt2-medium (its hparams.json says 1024 wide, 24 layers; gpt2-small is 768 wide,
    12 layers)": what a folder holds, against the size ``name`` asked for."""
    held = next((n for n, s in GPT2_SHAPES.items() if s == shape), "a model")
    want = GPT2_SHAPES[name]
    return (f"{held} (its {file} says {shape[0]} wide, {shape[1]} layers; {name} is "
            f"{want[0]} wide, {want[1]} layers)")
