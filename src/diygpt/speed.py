"""Opt-in training speed-ups, applied to a built model from outside it.

- :func:`pad_vocab`: the output projection computes a multiple-of-64 number of logits
  (50257 -> 50304), which GPU matmul kernels tile far better; the extra logits are sliced
  off (or skipped by the fused loss), so the loss, gradients and saved checkpoints are those
  of the unpadded model.
- :func:`fuse_qkv`: query, key and value from one matmul per block (with ``--compile`` on
  a GPU).
- :func:`compile_model`: ``torch.compile`` (fuses the elementwise ops between matmuls).
- :func:`compile_loss`: the loss compiled too, so the logits' cast to fp32, the cross
  entropy and its backward run as two fused passes over the (B, T, V) logits instead of ~10.
- :func:`training_loss`: ``--compile``'s loss; optionally, on CUDA, the Triton kernels of
  :mod:`diygpt.fused_ce`, which read a padded head's whole output.
- :func:`make_adamw`: AdamW, optionally torch's fused single-kernel implementation or
  :mod:`diygpt.fast_adamw`'s exact one-pass CPU update.
- :class:`SpeedMeter`: tokens per second over training steps and, on a known GPU, MFU.
- Elsewhere: :func:`diygpt.chunked_head.chunk_head`, the output head's products in
  vocabulary slices (``--compile`` on a CPU in fp32).

None of these runs unless asked for; the default path keeps the book's exact ops.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from diygpt.config import GPTConfig
from diygpt.losses import LossFn, logsumexp_cross_entropy

PAD_MULTIPLE = 64


class PaddedHead(nn.Linear):
    """``out_head`` with ``padded_size`` rows whose forward returns only ``vocab_size`` logits.

    The state dict holds just the first ``vocab_size`` rows (the book's shape) and loading
    a book-shaped weight pads it with zeros, so checkpoints move freely between padded and
    unpadded models. The padding rows get a zero gradient (their logits are dropped).

    With ``keep_padding`` set (by :func:`training_loss` with ``fused``, whose loss counts
    only the first ``vocab_size`` columns), a training forward with gradients returns all
    ``padded_size`` logits: the slice's backward, a zero-filled copy of the (B, T, padded)
    gradient, is then never run. Evaluation and generation (eval mode or no gradients)
    still get ``vocab_size``.
    """

    def __init__(self, in_features: int, vocab_size: int, padded_size: int) -> None:
        super().__init__(in_features, padded_size, bias=False)
        self.vocab_size = vocab_size
        self.keep_padding = False
        self.register_state_dict_post_hook(_trim_padding)
        self.register_load_state_dict_pre_hook(_add_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight)  # (B, T, padded)
        if self.keep_padding and self.training and torch.is_grad_enabled():
            return logits
        return logits[..., : self.vocab_size]  # (B, T, V)


def first_rows(linear: nn.Linear, rows: int) -> nn.Linear:
    """A frozen ``nn.Linear`` of ``linear``'s first ``rows`` outputs, sharing its weights:
    a padded head cut to the vocabulary, for inference."""
    cut = nn.Linear(linear.in_features, rows, bias=linear.bias is not None, device="meta")
    cut.weight = nn.Parameter(linear.weight.detach()[:rows], requires_grad=False)
    if linear.bias is not None:
        cut.bias = nn.Parameter(linear.bias.detach()[:rows], requires_grad=False)
    return cut


def _trim_padding(module: PaddedHead, state_dict: dict, prefix: str, *args) -> None:
    key = prefix + "weight"
    if key in state_dict:
        state_dict[key] = state_dict[key][: module.vocab_size]


def _add_padding(module: PaddedHead, state_dict: dict, prefix: str, *args) -> None:
    key = prefix + "weight"
    weight = state_dict.get(key)
    if weight is not None and weight.shape[0] == module.vocab_size:
        pad = weight.new_zeros(module.out_features - module.vocab_size, weight.shape[1])
        state_dict[key] = torch.cat([weight, pad])


def padded_size(vocab_size: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-vocab_size // multiple) * multiple


def pad_vocab(model: nn.Module, multiple: int = PAD_MULTIPLE) -> nn.Module:
    """Swap ``model.out_head`` for a :class:`PaddedHead` holding the same weights (in place)."""
    head = model.out_head
    if isinstance(head, PaddedHead):
        return model
    vocab, dim = head.weight.shape
    # Built on the meta device: nn.Linear's random init would take draws from the global
    # generator, moving every later one (data order, dropout masks) off the unpadded run's.
    with torch.device("meta"):
        padded = PaddedHead(dim, vocab, padded_size(vocab, multiple))
    padded = padded.to_empty(device=head.weight.device).to(head.weight.dtype)
    with torch.no_grad():
        padded.weight.zero_()
        padded.weight[:vocab].copy_(head.weight)
    model.out_head = padded
    return model


def can_fuse_qkv(model: nn.Module) -> bool:
    """Plain float linears only (an int8-quantized model keeps its own kernels)."""
    return all(type(getattr(b.att, name)) is nn.Linear for b in model.trf_blocks
               for name in ("W_query", "W_key", "W_value"))


def fuse_qkv(model: nn.Module) -> nn.Module:
    """Each block's query, key and value from one (C -> 3C) product (in place).

    The three book parameters stay as they are (the stacked weight is rebuilt in each
    forward), so training, optimizer state and checkpoints do not change; the outputs agree
    to rounding. Worth it compiled on a GPU: for gpt2-small on an H200, +1.6% training tok/s
    (BENCHMARKS.md).
    """
    if can_fuse_qkv(model):
        for block in model.trf_blocks:
            block.att.fused_qkv = True
    return model


COMPILE_MODES = ("default", "max-autotune", "max-autotune-aten")


def compile_model(model: nn.Module, mode: str = "default") -> nn.Module:
    """The compiled wrapper; checkpoints still save the plain model (``unwrap_model``).

    On the CPU, dropout keeps drawing from torch's generator (inductor's
    ``fallback_random``), so the compiled model draws the eager model's masks: the seed's
    run under ``--compile --fused-adamw`` prints the seed's loss log to every decimal. With
    inductor's own generator it followed another curve (train loss 0.568 against 1.153
    after 10 epochs), at the same speed (BENCHMARKS.md, twelfth pass). On a GPU, where
    inductor fuses its draws into the kernels, the masks are left to it.

    ``mode="max-autotune"`` is inductor's ``max-autotune-no-cudagraphs``: at the first step
    each matrix product's cuBLAS call is timed against Triton templates, and the fused
    kernels are tuned (minutes; cached on that machine's disk after). On an H200 cuBLAS won
    every product and the step was 1.6-2.5% faster (BENCHMARKS.md, thirteenth pass). CUDA
    graphs, which torch's ``max-autotune`` adds, were 1.8% slower there (eleventh pass).

    ``mode="max-autotune-aten"`` is the same with no Triton templates to compile: each
    product picks among torch's own calls only (cuBLAS's plain and fused-bias forms on a
    GPU). cuBLAS had won every product anyway (one split-K form by a tie), so on an H200
    the first compile takes about 2.5 minutes instead of 6 (BENCHMARKS.md, fourteenth pass).
    Timed side by side on one H200, the two modes gained alike, within the step's
    run-to-run noise (fifteenth pass).
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    # mode= and options= do not go together in torch.compile, so the mode goes in as options.
    options = {}
    if mode.startswith("max-autotune"):
        options.update(torch._inductor.list_mode_options("max-autotune-no-cudagraphs"))
    if mode == "max-autotune-aten":
        options["max_autotune_gemm_backends"] = "ATEN"
    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cpu":
        options["fallback_random"] = True
    return torch.compile(model, options=options) if options else torch.compile(model)


