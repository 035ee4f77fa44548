"""Greedy decoding with a static KV cache, so the decode step can be compiled or CUDA-graphed.

``stream_generate`` slices its cache to the tokens so far, so every step has new shapes.
Here each step has the same shapes (gpt-fast's recipe): the cache is the full window, the
new token's position is a tensor, and attention masks out the unwritten slots. With
``compile=True`` the one-token step runs through ``torch.compile(mode="reduce-overhead")``,
which on CUDA replays it as a CUDA graph: no Python or kernel-launch cost per layer.

It reads the GPTModel's own modules (no copy, no change to the model) and gives the same
greedy tokens as :func:`diygpt.generation.generate` while the text fits the window.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from diygpt.errors import GenerationError


class StaticCache(nn.Module):
    """Keys and values (layers, B, H, max_len, D), written in place at tensor positions."""

    def __init__(self, model: nn.Module, batch_size: int, max_len: int) -> None:
        super().__init__()
        cfg, p = model.cfg, next(model.parameters())
        shape = (cfg.n_layers, batch_size, cfg.n_heads, max_len, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=p.device, dtype=p.dtype))
        self.register_buffer("v", torch.zeros(shape, device=p.device, dtype=p.dtype))
        causal = torch.ones(max_len, max_len, dtype=torch.bool, device=p.device).tril()
        self.register_buffer("causal", causal)  # row i: the slots position i may attend to


def _attend(att: nn.Module, x: torch.Tensor, cache: StaticCache, layer: int,
            pos: torch.Tensor) -> torch.Tensor:
    b, t, _ = x.shape  # (B, T, C); pos (T,) holds the absolute positions of the T tokens
    h, d = att.num_heads, att.head_dim
    q = att.W_query(x).view(b, t, h, d).transpose(1, 2)  # (B, H, T, D)
    k = att.W_key(x).view(b, t, h, d).transpose(1, 2)
    v = att.W_value(x).view(b, t, h, d).transpose(1, 2)
    cache.k[layer].index_copy_(2, pos, k)
    cache.v[layer].index_copy_(2, pos, v)
    mask = cache.causal[pos]  # (T, max_len): fixed shape whatever the position
    out = F.scaled_dot_product_attention(q, cache.k[layer], cache.v[layer], attn_mask=mask)
    return att.out_proj(out.transpose(1, 2).reshape(b, t, h * d))


def static_forward(model: nn.Module, idx: torch.Tensor, pos: torch.Tensor,
                   cache: StaticCache) -> torch.Tensor:
    """Logits (B, V) of the last token of ``idx`` (B, T) placed at positions ``pos`` (T,)."""
    x = model.tok_emb(idx) + model.pos_emb(pos)  # (B, T, C)
    for i, block in enumerate(model.trf_blocks):
        x = x + _attend(block.att, block.norm1(x), cache, i, pos)
        x = x + block.ff(block.norm2(x))
    return model.out_head(model.final_norm(x[:, -1]))  # (B, V)


def decode_step_fn(compile: bool) -> Callable[..., torch.Tensor]:
    if not compile:
        return static_forward
    return torch.compile(static_forward, mode="reduce-overhead", fullgraph=True)


@torch.no_grad()
def static_generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int,
                    compile: bool = False) -> torch.Tensor:
    """Greedy continuation of ``idx`` (B, T) -> (B, T + max_new_tokens), in eval mode.

    The prompt is read in one (uncompiled) pass; each new token then costs one
    fixed-shape step. The whole text must fit the model's context window.
    """
    model.eval()
    b, t = idx.shape
    total = t + max_new_tokens
    if t == 0 or total > model.context_length:
        raise GenerationError(
            f"static decoding needs 1 to {model.context_length} tokens in all, got {total}"
        )
    device = next(model.parameters()).device
    idx = idx.to(device)
    cache = StaticCache(model, b, model.context_length)
    step = decode_step_fn(compile)
    out = torch.empty(b, total, dtype=idx.dtype, device=device)
    out[:, :t] = idx
    logits = static_forward(model, idx, torch.arange(t, device=device), cache)
    for i in range(t, total):
        out[:, i] = logits.argmax(-1)
        if i + 1 < total:
            pos = torch.tensor([i], device=device)
            logits = step(model, out[:, i : i + 1], pos, cache).clone()
    return out
