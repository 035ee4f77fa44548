"""The book's pretraining loop (``train_model_simple``), with opt-in extras.

With the defaults each step computes the book's numbers to the bit: zero_grad, loss,
backward, step (on the CPU, AdamW updates each parameter inside backward, once its
gradient is complete, with the same arithmetic: see diygpt.optim_in_backward); every
``eval_freq`` steps the mean loss of ``eval_iter`` train and validation batches; after each
epoch a 50-token greedy sample. The extras (max_steps, warmup + cosine, gradient clipping,
gradient accumulation, run-folder outputs, a progress bar) change nothing unless asked for.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from diygpt.checkpointing import check_writable, describe_os_error, json_ready
from diygpt.checkpoints import unwrap_model
from diygpt.errors import CheckpointError, TrainingError
from diygpt.evaluation import evaluate_model, format_eval_line, sample_text
from diygpt.losses import LossFn, calc_loss_batch, token_cross_entropy
from diygpt.optim_in_backward import OptimInBackward, attached
from diygpt.precision import Precision
from diygpt.resume import (
    ResumePoint,
    capture_rng,
)
from diygpt.schedule import lr_at_step
from diygpt.signals import Interrupted, StopRequest
from diygpt.speed import SpeedMeter
from diygpt.step_guard import StepGuard
from diygpt.train_config import History, TrainConfig
from diygpt.trainer_state import TrainerState

if TYPE_CHECKING:
    from diygpt.distributed import Parallel

class Trainer(TrainerState):
    """Runs the loop; the model is passed in plain (or already wrapped) and never modified."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader,
        val_loader,
        device: torch.device | str,
        cfg: TrainConfig,
        tokenizer=None,
        log: Callable[[str], None] | None = None,
        run_state: dict | None = None,
        parallel: Parallel | None = None,
        precision: Precision | None = None,
        meter: SpeedMeter | None = None,
        loss_fn: LossFn = token_cross_entropy,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn  # (logits, targets) -> mean loss; compiled under --compile
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.device = device
        self.cfg = cfg
        self.tokenizer = tokenizer
        self._log = log
        self.history = History()
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.run_state = run_state or {}
        self._bar: tqdm | None = None
        self.epoch = 0
        self.batch_in_epoch = 0  # batches consumed in the current epoch
        self._epoch_rng = capture_rng()  # RNG before this epoch's iter(train_loader)
        self._resume_point: ResumePoint | None = None
        self.last_checkpoint: Path | None = None
        self._saved_step: int | None = None
        self._saved_finished = False  # whether that save came after its epoch's last batch
        # This epoch's end (the sample) is done, and it also ran out of batches: a checkpoint
        # taken now resumes without ending the epoch again (in the next one if finished).
        self._epoch_end_done = False
        self._epoch_finished = False
        self._end_ran_before_resume = False  # set from a checkpoint; for the first epoch only
        self._stop = StopRequest()
        # Under torchrun (see distributed.py): how batches split across ranks, and who writes.
        self.parallel = parallel
        self.is_main = parallel is None or parallel.is_main
        # fp32 (the default) is the book's plain backward and step; see diygpt.precision.
        self.precision = precision or Precision(device)
        # Only with a meter does the eval line get tok/s (and MFU) appended.
        self.meter = meter
        self.in_backward: OptimInBackward | None = None  # fit() sets it where it applies
        self.skipped_steps = 0  # by --nan-policy skip, in this process
        self._lock: IO[str] | None = None  # out_dir's, rank 0's from its first write there
        self._guard = StepGuard(optimizer, self.precision,
                                sharded=parallel is not None and parallel.sharded)

    # -- output --------------------------------------------------------------------------
    def log(self, line: str) -> None:
        if not self.is_main:
            return
        if self._log is not None:
            self._log(line)
            return
        try:
            if self._bar is not None:
                self._bar.write(line, file=sys.stdout)
            else:
                print(line, flush=True)
        except OSError as exc:
            # `diygpt train | head`: the reader left; `> train.log` on a full disk: hours of
            # training are worth more than the log. The run goes on; metrics.jsonl keeps it.
            if not isinstance(exc, BrokenPipeError):
                sys.stderr.write(f"diygpt: warning: cannot write the log to the standard "
                                 f"output ({exc.strerror or exc}); the run goes on without it\n")
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)

    def _write_metrics(self, record: dict) -> None:
        """Append ``record`` to metrics.jsonl (rank 0; under torchrun every rank calls this,
        so that a failed write stops them all)."""
        if self.cfg.out_dir is None:
            return
        self.on_main(lambda: self._append_metrics(record))

    def _append_metrics(self, record: dict) -> None:
        path = Path(self.cfg.out_dir) / "metrics.jsonl"
        try:
            with open(path, "a") as f:
                f.write(json.dumps(json_ready(record)) + "\n")
        except OSError as exc:
            raise CheckpointError(describe_os_error(exc, path)) from None

    def total_steps(self) -> int:
        total = len(self.train_loader) * self.cfg.num_epochs
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    # -- one optimizer step ----------------------------------------------------------------
    def _set_lr(self, step: int) -> float:
        c = self.cfg
        if c.warmup_steps == 0 and not c.cosine:
            return self.base_lrs[0]
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = lr_at_step(step, base, c.warmup_steps, self.total_steps(), c.min_lr, c.cosine)
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, input_batch: torch.Tensor, target_batch: torch.Tensor) -> torch.Tensor:
        """One optimizer step; its loss (on the device) goes to :meth:`finish_step` next."""
        self.optimizer.zero_grad()
        if self.parallel is not None:
            loss = self.parallel.forward_backward(
                self.model, input_batch, target_batch, self.cfg.grad_accum, self.device,
                self.precision, self.loss_fn,
            )
        elif self.cfg.grad_accum == 1:
            with self.precision.autocast():
                loss = calc_loss_batch(input_batch, target_batch, self.model, self.device,
                                       self.loss_fn)
            if self.in_backward is not None:  # AdamW steps inside backward: optim_in_backward.py
                return self.in_backward.step(loss, self._non_finite)
            self.precision.backward(loss)
        else:
            # Weight each micro-batch by its rows so the sum is the full batch's mean loss.
            rows = input_batch.shape[0]
            loss = torch.zeros((), device=self.device)
            for xs, ys in zip(
                input_batch.chunk(self.cfg.grad_accum),
                target_batch.chunk(self.cfg.grad_accum),
                strict=True,
            ):
                with self.precision.autocast():
                    part = calc_loss_batch(xs, ys, self.model, self.device, self.loss_fn)
                    part = part * (xs.shape[0] / rows)
                self.precision.backward(part)
                loss = loss + part.detach()
        self.precision.unscale(self.optimizer)  # fp16: true gradient sizes before the norm
        if self.cfg.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        else:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads)
        # Checked before the update, so a bad step never reaches the weights: step_guard.py.
        self._guard.step(loss.detach(), grad_norm, self._non_finite)
        return loss.detach()

    def finish_step(self, loss: torch.Tensor) -> float:
        """The step's loss as a number (which waits for it), and the report of a bad step
        that fused AdamW skipped on the device."""
        value = loss.item()
        self._guard.check(self._non_finite)
        return value

    def _non_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor, partial: bool = False) -> None:
        step = self.history.global_step + 1
        what = (
            f"non-finite loss ({loss.item()})" if not torch.isfinite(loss)
            else f"non-finite gradient norm ({grad_norm.item()})"
        )
        if self.cfg.nan_policy == "skip":
            self.skipped_steps += 1
            if self.is_main:  # every rank skips the step; one says so
                sys.stderr.write(f"diygpt: warning: {what} at step {step}; step skipped\n")
            return
        if self.last_checkpoint:
            # --resume keeps the run's --lr and --grad-clip: a new run from the checkpoint
            # may change them.
            data = self.run_state.get("train_args", {}).get("data") or ["DATA"]
            todo = (f"the last good checkpoint is {self.last_checkpoint}; go on from it in a "
                    f"new run with a lower learning rate or gradient clipping (diygpt train "
                    f"--init-from {shlex.quote(str(self.last_checkpoint))} --data "
                    f"{shlex.join(data)} --lr LOWER --grad-clip 1.0 --out NEW) or skip such "
                    f"steps (diygpt train --resume {shlex.quote(str(self.cfg.out_dir))} "
                    "--nan-policy skip)")
        else:
            todo = ("no checkpoint was saved (use --save-every N); try a lower learning rate, "
                    "gradient clipping, or skipping such steps (diygpt train --lr, --grad-clip, "
                    "--nan-policy skip)")
        raise TrainingError(
            f"{what} at step {step} (epoch {self.epoch + 1}); stopped before updating the "
            f"{'weights that backward had not reached' if partial else 'weights'}; {todo}; "
            "in Python: the optimizer's lr, TrainConfig's grad_clip and nan_policy"
        )

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> History:
        try:
            return self._fit()
        finally:  # after the run's last writes (_finish), however it ends
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def _fit(self) -> History:
        c, h = self.cfg, self.history
        if c.out_dir is not None:
            self.on_main(self._start_run_folder)
        self._bar = tqdm(
            total=self.total_steps(), initial=h.global_step + 1, desc="train", unit="step",
            file=sys.stderr, disable=None if c.progress and self.is_main else True,
            dynamic_ncols=True,
        )
        t0, tokens0 = time.perf_counter(), h.tokens_seen
        start_epoch = self._resume_point.epoch if self._resume_point else 0
        try:
            with self._stop, attached(self):
                for epoch in range(start_epoch, c.num_epochs):
                    point = self._resume_point
                    at_start = point is None or point.step_rng is None
                    if at_start and c.max_steps is not None and h.global_step + 1 >= c.max_steps:
                        break  # a resume with no step left: no epoch to begin (or end)
                    self.epoch = epoch
                    self.model.train()
                    if self.parallel is not None:
                        self.parallel.sync_rng()
                    finished, stepped = True, False
                    for input_batch, target_batch in self._epoch_batches():
                        if c.max_steps is not None and h.global_step + 1 >= c.max_steps:
                            finished = False
                            break
                        stepped = True
                        lr = self._set_lr(h.global_step + 1)
                        if self.meter is not None:
                            self.meter.start()
                        loss = self.finish_step(self.train_step(input_batch, target_batch))
                        h.tokens_seen += input_batch.numel()
                        h.global_step += 1
                        self.batch_in_epoch += 1
                        self._bar.update(1)
                        self._bar.set_postfix(
                            loss=f"{loss:.3f}",
                            tok_s=f"{(h.tokens_seen - tokens0) / (time.perf_counter() - t0):.0f}",
                        )
                        if self.meter is not None:  # after finish_step, which waits for the GPU
                            self.meter.stop(input_batch.numel())
                        if h.global_step % c.eval_freq == 0:
                            self._evaluate(epoch, lr)
                        self._after_step()
                    h.epochs_done = epoch + 1
                    if stepped or not self._end_ran_before_resume:  # not twice for no step
                        self._end_of_epoch(epoch)
                    self._end_ran_before_resume = False
                    self._epoch_end_done, self._epoch_finished = True, finished
                    if c.max_steps is not None and h.global_step + 1 >= c.max_steps:
                        break
                # The final state, so that `--resume` can extend any run (the run folder's
                # weights and optimizer state are links to it, not a second copy), and so
                # that a resumed run's next resume does not go back to an older checkpoint.
                if c.out_dir is not None and h.global_step >= 0:
                    self.save_checkpoint()
        finally:
            self._bar.close()
            self._bar = None
        self._finish()
        return h

    def _start_run_folder(self) -> None:
        check_writable(self.cfg.out_dir)
        for name in ("metrics.jsonl", "loss.png"):  # found at the end, after all the training
            if (Path(self.cfg.out_dir) / name).is_dir():
                raise CheckpointError(f"{Path(self.cfg.out_dir) / name} is a folder, where the run "
                                      "writes a file: move it, or choose another --out")
        self._hold_run_folder()
        if self._resume_point is None:
            # A fresh run: not after the lines of one that died before its first save.
            (Path(self.cfg.out_dir) / "metrics.jsonl").unlink(missing_ok=True)

    def _after_step(self) -> None:
        step = self.history.global_step
        if self.cfg.save_every is not None and (step + 1) % self.cfg.save_every == 0:
            self.save_checkpoint()
        signum = self._stop.signum
        if self.parallel is not None:
            signum = self.parallel.agreed_signal(signum)
        if signum is not None:
            ckpt = self.save_checkpoint() if self.cfg.out_dir is not None else None
            self._finish()  # the run folder as a finished run leaves it: plot, links, state
            raise Interrupted(signum, step, str(ckpt) if ckpt else None)

    def _evaluate(self, epoch: int, lr: float) -> None:
        h = self.history
        with self.precision.autocast():
            if self.parallel is not None:
                train_loss, val_loss = self.parallel.evaluate(
                    self.model, self.train_loader, self.val_loader, self.cfg.eval_iter
                )
            else:
                train_loss, val_loss = evaluate_model(
                    self.model, self.train_loader, self.val_loader, self.device,
                    self.cfg.eval_iter,
                )
        h.train_losses.append(train_loss)
        h.val_losses.append(val_loss)
        h.track_tokens_seen.append(h.tokens_seen)
        h.steps.append(h.global_step)
        line = format_eval_line(epoch + 1, h.global_step, train_loss, val_loss)
        self.log(line + (self.meter.report() if self.meter is not None else ""))
        self._write_metrics({
            "step": h.global_step, "epoch": epoch + 1, "train_loss": train_loss,
            "val_loss": val_loss, "tokens_seen": h.tokens_seen, "lr": lr,
        })

    def _end_of_epoch(self, epoch: int) -> None:
        if self.tokenizer is None or not self.cfg.start_context:
            return
        text = None  # under DDP, rank 0's alone; every rank joins the write below
        if self.parallel is None or self.parallel.runs_sample():
            text = sample_text(
                unwrap_model(self.model), self.tokenizer, self.device, self.cfg.start_context,
                self.cfg.sample_tokens,
            )
            self.log(text)
        self._write_metrics({"epoch": epoch + 1, "step": self.history.global_step, "sample": text})



def train_model_simple(
    model: nn.Module,
    train_loader,
    val_loader,
    optimizer: torch.optim.Optimizer,
    device,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    start_context: str,
    tokenizer,
) -> tuple[list[float], list[float], list[int]]:
    """The book's function: returns (train_losses, val_losses, track_tokens_seen).

    The weights come out as the book's loop makes them. On the CPU, AdamW steps each
    parameter inside backward as soon as its gradient is complete, which keeps fewer
    gradients in memory at once (``diygpt.optim_in_backward``, bit-identical), so ``p.grad``
    is None afterwards; ``Trainer`` with ``TrainConfig(optim_in_backward=False)`` keeps them.
    """
    cfg = TrainConfig(
        num_epochs=num_epochs, eval_freq=eval_freq, eval_iter=eval_iter,
        start_context=start_context, progress=False,
    )
    h = Trainer(model, optimizer, train_loader, val_loader, device, cfg, tokenizer).fit()
    return h.train_losses, h.val_losses, h.track_tokens_seen
