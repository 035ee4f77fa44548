"""Fixed-shape decoding with a static KV cache, so the one-token step can be compiled.

``KVCache`` in the model grows its view of the cache every step, so every step has new
shapes. Here each step has the same shapes (gpt-fast's recipe): the cache is a fixed
window, the new token's position is a tensor, and attention masks out the unwritten
slots. ``torch.compile`` then turns the whole step into one program:

- on CUDA with ``mode="reduce-overhead"``, replayed as a CUDA graph (no Python or
  kernel-launch cost per layer);
- on CPU, with inductor's mm decomposition widened to every one-row product, so each
  ``x @ W.T`` becomes a vectorised, multi-threaded reduction streaming ``W`` once (about
  twice the bandwidth of the BLAS gemv for batch 1), fused with the LayerNorm, GELU and
  int8 dequantisation around it.

It reads the GPTModel's own modules (no change to the model). On CUDA four more things
cut the time a token takes (measured in BENCHMARKS.md):

- the cache is kept per model and shape and reused by the next call (zeroed): a CUDA graph
  holds its inputs' addresses, so a new cache each call made every call record a new graph
  (and keep the old ones);
- the cache holds each layer's query, key and value weights side by side, copied from the
  model at each call, so a step runs one matrix-vector product for them instead of three;
- attention is written out as two products and a softmax: SDPA with a mask runs one
  query through its memory-efficient kernel, the slowest part of the step;
- a short prompt is read through the compiled step a token at a time, which on a GPU beats
  one eager pass over the prompt (hundreds of kernel launches from Python).

The compiled step sums in a different order than eager PyTorch, so its logits differ in
the last bits; greedy tokens equal :func:`diygpt.generation.generate`'s unless two logits
nearly tie.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from diygpt.errors import GenerationError
from diygpt.speed import can_fuse_qkv

# Inductor's pass rewrites mm/addmm as multiply + sum when the left side has one row and
# the other sizes are under this bound (its CPU default is 2048, which leaves out the
# 50257-wide output head and GPT-2 large/xl's layers).
_CPU_MM_BOUND = 1 << 20
_CPU_DECOMPOSE_MM = {"decompose_mm_pass": {"cpu_max_other_dimension_decomposition": _CPU_MM_BOUND}}


def _widen_cpu_mm_decomposition() -> None:
    # The pass copies its bound from the config once, when inductor first imports it, so
    # the compile option alone does not reach it if inductor was imported before.
    try:
        from torch._inductor.fx_passes import decompose_mem_bound_mm as mm_pass
    except ImportError:  # another torch layout: the option above still applies
        return
    bound = getattr(mm_pass, "cpu_max_other_dimension_decomposition", _CPU_MM_BOUND)
    mm_pass.cpu_max_other_dimension_decomposition = max(bound, _CPU_MM_BOUND)


# The CUDA speed-ups above, as settings (bench/generate_speed.py turns them off to compare).
POOL_CACHES = True  # reuse a model's cache across calls
FUSE_QKV = True  # one product for query, key and value
PLAIN_ATTENTION = True  # attention written out, not SDPA's kernel for one query
STEP_PROMPT = 16  # prompts up to this many tokens go through the compiled step


class StaticCache:
    """Keys and values per layer, each (B, H, max_len, D), written in place at tensor positions.

    With ``fuse_qkv`` it also holds each layer's query, key and value weights stacked into
    one (3C, C) matrix (and biases), refreshed from the model by :meth:`reset`.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_len: int,
                 fuse_qkv: bool = False, plain_attention: bool = False) -> None:
        cfg, p = model.cfg, next(model.parameters())
        shape = (batch_size, cfg.n_heads, max_len, cfg.head_dim)
        # One tensor per layer: a compiled step then writes one slot in place, where a
        # slice of a single (layers, ...) buffer makes it copy the whole buffer each step.
        self.k = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(cfg.n_layers)]
        # Row i: the slots position i may attend to.
        self.causal = torch.ones(max_len, max_len, dtype=torch.bool, device=p.device).tril()
        self.max_len = max_len
        self.qkv = [_stacked_qkv(b.att) for b in model.trf_blocks] if fuse_qkv else None
        self.plain_attention = plain_attention
        self.user: weakref.ref | None = None  # the decoder using a pooled cache
        if p.device.type == "cuda":
            # A CUDA graph keeps these addresses: without the mark, inductor skips CUDA graphs
            # for a step that writes its inputs in place (and copies the mask in each replay).
            # guard=False: a new cache (another shape or model) reuses the compiled step.
            stacked = [t for wb in self.qkv or () for t in wb if t is not None]
            for t in (*self.k, *self.v, self.causal, *stacked):
                torch._dynamo.mark_static_address(t, guard=False)

    @property
    def busy(self) -> bool:
        return self.user is not None and self.user() is not None

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Empty the keys and values; copy the model's current q/k/v weights in again."""
        for t in (*self.k, *self.v):
            t.zero_()
        for stacked, block in zip(self.qkv or (), model.trf_blocks, strict=False):
            _stacked_qkv(block.att, out=stacked)


