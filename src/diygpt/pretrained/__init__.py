"""OpenAI's GPT-2 weights in every form users hold them: OpenAI's TF release, Hugging
Face's files, and book-layout state dicts; plus a resumable downloader."""

from diygpt.pretrained.catalog import GPT2_MODELS, diygpt_home, model_dir

__all__ = ["GPT2_MODELS", "diygpt_home", "load_pretrained", "model_dir"]


def __getattr__(name: str):
    # The loaders need torch; `diygpt download` and the catalog do not.
    if name == "load_pretrained":
        from diygpt.pretrained.loader import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'diygpt.pretrained' has no attribute {name!r}")
