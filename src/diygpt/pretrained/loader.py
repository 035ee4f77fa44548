"""``load_pretrained``: find GPT-2 weights, tell their format, and build the model.

Formats are told apart by content, not by trusting the name: a folder with
``hparams.json`` and a ``.index`` file is OpenAI's TF release; a ``.safetensors``,
``.bin``, ``.pth`` or ``.pt`` file is Hugging Face's layout if it holds ``wte.weight``
(with or without ``transformer.``) and the book's if it holds ``tok_emb.weight``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from diygpt.checkpointing import refuse_special_weights
from diygpt.config import GPTConfig
from diygpt.errors import CheckpointError
from diygpt.model import GPTModel
from diygpt.pretrained.assemble import assemble, expected_shapes, meta_model
from diygpt.pretrained.book import book_config, book_extra, book_tensors, book_tied, is_book_layout
from diygpt.pretrained.catalog import GPT2_MODELS, model_dir, other_size, size_clash
from diygpt.pretrained.gpt2_layout import count_layers
from diygpt.pretrained.hf import hf_config, hf_lm_head, hf_prefix, hf_tensors
from diygpt.pretrained.openai import is_openai_dir, open_openai, openai_tensors
from diygpt.pretrained.readers import SHARD_INDEX, open_file
from diygpt.pretrained.source import TensorSource

# The causal-mask buffers some transformers versions save with the weights.
_HF_MASKS = (".attn.bias", ".attn.masked_bias")

# In a folder, the first of these that exists is loaded (else a shard index).
_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")
_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def _where_to_put(name: str, folder: Path) -> str:
    return (
        f"run `diygpt download {name}` or put OpenAI's files (checkpoint, hparams.json, "
        f"model.ckpt.*) or Hugging Face's (model.safetensors, config.json) in {folder}"
    )


def resolve(path_or_name: str | Path, download_dir: Path | str | None = None) -> Path:
    """A path as given, or a GPT-2 name's download folder; one-line error if neither."""
    path = Path(path_or_name).expanduser()
    refuse_special_weights(path)
    if path.exists():
        return path
    name = str(path_or_name)
    if name in GPT2_MODELS:
        return named_dir(name, download_dir)
    raise CheckpointError(
        f"{name}: no such file or folder, and not one of {', '.join(GPT2_MODELS)}"
    )


def named_dir(name: str, download_dir: Path | str | None = None) -> Path:
    """The download folder of a GPT-2 size, by name only (a ``./gpt2-small`` folder in
    the working directory is not looked at); one-line error if it holds no weights."""
    if name not in GPT2_MODELS:
        raise CheckpointError(f"{name}: not one of {', '.join(GPT2_MODELS)}")
    folder = model_dir(name, download_dir)
    if not folder.is_dir() or not (is_openai_dir(folder) or _folder_file(folder)):
        raise CheckpointError(f"no {name} weights in {folder}; {_where_to_put(name, folder)}")
    if found := other_size(name, folder):  # e.g. a mirror that served another model
        raise CheckpointError(f"{folder} holds {size_clash(name, *found)}, not {name}; load "
                              "it by its path, or download the right one")
    return folder


def _folder_file(folder: Path) -> Path | None:
    return next((folder / f for f in _FOLDER_FILES if (folder / f).is_file()), None)


def load_pretrained(
    path_or_name: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    download_dir: Path | str | None = None,
    strict: bool = True,
) -> GPTModel:
    """A GPTModel in eval mode from a weights folder or file, or a GPT-2 name.

    ``path_or_name`` is a folder (OpenAI's release, or one holding ``model.safetensors``
    / ``pytorch_model.bin``), a single weights file, or ``gpt2-small|medium|large|xl``,
    looked up in ``download_dir`` (default ``$DIYGPT_HOME/models/<name>``). ``dtype`` is
    fp32 (default), bf16 or fp16. Loading is strict: a missing or misshapen tensor is an
    error naming the file and tensor. ``strict=False`` only tolerates extra tensors.
    """
    path = resolve(path_or_name, download_dir)
    try:
        return _load_path(path, device, dtype, strict)
    except CheckpointError as exc:
        name = _downloaded_as(path)
        if name is None:
            raise
        # A file `diygpt download` placed is skipped by the next download, damaged or not.
        folder = model_dir(name)
        raise CheckpointError(f"{exc}; if the download went wrong, delete {folder} and run "
                              f"`diygpt download {name}` again") from None


def _downloaded_as(path: Path) -> str | None:
    """The GPT-2 name whose default download folder holds ``path``, or None."""
    folder = path if path.is_dir() else path.parent
    return next((n for n in GPT2_MODELS if model_dir(n).resolve() == folder.resolve()), None)


