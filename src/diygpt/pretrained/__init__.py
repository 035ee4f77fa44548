"""OpenAI's GPT-2 weights in every form users hold them: OpenAI's TF release, Hugging
Face's files, and book-layout state dicts; plus a resumable downloader."""

from diygpt.pretrained.catalog import GPT2_MODELS, diygpt_home, model_dir
from diygpt.pretrained.loader import load_pretrained

__all__ = ["GPT2_MODELS", "diygpt_home", "load_pretrained", "model_dir"]
