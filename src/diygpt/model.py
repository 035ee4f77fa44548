"""The GPT-2 model of the book's chapter 4, readable top to bottom.

Parameter names and construction order are the book's (``tok_emb``, ``pos_emb``,
``trf_blocks.{i}.att.W_query`` ...), so a book ``model.pth`` loads without a key map and a
seeded model starts from the same weights as the book's. Shapes: B batch, T tokens,
C = emb_dim, H heads, D = C // H.

The model knows nothing of distribution, compilation or checkpoint files: those wrap it
from outside. The only extra is an optional preallocated KV cache for fast generation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diygpt.config import GPTConfig, as_config


class KVCache:
    """Preallocated keys and values for every layer, filled as generation proceeds.

    ``pos`` is the number of positions already written; the model advances it.
    """

    def __init__(
        self,
        cfg: GPTConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        max_len = cfg.context_length if max_len is None else min(max_len, cfg.context_length)
        shape = (batch_size, cfg.n_heads, max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def check_fits(self, batch_size: int, end: int) -> None:
        """One clear line, not a slice assignment's shape error, for a cache that is too
        small or was made for another batch size."""
        if batch_size != self.keys[0].shape[0]:
            raise ValueError(f"a batch of {batch_size} does not match the KV cache's "
                             f"{self.keys[0].shape[0]} rows; make a KVCache for this batch")
        if end > self.max_len:
            raise ValueError(f"{end} positions do not fit the KV cache's {self.max_len}; make a "
                             "larger KVCache, or reset() it")

    def update(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, D) at [start, start+T) and return all keys/values so far."""
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class MultiHeadAttention(nn.Module):
    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        attn_impl: str = "sdpa",
    ) -> None:
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.context_length = context_length
        self.attn_impl = attn_impl
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # Query, key and value from one (C -> 3C) product: set by diygpt.speed.fuse_qkv.
        self.fused_qkv = False
        # The book registers its causal mask as a persistent buffer; we build it on the fly
        # (no context_length^2 memory per layer), so drop it from incoming book state dicts.
        self.register_load_state_dict_pre_hook(_drop_book_mask)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, C)
        queries, keys, values = self._project_qkv(x)  # (B, H, T, D) each

        start = 0
        if cache is not None:
            start = cache.pos
            keys, values = cache.update(layer, start, keys, values)  # (B, H, start+T, D)

        if self.attn_impl == "eager":
            context = self._eager(queries, keys, values, start)
        else:
            context = self._sdpa(queries, keys, values, start)
        context = context.transpose(1, 2).contiguous().view(b, t, self.d_out)  # (B, T, C)
        return self.out_proj(context)

    def _project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        split = (b, t, self.num_heads, self.head_dim)
        if not self.fused_qkv:  # (B, T, C) -> (B, T, H, D) -> (B, H, T, D)
            # Keys first, as the book does: autograd sums the three products' input
            # gradients in reverse creation order, so this order makes them the book's bits.
            keys, queries, values = (lin(x).view(split).transpose(1, 2)
                                     for lin in (self.W_key, self.W_query, self.W_value))
            return queries, keys, values
        # One larger product keeps a GPU's matmul units busier than three small ones, in
        # backward too; the stacked weights are rebuilt each call, so the book's three
        # parameters stay what is trained and saved.
        qkv = F.linear(x, *self.stacked_qkv()).view(b, t, 3, self.num_heads, self.head_dim)
        return tuple(qkv.permute(2, 0, 3, 1, 4).unbind(0))  # 3 x (B, H, T, D)

    def stacked_qkv(
        self, out: tuple[torch.Tensor, torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The query, key and value weights stacked (3C, C), and biases (3C,) or None.

        Written into ``out`` when given (which autograd does not allow: call it no_grad).
        """
        lins = (self.W_query, self.W_key, self.W_value)
        w_out, bias_out = out or (None, None)
        weight = torch.cat([lin.weight for lin in lins], out=w_out)
        if self.W_query.bias is None:
            return weight, None
        return weight, torch.cat([lin.bias for lin in lins], out=bias_out)

    def _eager(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> torch.Tensor:
        """The book's attention, op for op, so results and dropout draws match it exactly."""
        mask = future_mask(q.shape[2], k.shape[2], start, q.device)
        attn_weights = torch.softmax(attention_scores(q, k, mask), dim=-1)
        attn_weights = self.dropout(attn_weights)
        return attn_weights @ v  # (B, H, T, D)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        t_q, t_k = q.shape[2], k.shape[2]
        dropout_p = self.dropout.p if self.training else 0.0
        if start == 0:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        if t_q == 1:  # one new token attends to everything cached
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(start)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)


def future_mask(t_q: int, t_k: int, start: int, device: torch.device) -> torch.Tensor:
    """(T_q, T_k) True where query ``start + i`` would see a later key: the book's mask."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).triu(start + 1)


def attention_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The book's scaled, causally masked scores (B, H, T, start+T), before the softmax."""
    attn_scores = q @ k.transpose(2, 3)
    attn_scores.masked_fill_(mask, -torch.inf)
    return attn_scores / k.shape[-1] ** 0.5


def _drop_book_mask(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    state_dict.pop(prefix + "mask", None)


class LayerNorm(nn.Module):
    def __init__(self, emb_dim: int) -> None:
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


# sqrt(2/pi) rounded as the book computes it (a float32 sqrt), so activations match bit for bit.
_SQRT_2_OVER_PI = float(torch.sqrt(torch.tensor(2.0 / math.pi)))


class GELU(nn.Module):
    """GELU with the tanh approximation, as GPT-2 was trained."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3))))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig | Mapping[str, Any] | str) -> None:
        super().__init__()
        cfg = as_config(cfg)  # chapter 4 builds the blocks from the book's dict too
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),  # (B, T, C) -> (B, T, 4C)
            GELU(),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),  # (B, T, 4C) -> (B, T, C)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig | Mapping[str, Any] | str) -> None:
        super().__init__()
        cfg = as_config(cfg)
        self.att = MultiHeadAttention(
            d_in=cfg.emb_dim,
            d_out=cfg.emb_dim,
            context_length=cfg.context_length,
            num_heads=cfg.n_heads,
            dropout=cfg.drop_rate,
            qkv_bias=cfg.qkv_bias,
            attn_impl=cfg.attn_impl,
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        # Pre-LayerNorm residual blocks: x + drop(att(norm1(x))), then x + drop(ff(norm2(x))).
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache, layer))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """The book's GPT-2: token and position embeddings, ``n_layers`` pre-LayerNorm
    transformer blocks, a final LayerNorm and an output head, under the book's names.

    ``cfg`` is the book's dict (``GPT_CONFIG_124M``), a :class:`GPTConfig` or a preset name
    (``"book-124m"``, ``"gpt2-small"``...). Unlike the book it registers no causal-mask
    buffer (the mask is built per call), so its state dict is the book's minus ``att.mask``;
    a book state dict with the masks still loads.
    """

    def __init__(self, cfg: GPTConfig | Mapping[str, Any] | str) -> None:
        super().__init__()
        cfg = as_config(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)

    @property
    def context_length(self) -> int:
        return self.pos_emb.weight.shape[0]

    def forward(
        self, in_idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab), or (B, 1, vocab) with ``last_only``.

        With a cache, ``in_idx`` holds only the new tokens, placed at ``cache.pos``.
        """
        if in_idx.dim() != 2:  # a reader's (T,) ids without the batch dimension
            raise ValueError(f"token ids must be (batch, tokens), got shape {tuple(in_idx.shape)}; "
                             "add the batch dimension with .unsqueeze(0)")
        b, t = in_idx.shape
        start = cache.pos if cache is not None else 0
        if start + t > self.context_length:
            raise ValueError(
                f"sequence of {start + t} tokens exceeds the context length {self.context_length}"
            )
        if cache is not None:
            cache.check_fits(b, start + t)
        positions = torch.arange(start, start + t, device=in_idx.device)
        x = self.tok_emb(in_idx) + self.pos_emb(positions)  # (B, T, C)
        x = self.drop_emb(x)
        for i, block in enumerate(self.trf_blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.pos = start + t
        if last_only:
            x = x[:, -1:, :]
        x = self.final_norm(x)
        return self.out_head(x)  # (B, T, vocab)

    def set_attn_impl(self, attn_impl: str) -> None:
        """Switch attention kernels in place; weights are unaffected."""
        self.cfg = self.cfg.with_updates(attn_impl=attn_impl)
        for block in self.trf_blocks:
            block.att.attn_impl = attn_impl

    def num_parameters(self, exclude_out_head: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}  # count a tied tensor once
        total = sum(p.numel() for p in params.values())
        if exclude_out_head and id(self.out_head.weight) != id(self.tok_emb.weight):
            total -= self.out_head.weight.numel()
        return total