def _load_path(
    path: Path, device: torch.device | str, dtype: torch.dtype | str | None, strict: bool
) -> GPTModel:
    if path.suffix == ".index" and path.is_file():  # this checkpoint, whatever `checkpoint` names
        if not (path.parent / "hparams.json").is_file():
            raise CheckpointError(f"{path}: OpenAI's TF checkpoint needs the hparams.json "
                                  "that came with it, in the same folder")
        return _load_openai(path.parent, path.with_suffix(""), device, dtype)
    if path.is_dir():
        if is_openai_dir(path):
            return _load_openai(path, None, device, dtype)
        file = _folder_file(path) or next(iter(sorted(path.glob("*" + SHARD_INDEX))), None)
        if file is None:
            unfinished = sorted(path.glob("*.part"))
            if unfinished:
                raise CheckpointError(
                    f"{path}: an unfinished download ({unfinished[0].name}); run `diygpt "
                    "download NAME` again (with --dir for this folder) to finish it"
                )
            if (path / "hparams.json").is_file() and (index := next(path.glob("*.index"), None)):
                raise CheckpointError(f"{index}: its data file ({index.stem}.data-00000-of-"
                                      "...) is missing from the folder")
            raise CheckpointError(
                f"{path}: no weights found (expected OpenAI's model.ckpt.index and "
                f"hparams.json, or one of {', '.join(_FOLDER_FILES)})"
            )
        path = file
    if path.suffix not in _SUFFIXES and not path.name.endswith(SHARD_INDEX):
        raise CheckpointError(
            f"{path}: unknown weights format (expected a folder or a {', '.join(_SUFFIXES)} file)"
        )
    return _load_file(path, device, dtype, strict)


def _load_openai(folder: Path, prefix: Path | None, device: torch.device | str,
                 dtype: torch.dtype | str | None) -> GPTModel:
    source, cfg = open_openai(folder, prefix)
    # Only extra layers are refused: fine-tuned TF checkpoints carry optimizer slots.
    _refuse_extra_layers(source, cfg, "model/h", "/")
    return assemble(cfg, openai_tensors(source, cfg), source.path, device, dtype, tie=True)


def _refuse_extra_layers(source: TensorSource, cfg: GPTConfig, prefix: str, sep: str) -> None:
    """A file with more blocks than its config says is another model (a config.json of a
    smaller model beside it): dropping the rest would load something else silently."""
    layers = count_layers(source.names(), prefix, sep)
    if layers > cfg.n_layers:
        raise source.error(f"holds {layers} layers, but its config says n_layers "
                           f"{cfg.n_layers}: the config belongs to another model")


def _load_file(
    path: Path, device: torch.device | str, dtype: torch.dtype | str | None, strict: bool
) -> GPTModel:
    source = open_file(path)
    config_path = path.parent / "config.json"
    prefix = hf_prefix(source)
    if prefix is not None:
        cfg = hf_config(source, config_path)
        _refuse_extra_layers(source, cfg, f"{prefix}h.", ".")
        # A generator, so each tensor's map is released once it has been converted.
        tensors = hf_tensors(source, cfg, prefix)
        head = hf_lm_head(source, prefix)
        if head is not None:
            tensors = itertools.chain(tensors, [("out_head.weight", head)])
        model = assemble(cfg, tensors, path, device, dtype, tie=head is None)
        extra = [n for n in source.names() if n not in source.used and not n.endswith(_HF_MASKS)]
        if strict and extra:  # e.g. a classifier's score.weight: not GPT2LMHeadModel's file
            raise CheckpointError(f"{path}: unexpected tensor {extra[0]} ({len(extra)} in all; "
                                  "strict=False ignores extra tensors)")
        return model
    if is_book_layout(source):
        cfg = book_config(source, config_path)
        _refuse_extra_layers(source, cfg, "trf_blocks.", ".")
        tie = book_tied(source)
        expected = expected_shapes(meta_model(cfg))
        if tie:
            expected.pop("out_head.weight")
        extra = book_extra(source, expected)
        if strict and extra and not (tie and extra == ["out_head.weight"]):
            raise CheckpointError(f"{path}: unexpected tensor {extra[0]} ({len(extra)} in all)")
        return assemble(cfg, book_tensors(source, expected), path, device, dtype, tie=tie)
    names = source.names()
    raise CheckpointError(
        f"{path}: not GPT-2 weights in a known layout (no wte.weight or tok_emb.weight; "
        f"first tensor: {names[0] if names else 'none'})"
    )
