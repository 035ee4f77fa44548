"""Build a GPTModel from named tensors without ever holding two copies of the weights.

The model is created on the ``meta`` device (shapes only, no memory), every tensor is
checked against those shapes, converted to the target dtype and device one at a time
(straight from the memory map, so a bf16 load never makes a full fp32 copy), and then
assigned in place of the meta parameters.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from diygpt.config import GPTConfig
from diygpt.errors import CheckpointError
from diygpt.model import GPTModel

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``None`` means fp32, the dtype GPT-2 was released in."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise CheckpointError(f"unsupported dtype {dtype}; use fp32, bf16 or fp16")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise CheckpointError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16") from None


def meta_model(cfg: GPTConfig) -> GPTModel:
    with torch.device("meta"):
        return GPTModel(cfg)


def expected_shapes(model: GPTModel) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def materialize(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``t`` as a contiguous tensor of ``dtype`` on ``device``, copying only if needed.

    A contiguous fp32 CPU tensor is returned as is: it stays a view of the memory map.
    """
    if t.dtype == dtype and t.device == device and t.is_contiguous():
        return t
    out = torch.empty(t.shape, dtype=dtype, device=device)
    out.copy_(t)
    return out


def assemble(
    cfg: GPTConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    file: object,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    tie: bool = False,
) -> GPTModel:
    """A GPTModel in eval mode from (book name, tensor) pairs; strict about names and shapes.

    With ``tie``, ``out_head.weight`` is the very Parameter of ``tok_emb.weight`` (GPT-2
    ties them), so the pairs must not contain ``out_head.weight``.
    """
    device = torch.device(device)
    target = parse_dtype(dtype)
    model = meta_model(cfg)
    expected = expected_shapes(model)
    if tie:
        expected.pop("out_head.weight")
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        shape = expected.get(name)
        if shape is None:
            raise CheckpointError(f"{file}: unexpected tensor {name}")
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{file}: tensor {name} has shape {list(tensor.shape)}, expected {list(shape)}"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{file}: tensor {name} has non-float dtype {tensor.dtype}")
        state[name] = materialize(tensor, target, device)
    missing = [name for name in expected if name not in state]
    if missing:
        raise CheckpointError(f"{file}: tensor {missing[0]} is missing ({len(missing)} in all)")
    if tie:
        state["out_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tie:
        model.out_head.weight = model.tok_emb.weight
    return model.eval()
