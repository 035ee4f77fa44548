"""Ctrl-C and SIGTERM during training: finish the step, save a checkpoint, stop cleanly.

The handler only records the signal; the loop looks at it between steps, where the state is
consistent and can be saved for an exact resume. A second signal stops at once
(KeyboardInterrupt), for a user who does not want to wait for the save.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal, between steps, after saving ``checkpoint`` if it has a
    run folder (not an error). A KeyboardInterrupt, so that the book reader's
    ``except KeyboardInterrupt:`` around ``train_model_simple`` still catches Ctrl-C."""

    def __init__(self, signum: int, step: int, checkpoint: str | None) -> None:
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")

    @property
    def exit_code(self) -> int:
        # SIGTERM (a scheduler's preemption) is a clean stop; Ctrl-C keeps the shell's 130.
        return 0 if self.signum == signal.SIGTERM else 130


class StopRequest:
    """Context manager: while active, SIGINT/SIGTERM set ``signum`` instead of killing us."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # asked twice: do not wait for the save
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopRequest:
        # Python only lets the main thread install handlers; elsewhere signals keep their default.
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