@torch.no_grad()
def _stacked_qkv(att: nn.Module, out: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``att.stacked_qkv`` as a constant of the step (no gradient; into ``out``)."""
    return att.stacked_qkv(out)


# model -> {(batch, max_len, fused, plain attention, device, dtype): cache}; they go with it.
_POOL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def acquire_cache(model: nn.Module, batch_size: int, max_len: int, user: object,
                  pooled: bool = False, fuse_qkv: bool = False,
                  plain_attention: bool = False) -> StaticCache:
    """A cache for ``user``: the model's pooled one when free (zeroed, weights refreshed)."""
    if not pooled:
        return StaticCache(model, batch_size, max_len, fuse_qkv, plain_attention)
    p = next(model.parameters())
    key = (batch_size, max_len, fuse_qkv, plain_attention, p.device, p.dtype)
    caches = _POOL.setdefault(model, {})
    cache = caches.get(key)
    if cache is None or cache.busy:  # another generation still holds it: a fresh one
        cache = StaticCache(model, batch_size, max_len, fuse_qkv, plain_attention)
        caches.setdefault(key, cache)
    else:
        cache.reset(model)
    cache.user = weakref.ref(user)
    return cache


def _attend(att: nn.Module, x: torch.Tensor, cache: StaticCache, layer: int,
            pos: torch.Tensor) -> torch.Tensor:
    b, t, _ = x.shape  # (B, T, C); pos (T,) holds the absolute positions of the T tokens
    h, d = att.num_heads, att.head_dim
    if cache.qkv is not None:
        q, k, v = F.linear(x, *cache.qkv[layer]).split(h * d, dim=-1)  # 3 x (B, T, C)
    else:
        q, k, v = att.W_query(x), att.W_key(x), att.W_value(x)
    q = q.view(b, t, h, d).transpose(1, 2)  # (B, H, T, D)
    k = k.view(b, t, h, d).transpose(1, 2)
    v = v.view(b, t, h, d).transpose(1, 2)
    cache.k[layer].index_copy_(2, pos, k)
    cache.v[layer].index_copy_(2, pos, v)
    mask = cache.causal[pos]  # (T, max_len): fixed shape whatever the position
    if cache.plain_attention:
        out = _plain_attention(q, cache.k[layer], cache.v[layer], mask)
    else:
        out = F.scaled_dot_product_attention(q, cache.k[layer], cache.v[layer], attn_mask=mask)
    return att.out_proj(out.transpose(1, 2).reshape(b, t, h * d))


def _plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention of q (B, H, T, D) over the whole cache k, v (B, H, L, D).

    On CUDA, SDPA with a mask sends one query to the memory-efficient kernel, which took
    33 us a layer on an H200 (half the step); written out, inductor makes a few small
    kernels of it.
    """
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, L)
    scores = scores.float().masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v  # (B, H, T, D)


def static_forward(model: nn.Module, idx: torch.Tensor, pos: torch.Tensor,
                   cache: StaticCache) -> torch.Tensor:
    """Logits (B, V) of the last token of ``idx`` (B, T) placed at positions ``pos`` (T,)."""
    x = model.tok_emb(idx) + model.pos_emb(pos)  # (B, T, C)
    for i, block in enumerate(model.trf_blocks):
        x = x + _attend(block.att, block.norm1(x), cache, i, pos)
        x = x + block.ff(block.norm2(x))
    return model.out_head(model.final_norm(x[:, -1]))  # (B, V)


_PAST_RECOMPILE_LIMIT: set[str] = set()  # device types whose compiled step hit the limit


@functools.cache
def compiled_step(device_type: str) -> Callable[..., torch.Tensor]:
    """``static_forward`` compiled for one-token steps on this kind of device (made once)."""
    if device_type == "cuda":
        return torch.compile(static_forward, mode="reduce-overhead", fullgraph=True)
    _widen_cpu_mm_decomposition()
    return torch.compile(static_forward, fullgraph=True, dynamic=False,
                         options={"post_grad_fusion_options": _CPU_DECOMPOSE_MM})


class StaticDecoder:
    """Prefill once, then one fixed-shape (optionally compiled) step per new token."""

    def __init__(self, model: nn.Module, batch_size: int, max_len: int,
                 compile: bool = True, cuda_tuning: bool | None = None) -> None:
        """``cuda_tuning`` (default: on CUDA) turns on the module's CUDA speed-ups."""
        if not 1 <= max_len <= model.context_length:
            raise GenerationError(
                f"a static cache holds 1 to {model.context_length} tokens, got {max_len}"
            )
        self.model = model
        self.device = next(model.parameters()).device
        tuned = self.device.type == "cuda" if cuda_tuning is None else cuda_tuning
        self.cache = acquire_cache(model, batch_size, max_len, self, pooled=tuned and POOL_CACHES,
                                   fuse_qkv=tuned and FUSE_QKV and can_fuse_qkv(model),
                                   plain_attention=tuned and PLAIN_ATTENTION)
        compile = compile and self.device.type not in _PAST_RECOMPILE_LIMIT
        self.step_prompt = STEP_PROMPT if tuned and compile else 0
        self.step_fn = compiled_step(self.device.type) if compile else static_forward
        self.pos = 0
        # The position as a device tensor, refilled each step: a new tensor from a Python int
        # would be a host-to-device copy, which waits for the GPU to finish the last step.
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)

    @property
    def full(self) -> bool:
        return self.pos >= self.cache.max_len

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Read the prompt (B, T) from position 0 -> logits (B, V).

        In one uncompiled pass (its shape varies), or, for a short prompt with the CUDA
        tuning, a token at a time through the step.
        """
        t = idx.shape[1]
        if t > self.cache.max_len:
            raise GenerationError(f"a prompt of {t} tokens does not fit the {self.cache.max_len}-slot cache")
        if t <= self.step_prompt:
            for i in range(t):
                logits = self.step(idx[:, i : i + 1])
            return logits
        logits = static_forward(self.model, idx, torch.arange(t, device=self.device), self.cache)
        self.pos = t
        return logits

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one new token per row (B, 1) -> logits (B, V) for the token after it."""
        if self.full:
            raise GenerationError("the static cache is full")
        pos = self._pos.fill_(self.pos)
        # Dense strides: a column sliced from the growing text has a new stride each step,
        # which would make torch.compile recompile.
        token = token.clone(memory_format=torch.contiguous_format)
        try:
            logits = self.step_fn(self.model, token, pos, self.cache)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            # One compiled step serves the whole process, and each new (batch, cache length)
            # is a recompile: past torch's limit (8 shapes), dynamo refuses before the step
            # has run, so this step and every later one in the process run uncompiled.
            _PAST_RECOMPILE_LIMIT.add(self.device.type)
            warnings.warn("diygpt: the compiled decode step met torch.compile's recompile "
                          "limit (a new batch size or length each time); from here this "
                          "process decodes uncompiled", stacklevel=2)
            self.step_fn = static_forward
            logits = static_forward(self.model, token, pos, self.cache)
        self.pos += 1
        return logits.clone()  # a CUDA-graph replay reuses its output buffer on the next step


