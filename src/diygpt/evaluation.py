"""The book's evaluation helpers used inside the training loop: losses and the epoch sample."""

from __future__ import annotations

import torch
from torch import nn

from diygpt.generation import generate_text_simple
from diygpt.losses import calc_loss_loader
from diygpt.tokenizer import text_to_token_ids, token_ids_to_text


def evaluate_model(
    model: nn.Module, train_loader, val_loader, device, eval_iter: int
) -> tuple[float, float]:
    """Mean loss of the first ``eval_iter`` batches of each loader, in eval mode."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def sample_text(
    model: nn.Module, tokenizer, device, start_context: str, max_new_tokens: int = 50
) -> str:
    """The book's greedy epoch sample, newlines shown as spaces."""
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    token_ids = generate_text_simple(model, encoded, max_new_tokens, context_size)
    model.train()
    return token_ids_to_text(token_ids, tokenizer).replace("\n", " ")


def generate_and_print_sample(model: nn.Module, tokenizer, device, start_context: str) -> None:
    """The book's: print a 50-token greedy continuation of ``start_context`` on one line."""
    print(sample_text(model, tokenizer, device, start_context))


def format_eval_line(epoch: int, step: int, train_loss: float, val_loss: float) -> str:
    return f"Ep {epoch} (Step {step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"
