"""The book's loss figure: train and validation loss against epochs, tokens seen on a second axis."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # write files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_losses(
    epochs_seen: Sequence[float],
    tokens_seen: Sequence[int],
    train_losses: Sequence[float],
    val_losses: Sequence[float],
    path: str | os.PathLike = "loss.png",
) -> None:
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # same curves against tokens seen, drawn invisibly to align the axis
    ax2.plot(tokens_seen, train_losses, alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
