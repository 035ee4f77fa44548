"""diygpt: GPT-2 from scratch, as in chapter 5 of *Build a Large Language Model (From Scratch)*."""

__version__ = "0.1.0"

# Each name is imported from its module when first asked for: `from diygpt import GPTModel`
# works as usual, while `diygpt prepare` and `diygpt --help` start without loading torch
# (about 190 MB and 1.5 s) or matplotlib.
_LAZY = {
    "PRESETS": "diygpt.config",
    "GPTConfig": "diygpt.config",
    "get_preset": "diygpt.config",
    "GPTDatasetV1": "diygpt.data",
    "create_dataloader_v1": "diygpt.data",
    "read_text": "diygpt.textfiles",
    "split_text": "diygpt.textfiles",
    "DiygptError": "diygpt.errors",
    "generate": "diygpt.generation",
    "generate_text_simple": "diygpt.generation",
    "stream_generate": "diygpt.generation",
    "calc_loss_batch": "diygpt.losses",
    "calc_loss_loader": "diygpt.losses",
    "perplexity": "diygpt.losses",
    "GPTModel": "diygpt.model",
    # chapter 4's building blocks, under the book's names
    "MultiHeadAttention": "diygpt.model",
    "LayerNorm": "diygpt.model",
    "GELU": "diygpt.model",
    "FeedForward": "diygpt.model",
    "TransformerBlock": "diygpt.model",
    "KVCache": "diygpt.model",
    "load_pretrained": "diygpt.pretrained.loader",
    "get_tokenizer": "diygpt.tokenizer",
    "text_to_token_ids": "diygpt.tokenizer",
    "token_ids_to_text": "diygpt.tokenizer",
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

__all__ = list(_LAZY)


def __getattr__(name: str):
    import importlib
    import importlib.util

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"diygpt.{name}") is not None:
        return importlib.import_module(f"diygpt.{name}")  # `import diygpt; diygpt.model`
    raise AttributeError(f"module 'diygpt' has no attribute {name!r}")


def __dir__() -> list[str]:  # tab completion sees the lazy names too
    return sorted(set(globals()) | set(_LAZY))
