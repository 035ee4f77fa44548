"""FSDP2 (``fully_shard``) for models too large for one device, and full-state checkpoints.

Every transformer block is its own FSDP unit (its weights are all-gathered just before it
runs and freed after), and the root holds the embeddings, final norm and output head. The
checkpoint is gathered to rank 0 as a full, unsharded state dict on the CPU and written by
the normal ``save_run``, so one process loads it with ``load_model`` like any other run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from diygpt.checkpoints import clean_state_dict, load_into

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """Shard ``model`` in place across ``world_size`` ranks (the model class gains FSDP hooks)."""
    mesh = init_device_mesh(device.type, (world_size,))
    for block in model.trf_blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def rekey_optimizer_state(state: dict[str, Any], keys: dict) -> dict[str, Any]:
    """Rename an optimizer state dict's parameter keys: FQN -> index (as a single process's
    ``optimizer.state_dict()`` has them) or index -> FQN (as torch.distributed.checkpoint)."""
    return {
        "state": {keys[k]: value for k, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [keys[k] for k in group["params"]]}
            for group in state["param_groups"]
        ],
    }


def gather_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, is_main: bool
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Collective: rank 0 gets a plain CPU GPTModel and optimizer with the full state.

    Other ranks join the gathers and get ``model`` and ``optimizer`` back unchanged.
    """
    from diygpt.model import GPTModel

    weights = get_model_state_dict(model, options=_FULL)
    optim_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not is_main:
        return model, optimizer
    with torch.device("meta"):
        plain = GPTModel(model.cfg)
    load_into(plain, clean_state_dict(weights), "gathered FSDP state", assign=True)
    index = {name: i for i, (name, _) in enumerate(plain.named_parameters())}
    # Its hyperparameters (betas, weight decay, ...) come back with load_state_dict.
    plain_optimizer = type(optimizer)(plain.parameters(), lr=optimizer.param_groups[0]["lr"])
    plain_optimizer.load_state_dict(rekey_optimizer_state(optim_state, index))
    return plain, plain_optimizer


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    weights: dict[str, torch.Tensor] | None,
    optim_state: dict[str, Any] | None,
) -> None:
    """Collective: load a single-process (full, index-keyed) state into a sharded model
    (``weights=None``: the optimizer's alone)."""
    if weights is not None:
        set_model_state_dict(model, clean_state_dict(weights), options=_FULL)
    if optimizer is None or optim_state is None:
        return
    names = dict(enumerate(name for name, _ in model.named_parameters()))
    by_name = rekey_optimizer_state(optim_state, names)
    set_optimizer_state_dict(model, optimizer, by_name, options=_FULL)
