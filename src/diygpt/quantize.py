"""Int8 weight-only quantization for generation on CPU.

Batch-1 generation reads every weight once per token, so it is bound by memory bandwidth,
not arithmetic: storing the matmul weights as int8 (one fp scale per output row) reads 4x
fewer bytes than fp32. Two kernels, picked at load time:

- ``fbgemm`` (x86 CPUs): PyTorch's dynamic int8 linear; each call also quantizes the
  activations per tensor, and it is the faster kernel (5 ms vs 15 ms for the 50257 x 768
  output head on one core of the project's machine). One scale per call means a row's
  result depends on the rows beside it: the cached one-token steps, the uncached window and
  the other prompts of a batch can give different tokens.
- ``int8pack`` (elsewhere): ``_weight_int8pack_mm``, bf16 activations x int8 weights scaled
  per row (weight-only, the kernel gpt-fast uses).

Under ``torch.compile`` (``generate --compile``) fbgemm stays, as an opaque op
(``diygpt::fbgemm_linear``) in the compiled graph; without fbgemm the layer is written as
plain ops (fp32 activations x dequantised int8 weights, weight-only), which inductor turns
into one fused pass over the int8 bytes.

Embeddings and LayerNorms stay fp32 (a lookup reads one row only).

For inference only: a quantized model cannot be trained, and ``save_weights``/``save_run``
refuse it (save the model before quantizing, and quantize it again after loading).
"""

from __future__ import annotations

import copy
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from diygpt.errors import GenerationError
from diygpt.speed import PaddedHead, first_rows

_ACT_DTYPE = torch.bfloat16  # the kernel's vectorised CPU path wants bf16 activations


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight (N, K) ~= q (N, K) int8 * scales (N,)."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (N,)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def _has_int8_kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def _fbgemm_pack(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
    """fbgemm's prepacked weight, or None where the quantized engine is not there."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    try:
        with warnings.catch_warnings():  # the quantized-tensor API warns it is deprecated
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(
                q, scales.double(), torch.zeros_like(scales, dtype=torch.long), 0
            )
            return torch.ops.quantized.linear_prepack(qw, bias)
    except (RuntimeError, AttributeError):
        return None


# fbgemm's packed weights are TorchScript objects that torch.compile cannot trace; layers
# refer to theirs by a number, and a custom op looks it up at run time.
_PACKED: dict[int, object] = {}


def _register_packed(layer: nn.Module, packed: object) -> int:
    key = id(layer)
    _PACKED[key] = packed
    weakref.finalize(layer, _PACKED.pop, key, None)
    return key


# Defined with the low-level Library API rather than ``torch.library.custom_op``: a step
# calls it 73 times (gpt2-small), and custom_op's Python wrapper cost ~10 us per call there.
_LIB = torch.library.Library("diygpt", "DEF")
_LIB.define("fbgemm_linear(Tensor x, int key, int out_features) -> Tensor")


def _fbgemm_linear(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    # reduce_range: activations in 7 bits, as torch's own dynamic Linear quantizes them. On
    # x86 CPUs without VNNI (AVX2), fbgemm sums u8 x s8 pairs in int16, and full 8-bit
    # activations overflow it: 14% off for a 64-input layer, +1.4% perplexity on the seed model.
    return torch.ops.quantized.linear_dynamic(x, _PACKED[key], True)


_LIB.impl("fbgemm_linear", _fbgemm_linear, "CPU")


@torch.library.register_fake("diygpt::fbgemm_linear", lib=_LIB)
def _(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is int8 with one scale per output feature."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not bool(torch.isfinite(linear.weight).all()):
            raise GenerationError("cannot quantize: the model's weights hold NaN or infinite "
                                  "values (e.g. saved from a run that diverged)")
        q, scales = quantize_rows(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", q)  # (N, K) int8
        self.register_buffer("scales", scales)  # (N,) fp32
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.register_buffer("bias", bias)
        on_cpu = linear.weight.device.type == "cpu"
        packed = _fbgemm_pack(q, scales, bias) if on_cpu else None
        self._fbgemm_key = _register_packed(self, packed) if packed is not None else None

    def __deepcopy__(self, memo: dict) -> Int8Linear:
        # As nn.Module copies (its hooks and settings too), but the copy needs a packed
        # weight of its own name: the original's is removed with it.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            if name != "_fbgemm_key":
                new.__dict__[name] = copy.deepcopy(value, memo)
        key = self._fbgemm_key
        new._fbgemm_key = None if key is None else _register_packed(new, _PACKED[key])
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if self._fbgemm_key is not None and x.dtype == torch.float32:
            x2 = x.reshape(-1, self.in_features)  # (B*T, K)
            if torch.compiler.is_compiling():  # an opaque op inside the compiled graph
                y = torch.ops.diygpt.fbgemm_linear(x2, self._fbgemm_key, self.out_features)
            else:
                try:
                    y = _fbgemm_linear(x2, self._fbgemm_key, self.out_features)
                except RuntimeError:
                    if bool(torch.isfinite(x2).all()):
                        raise
                    # fbgemm cannot pick a scale for NaN activations ("min should be less
                    # than or equal to max"): the weights before this layer are broken.
                    raise GenerationError("the model's activations are NaN or infinite: its "
                                          "weights are broken (e.g. saved from a run that "
                                          "diverged); load another checkpoint") from None
            return y.view(*lead, self.out_features)  # bias added by the kernel
        if torch.compiler.is_compiling():
            # Traced by torch.compile elsewhere: a multiply-and-sum, which inductor fuses
            # into one pass over the int8 weight, dequantising as it reads.
            w = self.weight.to(x.dtype)  # (N, K)
            y = (x.unsqueeze(-2) * w).sum(-1) * self.scales.to(x.dtype)  # (..., N)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        x2 = x.reshape(-1, self.in_features).to(_ACT_DTYPE)  # (B*T, K)
        if _has_int8_kernel() and x2.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales.to(_ACT_DTYPE))
        else:  # other devices: dequantize on the fly (correct, not fast)
            y = F.linear(x2, self.weight.to(_ACT_DTYPE) * self.scales.to(_ACT_DTYPE)[:, None])
        y = y.to(x.dtype).view(*lead, self.out_features)  # (B, T, N)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` in the model (blocks and output head) with Int8Linear, in place.

    A padded output head (``--pad-vocab``) is quantized at the vocabulary's rows, and fused
    q/k/v products are turned back into three: int8 weights cannot be stacked into one.
    """
    for module in list(model.modules()):
        if getattr(module, "fused_qkv", False):
            module.fused_qkv = False
        for child_name, child in list(module.named_children()):
            if isinstance(child, PaddedHead):
                child = first_rows(child, child.vocab_size)
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child))
    return model.eval().requires_grad_(False)


def model_bytes(model: nn.Module) -> int:
    """Bytes of weights and buffers, to show what quantization saved."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
