"""OpenAI's GPT-2 tensor layout, shared by its TF release and Hugging Face's files.

Both store the same tensors under different spellings (``model/h0/attn/c_attn/w`` versus
``h.0.attn.c_attn.weight``) and OpenAI adds a leading 1 to every Conv1D weight. Conv1D
weights are ``[in, out]`` while ``nn.Linear`` wants ``[out, in]``, so they are transposed,
and the fused ``c_attn`` is split into the book's separate query, key and value layers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from diygpt.config import GPTConfig
from diygpt.errors import CheckpointError, ConfigError
from diygpt.pretrained.source import TensorSource

# (OpenAI's part name, book's parameter name, Conv1D weight to transpose?)
_BLOCK_PARTS = (
    ("ln_1/g", "norm1.scale", False),
    ("ln_1/b", "norm1.shift", False),
    ("attn/c_proj/w", "att.out_proj.weight", True),
    ("attn/c_proj/b", "att.out_proj.bias", False),
    ("ln_2/g", "norm2.scale", False),
    ("ln_2/b", "norm2.shift", False),
    ("mlp/c_fc/w", "ff.layers.0.weight", True),
    ("mlp/c_fc/b", "ff.layers.0.bias", False),
    ("mlp/c_proj/w", "ff.layers.2.weight", True),
    ("mlp/c_proj/b", "ff.layers.2.bias", False),
)
_QKV = ("W_query", "W_key", "W_value")

# emb_dim -> n_heads of the four released GPT-2 sizes, for files that carry no config.
GPT2_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}

BlockName = Callable[[int, str], str]


def gpt2_tensors(
    source: TensorSource,
    cfg: GPTConfig,
    top: dict[str, str],
    block_name: BlockName,
    conv_lead_dim: bool,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (book name, tensor view) for every model tensor except ``out_head``.

    ``top`` maps ``wte``, ``wpe``, ``ln_f/g`` and ``ln_f/b`` to the file's names;
    ``block_name(i, part)`` spells block ``i``'s part (OpenAI spelling) as the file does.
    """
    d, ffn = cfg.emb_dim, 4 * cfg.emb_dim
    lead = (1,) if conv_lead_dim else ()

    def conv_weight(name: str, d_in: int, d_out: int) -> torch.Tensor:
        w = source.get(name, lead + (d_in, d_out))
        return (w[0] if conv_lead_dim else w).T  # [in, out] -> [out, in]

    yield "tok_emb.weight", source.get(top["wte"], (cfg.vocab_size, d))
    yield "pos_emb.weight", source.get(top["wpe"], (cfg.context_length, d))
    shapes = {"attn/c_proj/w": (d, d), "mlp/c_fc/w": (d, ffn), "mlp/c_proj/w": (ffn, d)}
    bias = {"attn/c_proj/b": d, "mlp/c_fc/b": ffn, "mlp/c_proj/b": d}
    for i in range(cfg.n_layers):
        prefix = f"trf_blocks.{i}."
        qkv_w = conv_weight(block_name(i, "attn/c_attn/w"), d, 3 * d)  # [3d, d]
        qkv_b = source.get(block_name(i, "attn/c_attn/b"), (3 * d,))
        for j, part in enumerate(_QKV):
            yield f"{prefix}att.{part}.weight", qkv_w[j * d : (j + 1) * d]
            yield f"{prefix}att.{part}.bias", qkv_b[j * d : (j + 1) * d]
        for part, book, is_conv in _BLOCK_PARTS:
            name = block_name(i, part)
            if is_conv:
                yield prefix + book, conv_weight(name, *shapes[part])
            else:
                yield prefix + book, source.get(name, (bias.get(part, d),))
    yield "final_norm.scale", source.get(top["ln_f/g"], (d,))
    yield "final_norm.shift", source.get(top["ln_f/b"], (d,))


def count_layers(names: list[str], prefix: str, sep: str) -> int:
    """Number of blocks, from names like ``{prefix}{i}{sep}...``."""
    layers = set()
    for name in names:
        if name.startswith(prefix):
            head = name[len(prefix) :].split(sep, 1)[0]
            if head.isdigit():
                layers.add(int(head))
    return max(layers) + 1 if layers else 0


def infer_gpt2_config(
    source: TensorSource, vocab: int, context: int, emb_dim: int, n_layers: int, qkv_bias: bool
) -> GPTConfig:
    """A GPTConfig from tensor shapes alone; only the four GPT-2 widths fix n_heads."""
    heads = GPT2_HEADS.get(emb_dim)
    if heads is None:
        raise CheckpointError(
            f"{source.path}: cannot tell n_heads for emb_dim {emb_dim}; "
            "put a config.json next to the weights"
        )
    return _gpt2_config(vocab, context, emb_dim, heads, n_layers, qkv_bias=qkv_bias)


def _gpt2_config(*sizes: int, qkv_bias: bool = True) -> GPTConfig:
    vocab, context, emb_dim, heads, n_layers = sizes
    return GPTConfig(
        vocab_size=vocab,
        context_length=context,
        emb_dim=emb_dim,
        n_heads=heads,
        n_layers=n_layers,
        drop_rate=0.0,  # inference: no dropout
        qkv_bias=qkv_bias,
    )


def config_from_json(
    path: Path,
    keys: tuple[str, str, str, str, str],
    fixed: Mapping[str, tuple[object, ...]] | None = None,
) -> GPTConfig:
    """GPT-2 config from a JSON file; ``keys`` name vocab, context, width, heads, layers.

    GPT-2 always has qkv biases, so qkv_bias is True. A key of ``fixed`` present in the
    file must hold one of its allowed values (the first is named in the error).
    """
    try:
        data = json.loads(Path(path).read_text())
        cfg = _gpt2_config(*(data[k] for k in keys))
        for key, allowed in (fixed or {}).items():
            if key in data and data[key] not in allowed:
                raise CheckpointError(
                    f"{path}: {key} {data[key]!r} is not GPT-2's ({allowed[0]!r}); "
                    "diygpt's model computes GPT-2's architecture only"
                )
        return cfg
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except KeyError as exc:
        raise CheckpointError(f"{path}: not a GPT-2 config file (missing {exc})") from None
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a GPT-2 config file ({exc})") from None
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