def compile_loss() -> LossFn:
    """The cross entropy compiled, for a compiled model's logits.

    Left eager, the loss of a bf16 (B, T, V) forward makes an fp32 copy of the logits, its
    log-softmax, and in backward two more fp32 tensors of that size and a bf16 cast: for
    gpt2-small at batch 32 x 1024 that is tens of GB of memory traffic a step. Compiled,
    :func:`~diygpt.losses.logsumexp_cross_entropy` reads the bf16 logits in one fused
    reduction and writes the bf16 gradient in one elementwise pass.
    """
    return torch.compile(logsumexp_cross_entropy)


def training_loss(model: nn.Module, device: torch.device | str, fused: bool = False) -> LossFn:
    """The loss ``--compile`` trains ``model`` (the plain module, not a wrapper) with.

    :func:`compile_loss`, or with ``fused`` on CUDA with triton installed,
    :func:`~diygpt.fused_ce.fused_cross_entropy` over the first ``vocab_size`` columns, a
    padded head then set to hand over its whole output (and set back when not ``fused``).
    ``diygpt train --compile`` asks for ``fused``: on an H200 a gpt2-small step at ctx 1024
    ran 1.05x faster at batch 32 and 1.10x at batch 64 (BENCHMARKS.md, eleventh pass).
    """
    from diygpt import fused_ce

    use_fused = fused and fused_ce.available(device)
    head = model.out_head
    if isinstance(head, PaddedHead):
        head.keep_padding = use_fused  # any other loss needs the sliced logits
    if not use_fused:
        return compile_loss()
    return functools.partial(fused_ce.fused_cross_entropy, vocab_size=model.cfg.vocab_size)


