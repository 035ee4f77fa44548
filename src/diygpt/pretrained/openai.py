"""OpenAI's original GPT-2 release: a TF checkpoint plus ``hparams.json``.

The folder the book's downloader fills (``checkpoint``, ``hparams.json``,
``model.ckpt.index``, ``model.ckpt.data-00000-of-00001``, ``model.ckpt.meta``) is read
without TensorFlow; ``model.ckpt.meta`` (the TF graph) is not needed.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from diygpt.config import GPTConfig
from diygpt.pretrained.gpt2_layout import config_from_json, gpt2_tensors
from diygpt.pretrained.source import TensorSource
from diygpt.pretrained.tf_checkpoint import open_tf_checkpoint

_TOP = {"wte": "model/wte", "wpe": "model/wpe", "ln_f/g": "model/ln_f/g", "ln_f/b": "model/ln_f/b"}


def is_openai_dir(folder: Path) -> bool:
    """``hparams.json`` and a checkpoint whose data is there: an OpenAI download cut short
    (its data shard still a ``.part``) does not hide other weights in the folder."""
    if not (folder / "hparams.json").is_file():
        return False
    return any(
        not shard.name.endswith(".part")
        for index in folder.glob("*.index")
        for shard in folder.glob(glob.escape(index.stem) + ".data-*-of-*")
    )


def checkpoint_prefix(folder: Path) -> Path:
    """The checkpoint prefix named by the ``checkpoint`` file, else ``model.ckpt``."""
    marker = folder / "checkpoint"
    if marker.is_file():
        found = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', marker.read_text(), re.M)
        if found:
            return folder / Path(found.group(1)).name
    return folder / "model.ckpt"


def config_from_hparams(path: Path) -> GPTConfig:
    """GPT-2's hyperparameters from OpenAI's ``hparams.json``."""
    return config_from_json(path, ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"))


def _block_name(i: int, part: str) -> str:
    return f"model/h{i}/{part}"


def open_openai(folder: Path, prefix: Path | None = None) -> tuple[TensorSource, GPTConfig]:
    """The folder's checkpoint at ``prefix`` (a ``.index`` file named without its suffix,
    e.g. a fine-tuning run's ``model-1000``), else at :func:`checkpoint_prefix`."""
    return open_tf_checkpoint(prefix or checkpoint_prefix(folder)), config_from_hparams(
        folder / "hparams.json"
    )


def openai_tensors(source: TensorSource, cfg: GPTConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Book-named tensors; ``out_head`` is tied to ``wte`` by the caller."""
    return gpt2_tensors(source, cfg, _TOP, _block_name, conv_lead_dim=True)
