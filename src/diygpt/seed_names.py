"""The seed's own names for the book's functions, so its code runs with only its imports changed.

The chapter-5 notes this project is specified by rename a few of the book's identifiers
(``DiyGPTModel``, ``text_to_tokens_ids``, ``compute_loss_batch``, ``create_data_loader_v1``)
and some keyword arguments (``gpt_model=``, ``index_array=``, ``eval_frequency=``), and read
``model.position_emb`` where the book has ``pos_emb``. They are the book's functions under
those names::

    from diygpt.seed_names import (DiyGPTModel, compute_loss_loader, create_data_loader_v1,
                                    generate_text_simple, text_to_tokens_ids,
                                    token_ids_to_text, train_model_simple)

The package itself keeps the book's names (``from diygpt import GPTModel, ...``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diygpt.config import GPTConfig
from diygpt.data import create_dataloader_v1 as create_data_loader_v1
from diygpt.evaluation import evaluate_model, generate_and_print_sample
from diygpt.generation import generate_text_simple as _generate_text_simple
from diygpt.losses import calc_loss_batch as compute_loss_batch
from diygpt.losses import calc_loss_loader as compute_loss_loader
from diygpt.model import GPTModel
from diygpt.tokenizer import text_to_token_ids as text_to_tokens_ids
from diygpt.tokenizer import token_ids_to_text
from diygpt.training import train_model_simple as _train_model_simple

__all__ = [
    "DiyGPTModel",
    "compute_loss_batch",
    "compute_loss_loader",
    "create_data_loader_v1",
    "evaluate_model",
    "generate_and_print_sample",
    "generate_text_simple",
    "text_to_tokens_ids",
    "token_ids_to_text",
    "train_model_simple",
]


class DiyGPTModel(GPTModel):
    """``GPTModel`` under the seed's name, with the same parameters and state dict.

    A config dict without ``attn_impl`` gets the book's eager attention, which prints the
    seed's losses to every digit (PyTorch's fused attention agrees to about 1e-7).
    """

    def __init__(self, cfg: GPTConfig | dict[str, Any]) -> None:
        if isinstance(cfg, dict) and "attn_impl" not in cfg:
            cfg = {**cfg, "attn_impl": "eager"}
        super().__init__(cfg)

    @property
    def position_emb(self) -> nn.Embedding:
        """The book's ``pos_emb``, under the seed's name."""
        return self.pos_emb


def generate_text_simple(
    gpt_model: nn.Module, index_array: torch.Tensor, max_new_tokens: int, context_size: int
) -> torch.Tensor:
    """The book's greedy loop (:func:`diygpt.generate_text_simple`) with the seed's keywords."""
    return _generate_text_simple(gpt_model, index_array, max_new_tokens, context_size)


def train_model_simple(
    diy_gpt_model: nn.Module,
    train_loader,
    test_loader,
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    num_epochs: int,
    eval_frequency: int,
    eval_iter: int,
    start_context: str,
    tokenizer,
) -> tuple[list[float], list[float], list[int]]:
    """The book's loop (:func:`diygpt.training.train_model_simple`) with the seed's keywords:
    (train losses, test losses, tokens seen). Its lines are printed in the book's wording."""
    return _train_model_simple(diy_gpt_model, train_loader, test_loader, optimizer, device,
                               num_epochs, eval_frequency, eval_iter, start_context, tokenizer)