def make_adamw(
    params: Iterable[torch.Tensor], lr: float, weight_decay: float, fused: bool = False,
    fast: bool = False,
) -> torch.optim.AdamW:
    """The book's AdamW.

    ``fused``: torch's single-kernel update of all parameters (other roundings). ``fast``
    (without ``fused``): :class:`diygpt.fast_adamw.FastAdamW`, the book's numbers bit for
    bit, its CPU updates in one pass over memory.
    """
    if fused:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    if fast:
        from diygpt.fast_adamw import FastAdamW

        return FastAdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def flops_per_token(cfg: GPTConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B.

    6 per weight of every matmul (the blocks and the output head; embedding lookups are
    free) plus attention's 12 * layers * emb_dim * seq_len.
    """
    t = cfg.context_length if seq_len is None else seq_len
    c = cfg.emb_dim
    matmul_params = cfg.n_layers * 12 * c * c + cfg.vocab_size * c
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * c * t


# Dense bf16/fp16 tensor-core peaks from the datasheets, FLOP/s; the first key found in the
# device's name wins (so "H100 PCIe" before "H100").
_GPU_PEAKS = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12,
              "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12, "4090": 165e12,
              "3090": 71e12, "V100": 125e12}


def peak_flops(device: torch.device | str) -> float | None:
    """The GPU's dense bf16 peak, or None when unknown (and always on CPU)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _GPU_PEAKS.items() if key in name), None)


class SpeedMeter:
    """Accumulates (tokens, seconds) of training steps; reports tok/s and MFU per interval."""

    def __init__(self, flops_per_token: float, peak: float | None = None) -> None:
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.tokens = 0
        self.seconds = 0.0
        self._t0: float | None = None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, tokens: int) -> None:
        """Call after a step's result has been read (``loss.item()`` waits for the GPU)."""
        if self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self.tokens += tokens
            self._t0 = None

    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def mfu(self) -> float | None:
        if self.peak is None:
            return None
        return self.tokens_per_second() * self.flops_per_token / self.peak

    def report(self) -> str:
        """``, 115 tok/s`` (plus ``, MFU 41.2%`` on a known GPU) since the last report."""
        text = f", {self.tokens_per_second():.0f} tok/s"
        mfu = self.mfu()
        if mfu is not None:
            text += f", MFU {mfu:.1%}"
        self.tokens, self.seconds = 0, 0.0
        return text
