"""What an exact resume needs beyond weights: RNG states, the data position, the counters.

The loop draws random numbers in three places: dropout, each ``iter()`` of a shuffling
DataLoader (the RandomSampler takes its seed from the global torch RNG, and the loop's
evaluation iterates the train loader again), and sampling. So a checkpoint stores two RNG
snapshots: one taken at the start of the epoch, before ``iter(train_loader)``, which
reproduces the epoch's shuffle order, and one taken at the checkpoint step. Resuming restores
the first, re-creates the iterator, skips the consumed batches through the sampler (no data is
loaded), then restores the second. Everything is stored as tensors (safetensors) and JSON:
no pickle.
"""

from __future__ import annotations

import os
import random
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diygpt.checkpointing import (
    CKPT_PREFIX,
    atomic_write,
    latest_checkpoint,
    link_or_copy,
    list_checkpoints,
    save_checkpoint,
    special_kind,
    write_json,
)
from diygpt.checkpoints import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    load_state_dict_file,
    model_state_for_saving,
    read_run_state,
    safe_torch_load,
)
from diygpt.errors import CheckpointError

RNG_FILE = "rng.safetensors"

# (tensors for rng.safetensors, JSON-able scalars) for one RNG snapshot
RngState = tuple[dict[str, torch.Tensor], dict[str, Any]]