@torch.no_grad()
def static_generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int,
                    compile: bool = False) -> torch.Tensor:
    """Greedy continuation of ``idx`` (B, T) -> (B, T + max_new_tokens), in eval mode.

    The whole text must fit the model's context window. (``generate(..., compile=True)``
    checks its arguments and goes on past the window.)
    """
    if (idx.dim() != 2 or idx.dtype.is_floating_point or idx.dtype.is_complex
            or isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral)
            or max_new_tokens < 0):
        raise GenerationError(f"static decoding takes integer ids (B, T) and max_new_tokens "
                              f">= 0, got {idx.dtype} ids of shape {tuple(idx.shape)} and "
                              f"{max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    b, t = idx.shape
    total = t + max_new_tokens
    if t == 0 or total > model.context_length:
        raise GenerationError(
            f"static decoding needs 1 to {model.context_length} tokens in all, got {total}"
        )
    was_training = model.training
    try:
        return _static_greedy(model.eval(), idx, b, t, total, compile)
    finally:
        model.train(was_training)


def _static_greedy(model: nn.Module, idx: torch.Tensor, b: int, t: int, total: int,
                   compile: bool) -> torch.Tensor:
    decoder = StaticDecoder(model, b, model.context_length, compile)
    idx = idx.to(decoder.device, torch.long)  # the embedding takes no narrower ids
    out = torch.empty(b, total, dtype=idx.dtype, device=decoder.device)
    out[:, :t] = idx
    logits = decoder.prefill(idx)
    for i in range(t, total):
        out[:, i] = logits.argmax(-1)
        if i + 1 < total:
            logits = decoder.step(out[:, i : i + 1])
    return out
