"""diygpt: GPT-2 from scratch, as in chapter 5 of *Build a Large Language Model (From Scratch)*."""

from diygpt.config import PRESETS, GPTConfig, get_preset
from diygpt.data import GPTDatasetV1, create_dataloader_v1, read_text, split_text
from diygpt.errors import DiygptError
from diygpt.generation import generate, generate_text_simple, stream_generate
from diygpt.losses import calc_loss_batch, calc_loss_loader, perplexity
from diygpt.model import GPTModel, KVCache
from diygpt.pretrained import load_pretrained
from diygpt.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text

__version__ = "0.1.0"

# The book's training helpers pull in matplotlib and tqdm; import them only when asked for.
_LAZY = {
    "train_model_simple": "diygpt.training",
    "Trainer": "diygpt.training",
    "TrainConfig": "diygpt.train_config",
    "evaluate_model": "diygpt.evaluation",
    "generate_and_print_sample": "diygpt.evaluation",
    "plot_losses": "diygpt.plotting",
    "download_and_load_gpt2": "diygpt.pretrained.book_loader",
    "load_weights_into_gpt": "diygpt.pretrained.book_loader",
    "load_gpt2_params_from_tf_ckpt": "diygpt.pretrained.book_loader",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diygpt' has no attribute {name!r}")


def __dir__() -> list[str]:  # tab completion sees the lazy names too
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "TrainConfig",
    "download_and_load_gpt2",
    "load_weights_into_gpt",
    "load_gpt2_params_from_tf_ckpt",
    "Trainer",
    "evaluate_model",
    "generate_and_print_sample",
    "plot_losses",
    "train_model_simple",
    "PRESETS",
    "DiygptError",
    "GPTConfig",
    "GPTDatasetV1",
    "GPTModel",
    "KVCache",
    "calc_loss_batch",
    "calc_loss_loader",
    "create_dataloader_v1",
    "generate",
    "generate_text_simple",
    "get_preset",
    "get_tokenizer",
    "load_pretrained",
    "perplexity",
    "read_text",
    "split_text",
    "stream_generate",
    "text_to_token_ids",
    "token_ids_to_text",
]
