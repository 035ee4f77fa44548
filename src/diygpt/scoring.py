"""Loss and perplexity of a whole text, each next-token prediction scored once.

The book's windows, ``range(0, n - max_length, stride)``, leave the targets after the last
whole window unscored (up to ``max_length - 1`` of them), and with a stride below the window
they score the overlaps more than once, each time with a shorter context than the last.
``diygpt eval`` instead scores every target exactly once: the book's windows in order, each
scoring only the targets no earlier window scored (the rest are ``-100``, which
``F.cross_entropy`` ignores), so a target is scored with the longest context the windows
give it; then, when targets are left at the end, one last window that ends with the text.
With the default stride (the window length) the book's windows score each target once
already, so only that last window is new. A stride past the window still skips the
targets between windows, as the CLI warns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from diygpt.data import num_windows

IGNORE = -100  # F.cross_entropy's ignore_index: not scored


class ScoredWindows(Dataset):
    """(input, target) windows of ``length`` over ``ids``; targets already scored by an
    earlier window are :data:`IGNORE`."""

    def __init__(self, ids: Sequence[int] | np.ndarray, length: int, stride: int) -> None:
        self.ids = ids
        self.length = length
        n = len(ids)
        starts = [i * stride for i in range(num_windows(n, length, stride))]
        if n > length and (not starts or starts[-1] + length < n - 1):
            starts.append(n - 1 - length)  # the text's last targets
        # (start, first target position not scored before it); target position t is ids[t]
        self.windows: list[tuple[int, int]] = []
        scored = 0  # positions up to here are scored (position 0 is never a target)
        for start in starts:
            self.windows.append((start, max(start + 1, scored + 1)))
            scored = start + length

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, first = self.windows[idx]
        chunk = torch.as_tensor(np.asarray(self.ids[start:start + self.length + 1], dtype=np.int64))
        x, y = chunk[:-1], chunk[1:].clone()  # (T,), (T,): y[j] is position start + 1 + j
        y[: first - start - 1] = IGNORE
        return x, y