def capture_rng(loader_generator: torch.Generator | None = None) -> RngState:
    """Snapshot torch CPU and CUDA, Python and numpy RNGs (reading them draws nothing)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    if loader_generator is not None:
        tensors["loader"] = loader_generator.get_state()
    version, internal, gauss = random.getstate()
    tensors["python"] = torch.tensor(internal, dtype=torch.int64)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    scalars = {
        "python": [version, gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)],
    }
    return tensors, scalars


def restore_rng(state: RngState, loader_generator: torch.Generator | None = None) -> None:
    tensors, scalars = state
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if loader_generator is not None and "loader" in tensors:
        loader_generator.set_state(tensors["loader"])
    version, gauss = scalars["python"]
    random.setstate((version, tuple(tensors["python"].tolist()), gauss))
    kind, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def skip_batches(iterator, n: int) -> None:
    """Advance a DataLoader iterator by ``n`` batches, through the sampler when possible.

    A single-process iterator draws indices lazily, so skipping indices skips the batches
    without loading them; a multi-process one has already queued indices, so it must fetch.
    """
    fast = type(iterator).__name__ == "_SingleProcessDataLoaderIter"
    for _ in range(n):
        if fast:
            iterator._next_index()
            iterator._num_yielded += 1
        else:
            next(iterator)


@dataclass
class ResumePoint:
    """Where a checkpoint was taken: batches consumed in ``epoch`` and both RNG snapshots."""

    epoch: int
    batch: int
    epoch_rng: RngState
    step_rng: RngState | None  # None: the point is an epoch's start, before any batch


def _split_rng(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def write_training_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    point: ResumePoint,
    keep_last: int,
) -> Path:
    """One ``ckpt-<step>`` folder (weights, optimizer, RNG, state.json), written atomically."""
    tensors = {f"epoch.{k}": v for k, v in point.epoch_rng[0].items()}
    tensors |= {f"step.{k}": v for k, v in point.step_rng[0].items()}
    state = {
        **state,
        "resume": {
            **state.get("resume", {}), "epoch": point.epoch, "batch": point.batch,
            "epoch_rng": point.epoch_rng[1], "step_rng": point.step_rng[1],
        },
    }
    weights = model_state_for_saving(model)
    opt_state = optimizer.state_dict()

    def write_files(folder: Path) -> None:
        atomic_write(folder / MODEL_FILE, lambda t: save_file(weights, str(t), {"format": "pt"}))
        atomic_write(folder / OPTIMIZER_FILE, lambda t: torch.save(opt_state, t))
        atomic_write(folder / RNG_FILE, lambda t: save_file(tensors, str(t)))
        write_json(folder / STATE_FILE, state)  # last: a folder with state.json is whole

    folder = save_checkpoint(run_dir, step, write_files, keep_last)
    # The run folder's own files follow, so `diygpt generate --checkpoint RUN` sees new weights
    # and `diygpt export --optimizer` their AdamW state, whatever ended the run.
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        link_or_copy(folder / name, Path(run_dir) / name)
    write_json(Path(run_dir) / STATE_FILE, {k: v for k, v in state.items() if k != "resume"})
    return folder


@dataclass
class LoadedCheckpoint:
    folder: Path
    state: dict[str, Any]
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    point: ResumePoint


def read_training_checkpoint(folder: str | os.PathLike) -> LoadedCheckpoint:
    """Read a ``ckpt-<step>`` folder; any damage is a one-line CheckpointError."""
    folder = Path(folder)
    state = read_run_state(folder)
    info = state.get("resume")
    if not isinstance(info, dict) or not {"epoch", "batch", "epoch_rng", "step_rng"} <= set(info):
        raise CheckpointError(f"{folder / STATE_FILE}: no resume information")
    weights = load_state_dict_file(folder / MODEL_FILE)
    opt_path = folder / OPTIMIZER_FILE
    if not opt_path.is_file():
        raise CheckpointError(f"{opt_path}: missing")
    opt_state = safe_torch_load(opt_path)
    if not isinstance(opt_state, dict) or "state" not in opt_state:
        raise CheckpointError(f"{opt_path}: not an optimizer state dict")
    try:
        tensors = load_file(str(folder / RNG_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / RNG_FILE}: cannot read ({exc})") from None
    try:
        point = ResumePoint(
            epoch=int(info["epoch"]), batch=int(info["batch"]),
            epoch_rng=(_split_rng(tensors, "epoch."), info["epoch_rng"]),
            step_rng=(_split_rng(tensors, "step."), info["step_rng"]),
        )
        size = torch.get_rng_state().numel()
        for snapshot in (point.epoch_rng, point.step_rng):
            if snapshot[0]["torch"].numel() != size or len(snapshot[1]["numpy"]) != 4:
                raise ValueError("bad RNG state")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder}: damaged resume information ({exc})") from None
    return LoadedCheckpoint(folder, state, weights, opt_state, point)


def find_resume_checkpoint(run_dir: str | os.PathLike) -> Path:
    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise CheckpointError(f"{run} is {special_kind(run) or 'a file'}: --resume takes the "
                              "run folder (--out)")
    if not run.is_dir():
        raise CheckpointError(f"{run}: no such run folder to resume")
    if run.name.startswith(CKPT_PREFIX) and latest_checkpoint(run.parent) is not None:
        # A resume goes on in its run folder, from the newest checkpoint: from an older
        # one it would write over what came after.
        raise CheckpointError(
            f"{run} is one checkpoint of the run {run.parent}: --resume takes the run folder "
            f"(it goes on from the newest checkpoint); to start a new run from {run.name}'s "
            f"weights, use --init-from {run}"
        )
    found = latest_checkpoint(run)
    if found is None:
        raise CheckpointError(
            f"{run}: no checkpoint to resume from (a run that took a step saves one at its "
            "end, every --save-every N steps, and on Ctrl-C or SIGTERM; an --epochs 0 run "
            "saves none)"
        )
    return found


def check_fresh_run_folder(out: str | os.PathLike) -> None:
    """Refuse an ``--out`` for a new run where one would write over something kept there."""
    if list_checkpoints(out):
        raise CheckpointError(
            f"{out} already holds checkpoints; continue it with --resume "
            f"{shlex.quote(str(out))}, or choose another --out"
        )
    if (Path(out) / STATE_FILE).is_file():
        # Final files without a checkpoint: an --epochs 0 run, or one from a diygpt that
        # ended runs without a checkpoint. Nothing to resume; not to overwrite.
        raise CheckpointError(f"{out} already holds a run with no checkpoint to resume; "
                              "choose another --out")
    if held := [n for n in (MODEL_FILE, OPTIMIZER_FILE) if (Path(out) / n).exists()]:
        # Not a run's (it would have state.json): a download folder, say, or weights copied
        # in by hand; the run's files would replace them.
        raise CheckpointError(f"{out} holds {held[0]} but is not a diygpt run; a run there "
                              "would write over it: choose another --out")


def history_state(history, base_lrs: list[float], metrics: Path) -> dict[str, Any]:
    """The counters, loss history and schedule a resume needs, as JSON-ready values.

    ``metrics_bytes`` lets a resume cut metrics.jsonl back to what it held at this step.
    """
    h = history
    return {
        "global_step": h.global_step, "tokens_seen": h.tokens_seen, "epochs_done": h.epochs_done,
        "resume": {
            "base_lrs": base_lrs,
            "metrics_bytes": metrics.stat().st_size if metrics.is_file() else 0,
            "history": {
                "train_losses": h.train_losses, "val_losses": h.val_losses,
                "track_tokens_seen": h.track_tokens_seen, "steps": h.steps,
            },
        },
    }


def restore_history(history, state: dict[str, Any]) -> tuple[list[float], int]:
    """Fill ``history`` from :func:`history_state`'s output; returns (base_lrs, metrics_bytes).

    Raises KeyError, TypeError or ValueError on a damaged state.
    """
    info = state["resume"]
    for key, values in info["history"].items():
        # a nan loss (an empty validation split) is written as null
        setattr(history, key, [float("nan") if v is None else v for v in values])
    history.global_step = int(state["global_step"])
    history.tokens_seen = int(state["tokens_seen"])
    history.epochs_done = int(state["epochs_done"])
    return [float(x) for x in info["base_lrs"]], int(info["metrics_bytes"])
