"""User-facing errors: the CLI prints these as one line and exits non-zero, never a traceback."""

from __future__ import annotations


class DiygptError(Exception):
    """Base class for errors caused by the user's input, files or environment."""


class ConfigError(DiygptError, ValueError):
    """An invalid model or training configuration."""


class DataError(DiygptError, ValueError):
    """Training or evaluation text that cannot be used."""


class CheckpointError(DiygptError):
    """A checkpoint or weights file that cannot be read or does not fit the model."""


class TokenizerError(DiygptError):
    """The GPT-2 tokenizer files cannot be found or loaded."""


class GenerationError(DiygptError, ValueError):
    """Invalid sampling parameters or prompt."""


class DownloadError(DiygptError):
    """Pretrained weights could not be downloaded or failed their size or checksum check."""


class TrainingError(DiygptError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class OutputError(DiygptError):
    """The standard output cannot be written (``> out.txt`` on a full disk)."""
