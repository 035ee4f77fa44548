"""Settings of a training run, validated, and the record of its progress."""

from __future__ import annotations

from dataclasses import dataclass, field

from diygpt.errors import ConfigError

NAN_POLICIES = ("stop", "skip")


@dataclass
class TrainConfig:
    """What :class:`diygpt.training.Trainer` does beyond the book's loop (whose arguments
    are the first four fields); validated when made, each error one line."""

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
    save_every: int | None = None  # checkpoint every N steps into out_dir/ckpt-<step>
    keep_last: int = 2
    nan_policy: str = "stop"  # a non-finite loss or grad norm: "stop" or "skip" the step
    # AdamW stepped inside backward (see optim_in_backward): None = where exact, on the CPU
    optim_in_backward: bool | None = None

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
        if not 0 <= self.min_lr < float("inf"):
            raise ConfigError(f"min-lr must be a finite number >= 0, got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.save_every is not None and (self.save_every <= 0 or self.out_dir is None):
            raise ConfigError("save-every must be positive and needs an output folder")
        if self.keep_last <= 0:
            raise ConfigError(f"keep-last must be positive, got {self.keep_last}")
        if self.nan_policy not in NAN_POLICIES:
            raise ConfigError(f"nan-policy must be one of {', '.join(NAN_POLICIES)}")


@dataclass
class History:
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    track_tokens_seen: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    global_step: int = -1
    tokens_seen: int = 0
    epochs_done: int = 0
