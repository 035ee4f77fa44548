"""The Trainer's saving and restoring: a checkpoint at any step, an exact resume from one,
and the run folder's files at the end (see ``diygpt.checkpointing`` for the layout and
``diygpt.resume`` for what a checkpoint holds).

A base class of :class:`diygpt.training.Trainer`, kept apart so that the loop reads on its
own; it uses the attributes the Trainer's ``__init__`` sets (``cfg``, ``history``, ``model``,
``optimizer``, ``train_loader``, ``parallel``, ``precision``, ``is_main``, ``run_state``,
``base_lrs`` and the resume bookkeeping).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from diygpt.checkpointing import (
    atomic_write,
    ckpt_name,
    describe_os_error,
    lock_run_folder,
    own_file,
)
from diygpt.checkpoints import load_into, save_run, save_run_links, unwrap_model
from diygpt.errors import CheckpointError
from diygpt.resume import (
    LoadedCheckpoint,
    ResumePoint,
    capture_rng,
    history_state,
    restore_history,
    restore_rng,
    skip_batches,
    write_training_checkpoint,
)

_T = TypeVar("_T")


class TrainerState:
    """Checkpoints and resume for the Trainer's loop (see the module's docstring)."""

    @property
    def _loader_generator(self) -> torch.Generator | None:
        # The book's loop takes any iterable of batches; only a DataLoader has a generator.
        return getattr(self.train_loader, "generator", None)

    def _epoch_batches(self):
        """This epoch's batch iterator; on resume, positioned where the checkpoint was taken."""
        point, self._resume_point = self._resume_point, None
        if point is not None:
            restore_rng(point.epoch_rng, self._loader_generator)
        self._epoch_rng = capture_rng(self._loader_generator)
        self._epoch_end_done = self._epoch_finished = False
        batches = iter(self.train_loader)
        self.batch_in_epoch = 0
        if point is not None and point.step_rng is not None:  # None: at the epoch's start
            skip_batches(batches, point.batch)
            self.batch_in_epoch = point.batch
            restore_rng(point.step_rng, self._loader_generator)
        return batches

    def training_state(self) -> dict:
        metrics = Path(self.cfg.out_dir or ".") / "metrics.jsonl"
        return {**self.run_state, **history_state(self.history, self.base_lrs, metrics)}

    def save_checkpoint(self) -> Path | None:
        """Write ``out_dir/ckpt-<step>`` atomically (once per step) and return it.

        Under torchrun every rank must call this (FSDP gathers); only rank 0 writes, and the
        other ranks get None.
        """
        step = self.history.global_step
        # Once per step, unless the epoch has run out of batches since: a --save-every save on
        # an epoch's last step comes before its sample, and a final checkpoint left at that
        # would resume by printing the sample again. (A --max-steps stop part-way through an
        # epoch keeps the save from before its sample: a longer resume goes on in the epoch
        # and records what an unbroken run records.)
        if self._saved_step == step and self._saved_finished == self._epoch_finished:
            return self.last_checkpoint
        model, optimizer = self._full_model_and_optimizer()
        written = self.on_main(lambda: self._write_checkpoint(step, model, optimizer))
        # The other ranks know its name, for their messages.
        self.last_checkpoint = written or Path(self.cfg.out_dir) / ckpt_name(step)
        self._saved_step, self._saved_finished = step, self._epoch_finished
        return written

    def _write_checkpoint(self, step: int, model: nn.Module,
                          optimizer: torch.optim.Optimizer) -> Path:
        point = ResumePoint(
            self.epoch, self.batch_in_epoch, self._epoch_rng,
            capture_rng(self._loader_generator),
        )
        state = {"config": unwrap_model(self.model).cfg.to_dict(), **self.training_state(),
                 "epoch_end_done": self._epoch_end_done, "epoch_finished": self._epoch_finished,
                 "total_steps": self.total_steps()}  # a cosine schedule's length, for resume
        if self.precision.scaler is not None:  # fp16: its loss scale, so resume is exact
            state["grad_scaler"] = self.precision.scaler.state_dict()
        return write_training_checkpoint(
            self.cfg.out_dir, step, model, optimizer, state, point, self.cfg.keep_last
        )

    def on_main(self, write: Callable[[], _T]) -> _T | None:
        """``write()`` on rank 0 only; under torchrun every rank calls this, and all stop
        together if it fails (see :meth:`diygpt.distributed.Parallel.on_main`)."""
        if self.parallel is None:
            return write()
        return self.parallel.on_main(write)

    def load_checkpoint(self, ckpt: LoadedCheckpoint) -> None:
        """Restore weights, optimizer, schedule, counters and history; fit() then continues."""
        state, h = ckpt.state, self.history
        try:
            if self.parallel is not None and self.parallel.sharded:
                from diygpt.fsdp import load_full_state  # a collective under FSDP

                load_full_state(self.model, self.optimizer, ckpt.weights, ckpt.optimizer)
            else:
                load_into(self.model, ckpt.weights, str(ckpt.folder))
                self.optimizer.load_state_dict(ckpt.optimizer)
            self.base_lrs, metrics_bytes = restore_history(h, state)
            if self.precision.scaler is not None and "grad_scaler" in state:
                self.precision.scaler.load_state_dict(state["grad_scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{ckpt.folder}: damaged training state ({exc})") from None
        point = ckpt.point
        # A --max-steps stop part-way through an epoch ran the epoch's end (its sample): a
        # resume that takes no step there does not run it again.
        self._end_ran_before_resume = bool(state.get("epoch_end_done"))
        self._epoch_end_done = self._end_ran_before_resume
        self._epoch_finished = bool(state.get("epoch_finished"))
        if state.get("epoch_finished"):
            # Taken after the epoch's last batch and its sample: go on with the next epoch,
            # from the RNG state the next epoch would have started with.
            point = ResumePoint(point.epoch + 1, 0, point.step_rng, None)
        self.epoch = point.epoch
        self._resume_point = point
        self.last_checkpoint, self._saved_step = ckpt.folder, h.global_step
        self._saved_finished = self._epoch_finished
        if self.cfg.out_dir is not None:
            self.on_main(lambda: self._cut_metrics(metrics_bytes))

    def _cut_metrics(self, size: int) -> None:
        """Drop the metrics written after the checkpoint by the run that was killed."""
        metrics = Path(self.cfg.out_dir) / "metrics.jsonl"
        if not metrics.is_file():
            return
        self._hold_run_folder()  # not while another run writes there
        try:
            own_file(metrics)
            with open(metrics, "r+b") as f:
                f.truncate(min(size, metrics.stat().st_size))
        except OSError as exc:  # a read-only run folder: one line, as a fresh run's
            raise CheckpointError(describe_os_error(exc, metrics)) from None

    def _hold_run_folder(self) -> None:
        """Lock the run folder (rank 0) before the run's first write there, once; fit()
        lets it go after its last. A lock taken before a check that fails would outlive
        the check's error, so callers take it after their checks."""
        if self._lock is None:
            self._lock = lock_run_folder(self.cfg.out_dir)

    def start_optimizer_from(self, state: dict) -> None:
        """AdamW's moments and step counts from ``--init-from``'s source (the book's layout,
        see :func:`diygpt.book_export.book_optimizer_state`); this run's own lr, betas and
        weight decay stay. A padded head's extra rows start at zero, as their gradients are."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        moments = {index: {key: _pad_rows(value, params[index]) for key, value in per.items()}
                   for index, per in state["state"].items()}
        full = {"state": moments, "param_groups": self.optimizer.state_dict()["param_groups"]}
        if self.parallel is not None and self.parallel.sharded:
            from diygpt.fsdp import load_full_state  # a collective under FSDP

            load_full_state(self.model, self.optimizer, None, full)
        else:
            self.optimizer.load_state_dict(full)

    def _finish(self) -> None:
        c, h = self.cfg, self.history
        if c.out_dir is None:
            return
        # The final checkpoint (the same step on every rank) holds the weights and optimizer
        # state already: no second gather under FSDP, and links rather than new files.
        linked = self._saved_step == h.global_step
        model, optimizer = (None, None) if linked else self._full_model_and_optimizer()
        self.on_main(lambda: self._write_run(linked, model, optimizer))

    def _write_run(self, linked: bool, model: nn.Module | None,
                   optimizer: torch.optim.Optimizer | None) -> None:
        c, h = self.cfg, self.history
        if h.train_losses:
            # Imported here: matplotlib adds ~30 MB that the training steps should not carry.
            from diygpt.plotting import PLOT_DPI, plot_losses

            # The book's axis, linspace(0, num_epochs, n), ending where the run stopped: a
            # --max-steps or signal stop part-way through an epoch is not a whole epoch.
            batches = len(self.train_loader) if hasattr(self.train_loader, "__len__") else 0
            epochs = (h.global_step + 1) / batches if batches else max(h.epochs_done, 1)
            epochs_seen = torch.linspace(0, epochs, len(h.train_losses)).tolist()
            fig = plot_losses(epochs_seen, h.track_tokens_seen, h.train_losses, h.val_losses,
                              path=None)
            # Through a temp file: a full disk keeps a resumed run's old plot whole and is
            # one line, not a traceback.
            atomic_write(Path(c.out_dir) / "loss.png",
                         lambda tmp: fig.savefig(tmp, format="png", dpi=PLOT_DPI))
        state = {
            **self.run_state,
            "global_step": h.global_step,
            "tokens_seen": h.tokens_seen,
            "epochs_done": h.epochs_done,
        }
        if linked:
            save_run_links(c.out_dir, self.last_checkpoint, unwrap_model(self.model).cfg, state)
        else:
            save_run(c.out_dir, model, optimizer, state)

    def _full_model_and_optimizer(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The whole state for saving; under FSDP a collective that every rank must join."""
        if self.parallel is None:
            return self.model, self.optimizer
        return self.parallel.full_model_and_optimizer(self.model, self.optimizer)


def _pad_rows(value: Any, param: torch.Tensor) -> Any:
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape == param.shape:
        return value
    padded = value.new_zeros(param.shape)
    padded[: value.shape[0]] = value
    return padded
