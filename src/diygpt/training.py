"""The book's pretraining loop (``train_model_simple``), with opt-in extras.

With the defaults each step is exactly the book's: zero_grad, loss, backward, step; every
``eval_freq`` steps the mean loss of ``eval_iter`` train and validation batches; after each
epoch a 50-token greedy sample. The extras (max_steps, warmup + cosine, gradient clipping,
gradient accumulation, run-folder outputs, a progress bar) change nothing unless asked for.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from diygpt.checkpoints import save_run, unwrap_model
from diygpt.errors import ConfigError
from diygpt.generation import generate_text_simple
from diygpt.losses import calc_loss_batch, calc_loss_loader
from diygpt.plotting import plot_losses
from diygpt.precision import Precision
from diygpt.schedule import lr_at_step
from diygpt.speed import SpeedMeter
from diygpt.tokenizer import text_to_token_ids, token_ids_to_text


@dataclass
class TrainConfig:
    num_epochs: int = 10
    eval_freq: int = 5
    eval_iter: int = 5
    start_context: str | None = "Every effort moves you"
    sample_tokens: int = 50
    max_steps: int | None = None
    warmup_steps: int = 0
    cosine: bool = False
    min_lr: float = 0.0
    grad_clip: float | None = None
    grad_accum: int = 1
    out_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.num_epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.num_epochs}")
        if self.eval_freq <= 0 or self.eval_iter <= 0:
            raise ConfigError("eval-freq and eval-iter must be positive")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"max-steps must be positive, got {self.max_steps}")
        if self.grad_accum <= 0:
            raise ConfigError(f"grad-accum must be positive, got {self.grad_accum}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad-clip must be positive, got {self.grad_clip}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup-steps must be >= 0, got {self.warmup_steps}")


@dataclass
class History:
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    track_tokens_seen: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    global_step: int = -1
    tokens_seen: int = 0
    epochs_done: int = 0


def evaluate_model(
    model: nn.Module, train_loader, val_loader, device, eval_iter: int
) -> tuple[float, float]:
    """Mean loss of the first ``eval_iter`` batches of each loader, in eval mode."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def sample_text(
    model: nn.Module, tokenizer, device, start_context: str, max_new_tokens: int = 50
) -> str:
    """The book's greedy epoch sample, newlines shown as spaces."""
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    token_ids = generate_text_simple(model, encoded, max_new_tokens, context_size)
    model.train()
    return token_ids_to_text(token_ids, tokenizer).replace("\n", " ")


def generate_and_print_sample(model: nn.Module, tokenizer, device, start_context: str) -> None:
    print(sample_text(model, tokenizer, device, start_context))


def format_eval_line(epoch: int, step: int, train_loss: float, val_loss: float) -> str:
    return f"Ep {epoch} (Step {step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"


class Trainer:
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
        precision: Precision | None = None,
        meter: SpeedMeter | None = None,
    ) -> None:
        self.model = model
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
        # fp32 (the default) is the book's plain backward and step; see diygpt.precision.
        self.precision = precision or Precision(device)
        # Only with a meter does the eval line get tok/s (and MFU) appended.
        self.meter = meter

    # -- output --------------------------------------------------------------------------
    def log(self, line: str) -> None:
        if self._log is not None:
            self._log(line)
        elif self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def _write_metrics(self, record: dict) -> None:
        if self.cfg.out_dir is None:
            return
        with open(Path(self.cfg.out_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

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
        self.optimizer.zero_grad()
        if self.cfg.grad_accum == 1:
            with self.precision.autocast():
                loss = calc_loss_batch(input_batch, target_batch, self.model, self.device)
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
                    part = calc_loss_batch(xs, ys, self.model, self.device) * (xs.shape[0] / rows)
                self.precision.backward(part)
                loss = loss + part.detach()
        if self.cfg.grad_clip is not None:
            self.precision.unscale(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.precision.step(self.optimizer)
        return loss.detach()

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> History:
        c, h = self.cfg, self.history
        if c.out_dir is not None:
            Path(c.out_dir).mkdir(parents=True, exist_ok=True)
        self._bar = tqdm(
            total=self.total_steps(), desc="train", unit="step", file=sys.stderr,
            disable=None if c.progress else True, dynamic_ncols=True,
        )
        t0 = time.perf_counter()
        try:
            for epoch in range(c.num_epochs):
                self.model.train()
                for input_batch, target_batch in self.train_loader:
                    if c.max_steps is not None and h.global_step + 1 >= c.max_steps:
                        break
                    lr = self._set_lr(h.global_step + 1)
                    if self.meter is not None:
                        self.meter.start()
                    loss = self.train_step(input_batch, target_batch)
                    h.tokens_seen += input_batch.numel()
                    h.global_step += 1
                    self._bar.update(1)
                    self._bar.set_postfix(
                        loss=f"{loss.item():.3f}",
                        tok_s=f"{h.tokens_seen / (time.perf_counter() - t0):.0f}",
                    )
                    if self.meter is not None:  # after loss.item(), which waits for the GPU
                        self.meter.stop(input_batch.numel())
                    if h.global_step % c.eval_freq == 0:
                        self._evaluate(epoch, lr)
                h.epochs_done = epoch + 1
                self._end_of_epoch(epoch)
                if c.max_steps is not None and h.global_step + 1 >= c.max_steps:
                    break
        finally:
            self._bar.close()
            self._bar = None
        self._finish()
        return h

    def _evaluate(self, epoch: int, lr: float) -> None:
        h = self.history
        with self.precision.autocast():
            train_loss, val_loss = evaluate_model(
                self.model, self.train_loader, self.val_loader, self.device, self.cfg.eval_iter
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
        if self.tokenizer is not None and self.cfg.start_context:
            text = sample_text(  # the plain model: a compiled one would recompile per length
                unwrap_model(self.model), self.tokenizer, self.device, self.cfg.start_context,
                self.cfg.sample_tokens,
            )
            self.log(text)
            self._write_metrics({"epoch": epoch + 1, "step": self.history.global_step, "sample": text})

    def _finish(self) -> None:
        c, h = self.cfg, self.history
        if c.out_dir is None:
            return
        if h.train_losses:
            epochs_seen = torch.linspace(0, max(h.epochs_done, 1), len(h.train_losses)).tolist()
            plot_losses(
                epochs_seen, h.track_tokens_seen, h.train_losses, h.val_losses,
                Path(c.out_dir) / "loss.png",
            )
        state = {
            **self.run_state,
            "global_step": h.global_step,
            "tokens_seen": h.tokens_seen,
            "epochs_done": h.epochs_done,
        }
        save_run(c.out_dir, self.model, self.optimizer, state)


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
    """The book's function: returns (train_losses, val_losses, track_tokens_seen)."""
    cfg = TrainConfig(
        num_epochs=num_epochs, eval_freq=eval_freq, eval_iter=eval_iter,
        start_context=start_context, progress=False,
    )
    h = Trainer(model, optimizer, train_loader, val_loader, device, cfg, tokenizer).fit()
    return h.train_losses, h.val_losses, h.track_tokens_seen
