"""Write the book's own checkpoint files, which the book's code loads strictly.

The book saves ``torch.save(model.state_dict(), "model.pth")`` and, to train on later,
``torch.save({"model_state_dict": ..., "optimizer_state_dict": ...}, "model_and_optimizer.pth")``.
Its attention layers register their causal mask as a buffer, so its state dict has one
``trf_blocks.<i>.att.mask`` per layer and a strict ``load_state_dict`` wants them. diygpt
builds the mask on the fly and saves none, so they are added here: one tensor under every
layer's name, which ``torch.save`` stores once.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from diygpt.checkpointing import atomic_write, output_path
from diygpt.checkpoints import model_state_for_saving, unwrap_model
from diygpt.errors import CheckpointError

# The optimizer's choice of kernel, not its numbers: the book's AdamW, built with defaults
# on whatever device it runs, picks its own (a fused CUDA state would not step on the CPU).
_KERNEL_FLAGS = {"foreach": None, "fused": None, "capturable": False, "differentiable": False}


def book_causal_mask(context_length: int) -> torch.Tensor:
    """The book's buffer: ones above the diagonal, float32, (T, T)."""
    return torch.triu(torch.ones(context_length, context_length), diagonal=1)


def book_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as the book's ``GPTModel.state_dict()`` holds them: the same names
    in the same order, each layer's mask included, on the CPU, no wrapper prefixes."""
    cfg = unwrap_model(model).cfg
    mask = book_causal_mask(cfg.context_length)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model_state_for_saving(model).items():
        block, att, _ = key.partition(".att.")
        if att and block.startswith("trf_blocks."):
            # The book's attention module lists its own buffer before its sublayers' weights.
            out.setdefault(f"{block}.att.mask", mask)
        out[key] = tensor
    return out


def book_optimizer_state(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """A diygpt run's ``optimizer.pt`` as the book's AdamW over ``model.parameters()`` loads it.

    The numbers stay (moments, step counts, lr, betas, weight decay); the kernel flags go
    back to AdamW's defaults. Moments of a ``--pad-vocab`` head (from a run's file or from a
    padded model's live optimizer) lose their padding rows, whose gradients were always zero.
    Converting a converted state changes nothing.
    """
    plain = unwrap_model(model)
    # The book's shapes: a padded head's state dict already holds only the vocabulary rows.
    shapes = {name: tensor.shape for name, tensor in plain.state_dict().items()}
    params = [name for name, _ in plain.named_parameters()]
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if (not isinstance(groups, list) or not isinstance(state.get("state"), dict)
            or not all(_is_adamw_group(g) for g in groups)):
        raise CheckpointError("not a torch AdamW state dict (param_groups with params, lr "
                              "and weight_decay, and a per-parameter state)")
    if len(groups) != 1:
        # torch numbers the parameters group by group and records no names: which moment
        # belongs to which weight is lost (diygpt's and the book's AdamW have one group).
        raise CheckpointError(f"the optimizer state has {len(groups)} parameter groups; only "
                              "one, over model.parameters() in order, maps onto the weights")
    if groups[0]["params"] != list(range(len(params))):
        tied = len(groups[0]["params"]) == len(params) - 1
        raise CheckpointError(
            f"the optimizer state holds {len(groups[0]['params'])} parameters, the model "
            f"{len(params)}: " + ("a tied head's (out_head sharing tok_emb's weight), which "
                                  "the untied model does not have" if tied
                                  else "it belongs to another model")
        )
    moments = {}
    for index, per_param in state["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            raise CheckpointError(f"the optimizer state has an entry for parameter {index!r}, "
                                  f"which the model does not have")
        if not isinstance(per_param, dict) or (
                per_param and not {"step", "exp_avg", "exp_avg_sq"} <= per_param.keys()):
            raise CheckpointError(f"the optimizer state of parameter {index} is not AdamW's "
                                  "(step, exp_avg, exp_avg_sq)")
        name = params[index]
        moments[index] = {key: _fit(value, name, shapes[name], key)
                          for key, value in per_param.items()}
    return {
        "state": moments,
        "param_groups": [{**group, **_KERNEL_FLAGS} for group in groups],
    }


def _is_adamw_group(group: Any) -> bool:
    return (isinstance(group, dict) and isinstance(group.get("params"), list)
            and all(isinstance(group.get(k), (int, float)) for k in ("lr", "weight_decay")))


def _fit(value: Any, name: str, shape: torch.Size, key: str) -> Any:
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape == shape:
        return value
    padded = (name == "out_head.weight" and value.dim() == 2
              and value.shape[0] > shape[0] and value.shape[1:] == shape[1:])
    if not padded:
        raise CheckpointError(
            f"the optimizer's {key} for {name} has shape {tuple(value.shape)}, the weight "
            f"{tuple(shape)}: it belongs to another model"
        )
    return value[: shape[0]].clone()


def save_book_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer_state: dict[str, Any] | None = None
) -> None:
    """Write the book's ``model.pth`` or, with ``optimizer_state`` (a torch AdamW state dict,
    e.g. a run's ``optimizer.pt``), its ``model_and_optimizer.pth``; atomically."""
    weights = book_state_dict(model)
    if optimizer_state is None:
        obj: Any = weights
    else:
        obj = {"model_state_dict": weights,
               "optimizer_state_dict": book_optimizer_state(optimizer_state, model)}
    atomic_write(output_path(path), lambda tmp: torch.save(obj, tmp))
