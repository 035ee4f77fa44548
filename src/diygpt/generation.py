"""Text generation: small pure sampling functions, then a streaming loop with a KV cache.

``generate`` keeps the book's semantics and its use of the random generator (one
``torch.multinomial`` draw over the full vocabulary per step), so a seed gives the book's
tokens. Three ways to get each step's logits: the book's (re-read the whole window), the
KV cache (the default: feed only the new token) and a compiled fixed-shape step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator

import torch
from torch import nn

from diygpt.errors import GenerationError
from diygpt.model import GPTModel, KVCache
from diygpt.static_decode import StaticDecoder


def _whole(x: object) -> bool:
    """An integer (numpy's too), or a float equal to one; not a bool, nan or inf."""
    return (not isinstance(x, bool) and isinstance(x, numbers.Real) and math.isfinite(x)
            and int(x) == x)


def check_sampling_args(
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    max_new_tokens: int = 0,
) -> None:
    """Raise GenerationError with one clear line for invalid sampling parameters."""
    if temperature is None or not math.isfinite(temperature) or temperature < 0:
        raise GenerationError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and not (_whole(top_k) and top_k > 0):
        raise GenerationError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not (isinstance(top_p, numbers.Real) and not isinstance(top_p, bool)
                                  and 0.0 < top_p <= 1.0):
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    if not (_whole(max_new_tokens) and max_new_tokens >= 0):
        raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")


def check_prompt(model: nn.Module, idx: torch.Tensor) -> None:
    """A prompt must be a non-empty (B, T) batch of ids inside the model's vocabulary."""
    if idx.dim() != 2:
        raise GenerationError(
            f"the prompt must be a (batch, tokens) tensor, got shape {tuple(idx.shape)}; "
            "text_to_token_ids makes one, or add the batch dimension with idx.unsqueeze(0)"
        )
    if idx.shape[1] == 0:
        raise GenerationError("the prompt is empty: give at least one token")
    if idx.shape[0] == 0:
        raise GenerationError("the prompt batch is empty: give at least one row")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise GenerationError(f"the prompt must hold integer token ids, got {idx.dtype}")
    embedding = getattr(model, "tok_emb", None)  # a reader's own model may name it otherwise
    if not isinstance(embedding, nn.Embedding):
        return
    vocab_size = embedding.num_embeddings
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= vocab_size:
        raise GenerationError(
            f"prompt token id {low if low < 0 else high} is outside the model's vocabulary of "
            f"{vocab_size}"
        )


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the k largest logits per row (B, V); set the rest to -inf (the book's rule)."""
    top_k = min(int(top_k), logits.shape[-1])
    top_logits, _ = torch.topk(logits, top_k)
    min_val = top_logits[:, -1:]  # (B, 1)
    return torch.where(logits < min_val, torch.tensor(float("-inf"), device=logits.device), logits)


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches top_p."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the tokens ranked above it already cover top_p; the first always stays
    # (said outright: a top_p below float32's smallest number compares as 0 >= 0).
    drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


_FLOAT32_MAX = torch.finfo(torch.float32).max


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Last-position logits (B, V) -> next token ids (B, 1)."""
    if top_k is not None:
        logits = apply_top_k(logits, top_k)
    if temperature > 0.0:
        scaled = logits / temperature
        if temperature > _FLOAT32_MAX:  # T is inf in float32: -inf / inf would be NaN
            scaled = scaled.masked_fill(torch.isneginf(logits), float("-inf"))
        # NaN: 0 / T where T is 0 in float32
        overflow = ~torch.isfinite(scaled.amax(dim=-1, keepdim=True))  # (B, 1)
        if bool(overflow.any()):
            # A temperature so small that logits / T overflows means greedy for that row.
            greedy = torch.full_like(scaled, float("-inf"))
            greedy.scatter_(-1, torch.argmax(logits, dim=-1, keepdim=True), 0.0)
            scaled = torch.where(overflow, greedy, scaled)
        logits = scaled
        if top_p is not None and top_p < 1.0:
            logits = apply_top_p(logits, top_p)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator)
    return torch.argmax(logits, dim=-1, keepdim=True)


def _token_ids(idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    # The embedding takes int64 or int32 ids; narrower integer prompts are widened.
    return idx.to(device, None if idx.dtype in (torch.int64, torch.int32) else torch.int64)


def _takes_a_cache(model: nn.Module) -> bool:
    """diygpt's GPTModel, or one compiled from outside; any other model (the reader's own
    chapter-4 model, say) is driven as the book does, re-reading its window every step."""
    inner = getattr(model, "_orig_mod", model)
    # a subclass with its own forward may not take cache= and last_only=
    return isinstance(inner, GPTModel) and type(inner).forward is GPTModel.forward


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


class _CachedLogits:
    """Last-position logits (B, V) of the text so far, reading only the new token per step.

    When the text outgrows the window the positions shift, so it re-reads the cropped
    window into the emptied cache, exactly as the uncached path does. The cache holds
    ``max_len`` positions: the whole text, or the window where the text outgrows it.
    """

    def __init__(self, model: nn.Module, context_size: int, max_len: int) -> None:
        self.model, self.context_size, self.max_len = model, context_size, max_len
        self.cache: KVCache | None = None

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.cache is None or idx.shape[1] > self.context_size:
            if self.cache is None:
                device, dtype = _model_device_dtype(self.model)
                self.cache = KVCache(self.model.cfg, idx.shape[0], self.max_len, device, dtype)
            self.cache.reset()
            logits = self.model(idx[:, -self.context_size:], cache=self.cache, last_only=True)
        else:
            logits = self.model(idx[:, -1:], cache=self.cache, last_only=True)
        return logits[:, -1, :]


class _StaticLogits:
    """The same through a fixed-shape, compiled decode step (:mod:`diygpt.static_decode`)."""

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, context_size: int) -> None:
        self.decoder = StaticDecoder(model, batch_size, max_len, compile=True)
        # once the text outgrows the static cache (which it can only do past the window)
        self.fallback = _CachedLogits(model, context_size, context_size)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        d, t = self.decoder, idx.shape[1]
        if d.pos == 0 and t <= d.cache.max_len:
            return d.prefill(idx)
        if d.pos == t - 1 and not d.full:
            return d.step(idx[:, -1:])
        return self.fallback(idx)


def _static_cache_len(prompt_len: int, max_new_tokens: int, context_size: int) -> int:
    # Rounded up so that nearby lengths share one compiled shape.
    needed = prompt_len + max_new_tokens
    return min(context_size, -(-needed // 64) * 64)


@torch.no_grad()
def stream_generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    compile: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B, 1) one step at a time (:func:`generate`'s arguments).

    Stops after ``max_new_tokens`` or once every row has produced ``eos_id`` (the end
    token itself is not yielded when all rows end together; rows that finished earlier
    are padded with it). ``compile`` runs each one-token step through ``torch.compile``
    on a static cache: a slow first call, then faster steps (see BENCHMARKS.md). A model in
    training mode reads its whole window every step, as the book's loop does, so that its
    dropout draws, and so its tokens, are the book's: the cache serves eval mode. Any
    module mapping ids (B, T) to logits (B, T, V) works; only diygpt's GPTModel is cached.
    """
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    check_prompt(model, idx)
    if not (_whole(context_size) and context_size >= 1):
        raise GenerationError(f"context_size must be a positive integer, got {context_size}")
    limit = getattr(model, "context_length", None)
    context_size = int(context_size) if limit is None else min(int(context_size), limit)
    max_new_tokens = int(max_new_tokens)
    device, _ = _model_device_dtype(model)
    idx = _token_ids(idx, device)
    if not use_cache or model.training or not _takes_a_cache(model):
        def next_logits(idx: torch.Tensor) -> torch.Tensor:
            return model(idx[:, -context_size:])[:, -1, :]
    elif compile:
        max_len = _static_cache_len(idx.shape[1], max_new_tokens, context_size)
        next_logits = _StaticLogits(model, idx.shape[0], max_len, context_size)
    else:
        max_len = min(context_size, idx.shape[1] + max_new_tokens)
        next_logits = _CachedLogits(model, context_size, max_len)
    finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits = next_logits(idx)
        # argmax ranks NaN first; checked every step where it costs no device sync
        if (step == 0 or device.type == "cpu") and bool(torch.isnan(logits).any()):
            raise GenerationError(
                "the model's logits are NaN: its weights are broken (e.g. saved from a run "
                "that diverged); load another checkpoint"
            )
        idx_next = sample_next(logits.float(), temperature, top_k, top_p, generator)
        if eos_id is not None:
            hit = idx_next == eos_id
            if bool((finished | hit).all()):
                return
            idx_next = idx_next.masked_fill(finished, eos_id)
            finished |= hit
        idx = torch.cat((idx, idx_next), dim=1)
        yield idx_next


def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """The book's ``generate``: returns the prompt (B, T) followed by the new tokens."""
    device, _ = _model_device_dtype(model)
    out = [_token_ids(idx, device)]
    for idx_next in stream_generate(
        model, idx, max_new_tokens, context_size, temperature, top_k, eos_id, top_p,
        use_cache, generator, compile,
    ):
        out.append(idx_next)
    return torch.cat(out, dim=1)


@torch.no_grad()
def generate_text_simple(
    model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int
) -> torch.Tensor:
    """The book's chapter-4 greedy loop, unchanged: no cache, the whole window every step."""
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        logits = model(idx_cond)[:, -1, :]  # (B, V)
        probas = torch.softmax(logits, dim=-1)
        idx_next = torch.argmax(probas, dim=-1, keepdim=True)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx
