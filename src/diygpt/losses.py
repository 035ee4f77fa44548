"""Cross-entropy per batch and per loader, as in the book, plus perplexity."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def calc_loss_batch(
    input_batch: torch.Tensor,
    target_batch: torch.Tensor,
    model: nn.Module,
    device: torch.device | str,
) -> torch.Tensor:
    """Mean next-token cross entropy of one batch: logits (B, T, V) vs targets (B, T)."""
    input_batch = input_batch.to(device)
    target_batch = target_batch.to(device)
    logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1).float(), target_batch.flatten())


def calc_loss_loader(
    data_loader: Iterable,
    model: nn.Module,
    device: torch.device | str,
    num_batches: int | None = None,
) -> float:
    """Average of per-batch losses over the first ``num_batches`` batches (all by default).

    Returns NaN for an empty loader, as the book does.
    """
    if len(data_loader) == 0:
        return float("nan")
    if num_batches is None:
        num_batches = len(data_loader)
    else:
        num_batches = min(num_batches, len(data_loader))
    total_loss = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


def perplexity(loss: float) -> float:
    """exp(cross entropy): the effective number of tokens the model hesitates between."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")
