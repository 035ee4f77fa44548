"""Hugging Face's GPT-2 files (openai-community/gpt2*): safetensors or pytorch_model.bin.

Keys come with the ``transformer.`` prefix (saved from ``GPT2LMHeadModel``) or without it
(saved from ``GPT2Model``, as the hub's own files are). The causal-mask buffers some
versions store (``attn.bias``, ``attn.masked_bias``) are ignored.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from diygpt.config import GPTConfig
from diygpt.pretrained.gpt2_layout import (
    config_from_json,
    count_layers,
    gpt2_tensors,
    infer_gpt2_config,
)
from diygpt.pretrained.source import TensorSource

_SUFFIX = {"w": "weight", "g": "weight", "b": "bias"}


def hf_prefix(source: TensorSource) -> str | None:
    """``"transformer."`` or ``""`` when the keys look like GPT-2's, else None."""
    for prefix in ("transformer.", ""):
        if f"{prefix}wte.weight" in source:
            return prefix
    return None


def hf_tensors(
    source: TensorSource, cfg: GPTConfig, prefix: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Book-named tensors; ``out_head`` is handled by :func:`hf_lm_head`."""
    top = {
        "wte": f"{prefix}wte.weight",
        "wpe": f"{prefix}wpe.weight",
        "ln_f/g": f"{prefix}ln_f.weight",
        "ln_f/b": f"{prefix}ln_f.bias",
    }

    def block_name(i: int, part: str) -> str:
        *path, last = part.split("/")
        return f"{prefix}h.{i}." + ".".join([*path, _SUFFIX[last]])

    return gpt2_tensors(source, cfg, top, block_name, conv_lead_dim=False)


def hf_lm_head(source: TensorSource, prefix: str) -> torch.Tensor | None:
    """A separate output head, or None when it is absent or equal to wte (then tie)."""
    if "lm_head.weight" not in source:
        return None
    wte = source.get(f"{prefix}wte.weight")
    head = source.get("lm_head.weight", tuple(wte.shape))
    return None if torch.equal(head, wte) else head


# config.json fields that change GPT-2's arithmetic, and the values the book's model has
# (both tanh GELUs are the book's formula). Another value would load weights into a model
# that computes something else.
_GPT2_ARITHMETIC = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "layer_norm_epsilon": (1e-5,),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "reorder_and_upcast_attn": (False,),
}


def hf_json_config(config_path: Path) -> GPTConfig:
    """GPT-2's shape from a Hugging Face ``config.json``."""
    keys = ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer")
    return config_from_json(config_path, keys, _GPT2_ARITHMETIC)


def hf_config(source: TensorSource, config_path: Path) -> GPTConfig:
    """From ``config.json`` when present, else inferred from the tensor shapes."""
    if config_path.is_file():
        return hf_json_config(config_path)
    prefix = hf_prefix(source) or ""
    if f"{prefix}wpe.weight" not in source:  # e.g. a model with rotary positions, not GPT-2
        raise source.error(f"tensor {prefix}wpe.weight is missing, and no config.json is "
                           "beside it: not GPT-2's layout")
    vocab, d = source.shape(f"{prefix}wte.weight")
    context = source.shape(f"{prefix}wpe.weight")[0]
    n_layers = count_layers(source.names(), f"{prefix}h.", ".")
    return infer_gpt2_config(source, vocab, context, d, n_layers, qkv_bias=True)
