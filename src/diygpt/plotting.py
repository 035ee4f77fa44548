"""The book's loss figure: train and validation loss against epochs, tokens seen on a second axis."""

from __future__ import annotations

import os
from collections.abc import Sequence

# A Figure of its own, not pyplot's: nothing here picks or changes matplotlib's backend, so
# the CLI writes files on a machine without a display and a notebook keeps its inline plots.
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

PLOT_DPI = 120


def plot_losses(
    epochs_seen: Sequence[float],
    tokens_seen: Sequence[int],
    train_losses: Sequence[float],
    val_losses: Sequence[float],
    path: str | os.PathLike | None = "loss.png",
) -> Figure:
    """Draw the book's figure, save it to ``path`` (None: do not save) and return it.

    In a notebook, the returned figure shows when it ends a cell (``fig = plot_losses(...)``
    then ``fig``).
    """
    fig = Figure(figsize=(5, 3))
    ax1 = fig.subplots()
    marker = "o" if len(epochs_seen) == 1 else None  # a line of one point draws nothing
    ax1.plot(epochs_seen, train_losses, marker=marker, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", marker=marker, label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # same curves against tokens seen, drawn invisibly to align the axis
    ax2.plot(tokens_seen, train_losses, alpha=0)
    _align_tokens_axis(ax1, ax2, epochs_seen, tokens_seen)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=PLOT_DPI)
    return fig


def _align_tokens_axis(ax1, ax2, epochs_seen: Sequence[float],
                       tokens_seen: Sequence[int]) -> None:
    """The tokens axis spans what the epochs axis spans, even where the invisible curve
    lost points (a nan or infinite loss is not drawn, and would shrink it)."""
    if len(epochs_seen) < 2 or len(tokens_seen) != len(epochs_seen):
        return
    e0, e1 = float(epochs_seen[0]), float(epochs_seen[-1])
    t0, t1 = float(tokens_seen[0]), float(tokens_seen[-1])
    if e1 == e0:
        return
    per_epoch = (t1 - t0) / (e1 - e0)
    low, high = ax1.get_xlim()
    ax2.set_xlim(t0 + (low - e0) * per_epoch, t0 + (high - e0) * per_epoch)
