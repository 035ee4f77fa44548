"""State dicts in the book's own layout (``tok_emb.weight``, ``trf_blocks.0.att.W_query``...).

This covers the book's published ``gpt2-small-124M.pth`` and anything saved with
``torch.save(model.state_dict())`` or safetensors. The book's ``att.mask`` buffers are
dropped. The config comes from a ``config.json`` beside the file (GPTConfig keys, as
``GPTConfig.to_dict`` writes them, or Hugging Face's GPT-2 keys) or, for the GPT-2 widths,
from the tensor shapes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from diygpt.config import GPTConfig
from diygpt.errors import CheckpointError, ConfigError
from diygpt.pretrained.gpt2_layout import count_layers, infer_gpt2_config
from diygpt.pretrained.source import TensorSource


def is_book_layout(source: TensorSource) -> bool:
    return "tok_emb.weight" in source


def book_config(source: TensorSource, config_path: Path) -> GPTConfig:
    """``config.json`` beside the file, else a diygpt run folder's ``state.json``, else the
    tensor shapes (GPT-2's four widths only)."""
    run_state = config_path.with_name("state.json")
    if not config_path.is_file() and run_state.is_file():
        config_path = run_state
    if config_path.is_file():
        try:
            data = json.loads(config_path.read_text())
            if config_path is run_state:
                data = data["config"]
            elif isinstance(data, dict) and "n_embd" in data:
                # Hugging Face's config.json (a download folder holding both formats): its
                # shape, and the file's own qkv biases
                from diygpt.pretrained.hf import hf_json_config

                qkv_bias = "trf_blocks.0.att.W_query.bias" in source
                return hf_json_config(config_path).with_updates(qkv_bias=qkv_bias)
            return GPTConfig.from_dict(data).with_updates(drop_rate=0.0)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
        except (ConfigError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{config_path}: not a diygpt config ({exc})") from None
    vocab, d = source.shape("tok_emb.weight")
    if "pos_emb.weight" not in source:
        raise source.error("tensor pos_emb.weight is missing")
    context = source.shape("pos_emb.weight")[0]
    n_layers = count_layers(source.names(), "trf_blocks.", ".")
    qkv_bias = "trf_blocks.0.att.W_query.bias" in source
    return infer_gpt2_config(source, vocab, context, d, n_layers, qkv_bias)


def book_tensors(
    source: TensorSource, expected: dict[str, tuple[int, ...]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every expected tensor by its own name; extra tensors are reported by the caller."""
    for name, shape in expected.items():
        yield name, source.get(name, shape)


def book_tied(source: TensorSource) -> bool:
    """True when the file stores tok_emb and out_head as one shared tensor."""
    if "out_head.weight" not in source:
        return False
    a, b = source.get("tok_emb.weight"), source.get("out_head.weight")
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def book_extra(source: TensorSource, expected: dict[str, tuple[int, ...]]) -> list[str]:
    return [n for n in source.names() if n not in expected and not n.endswith("att.mask")]
