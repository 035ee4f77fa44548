"""Data-parallel (DDP) and sharded (FSDP2) training across processes started by ``torchrun``.

The model never sees any of this: the CLI wraps it here and hands the Trainer a ``Parallel``
strategy, which the Trainer asks for the few things that differ from one process:

* ``forward_backward``: each rank takes its contiguous share of every *global* batch
  (``--batch-size`` stays global), so the windows of a step are the same whatever the world
  size; micro-batches of ``--grad-accum`` skip the gradient all-reduce (``no_sync``) until
  the last one.
* ``evaluate``: eval batches are split the same way and the losses averaged across ranks.
* ``full_model_and_optimizer``: an FSDP model is gathered into a plain CPU model and
  optimizer on rank 0, so the run folder is the same one a single process writes and loads.
* ``is_main``: only rank 0 logs, writes metrics and checkpoints.

Each share is weighted by ``rows_on_rank * world / rows_in_batch`` before the ranks average
their gradients, so an uneven last batch (``--no-drop-last``) still yields the mean over the
global batch, exactly as one process computes it.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from diygpt.checkpoints import unwrap_model
from diygpt.device import select_device
from diygpt.errors import ConfigError, DiygptError
from diygpt.losses import LossFn, calc_loss_batch, token_cross_entropy
from diygpt.precision import Precision

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_T = TypeVar("_T")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: torchrun's RANK, WORLD_SIZE and LOCAL_RANK."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (even with one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        environ = os.environ if environ is None else environ
        if "RANK" not in environ or "WORLD_SIZE" not in environ:
            return cls()
        try:
            rank, world, local = (int(environ.get(k, "0")) for k in _TORCHRUN_VARS)
        except ValueError:
            found = ", ".join(f"{k}={environ.get(k)!r}" for k in _TORCHRUN_VARS)
            raise ConfigError(f"torchrun environment is not integers: {found}") from None
        if world < 1 or not 0 <= rank < world or local < 0:
            raise ConfigError(f"torchrun environment is inconsistent: RANK={rank}, WORLD_SIZE={world}")
        return cls(rank, world, local, launched=True)


class RankStopped(DiygptError):
    """Another rank met an error, printed there, and this one stops with it."""

    def __init__(self) -> None:
        super().__init__("the run stopped on another rank; that rank's error is above")


_AGREED = "_diygpt_every_rank_knows"


def every_rank_knows(exc: BaseException) -> bool:
    """Whether ``exc`` stopped every rank together (:meth:`Parallel.on_main`), so the group
    still works and each rank can say its line before any of them leaves it."""
    return isinstance(exc, RankStopped) or bool(getattr(exc, _AGREED, False))


def lost_peer(exc: BaseException) -> bool:
    """A collective that failed because another process left the group (it stopped on an
    error of its own and printed it), as gloo reports it. Other collective errors (an NCCL
    failure every rank meets, a timeout) are this rank's own to show. NCCL does not report a
    peer that left: the other ranks wait until torchrun stops them."""
    return isinstance(exc, RuntimeError) and any(
        mark in str(exc) for mark in ("Connection closed by peer", "Connection reset by peer"))


def backend_for(device: torch.device) -> str:
    """nccl between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(name: str | None, env: DistEnv) -> torch.device:
    """The device of this rank: its own GPU (``cuda:LOCAL_RANK``) under torchrun."""
    device = select_device(name)
    if not env.launched:
        return device
    if device.type == "mps":
        raise ConfigError("torch.distributed does not support mps; use --device cpu or cuda")
    if device.type == "cuda" and device.index is None:
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {env.local_rank} has no GPU: this node has "
                f"{torch.cuda.device_count()}; lower --nproc_per_node"
            )
        device = torch.device("cuda", env.local_rank)
    return device


def init_distributed(device_name: str | None = None) -> tuple[DistEnv, torch.device]:
    """Read torchrun's environment, pick this rank's device, and join the process group.

    Outside torchrun this is ``select_device`` and nothing else.
    """
    env = DistEnv.from_env()
    device = rank_device(device_name, env)
    if env.launched and not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise ConfigError(
                f"RANK and WORLD_SIZE are set but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not: start the run with torchrun, or "
                "unset RANK and WORLD_SIZE for one process"
            )
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend_for(device))
    return env, device


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if dist.is_initialized():
        dist.barrier()


def shutdown(wait: bool = True) -> None:
    """Leave the process group.

    After a normal end (``wait``), a barrier first lets the other ranks finish their last
    collectives (FSDP's gather for rank 0's save) before this rank tears gloo's worker
    threads down; a rank that finished first could otherwise abort at exit. After an error
    the other ranks may never reach a barrier, so the group is left without one.

    What is left of the run (a DDP reducer in a reference cycle) is collected first. Freed
    after the group, the reducer would hold its last reference and join gloo's worker
    threads while holding the GIL, which a worker still freeing a finished all-reduce
    needs: a deadlock, about once in 60 in-process runs of tests/test_distributed.py.
    """
    if dist.is_initialized():
        gc.collect()
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def draws_dropout(model: nn.Module) -> bool:
    """Whether a training step draws dropout masks (the model's attention dropout is its
    ``nn.Dropout``'s p as well)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


def rank_slice(rows: int, rank: int, world_size: int) -> slice:
    """This rank's contiguous share of ``rows``; the first ``rows % world_size`` get one more."""
    base, extra = divmod(rows, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


@contextmanager
def skip_grad_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """DDP's ``no_sync`` / FSDP2's ``set_requires_gradient_sync(False)``, for accumulation."""
    if not skip:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


class Parallel:
    """The Trainer's view of a process group: how to split batches, average, and save."""

    def __init__(self, env: DistEnv, device: torch.device, sharded: bool = False) -> None:
        self.env = env
        self.device = device
        self.sharded = sharded  # FSDP: every rank must join every forward and every gather

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def all_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean across ranks (gloo has no ReduceOp.AVG, so sum and divide)."""
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.env.world_size

    def agreed_signal(self, signum: int | None) -> int | None:
        """The stop signal any rank has received, seen by all ranks at the same step.

        Ranks receive a forwarded SIGTERM at slightly different moments; without agreeing,
        one rank would stop to save while another waits in the next step's all-reduce.
        """
        flag = torch.tensor([signum or 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def _share(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's rows of a global batch and their weight in the global mean."""
        rows = inputs.shape[0]
        share = rank_slice(rows, self.env.rank, self.env.world_size)
        xs, ys = inputs[share], targets[share]
        if xs.shape[0] == 0:
            # Fewer rows than ranks: run one row anyway, weighted 0, so every rank still
            # joins the gradient all-reduce (and FSDP's all-gathers) of this step.
            return inputs[:1], targets[:1], 0.0
        return xs, ys, xs.shape[0] * self.env.world_size / rows

    def forward_backward(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        grad_accum: int,
        device: torch.device | str,
        precision: Precision | None = None,
        loss_fn: LossFn = token_cross_entropy,
    ) -> torch.Tensor:
        """Backward of this rank's share; returns the global batch's mean loss.

        ``precision`` (``--dtype``): its autocast for the forward pass and, for fp16, its
        GradScaler's scaled backward, as in the single-process step.
        """
        precision = precision or Precision(device)
        xs, ys, weight = self._share(inputs, targets)  # (b, T) of the global (B, T)
        rows = xs.shape[0]
        # The same number of micro-batches on every rank, even where shares differ (a batch
        # of 3 on 2 ranks): under FSDP each one's forward and backward are collectives, and
        # a rank running one fewer would leave the others waiting for good.
        n_micro = min(grad_accum, -(-inputs.shape[0] // self.env.world_size))
        loss = torch.zeros((), device=device)
        with self._own_draws(draws_dropout(model)):
            for i, (mx, my) in enumerate(zip(xs.tensor_split(n_micro), ys.tensor_split(n_micro),
                                             strict=True)):
                scale = weight * mx.shape[0] / rows
                if mx.shape[0] == 0:  # fewer rows here than micro-batches: one row, weighted 0
                    mx, my, scale = inputs[:1], targets[:1], 0.0
                # Only the last micro-batch all-reduces; the earlier ones accumulate locally.
                with skip_grad_sync(model, skip=i < n_micro - 1):
                    with precision.autocast():
                        part = calc_loss_batch(mx, my, model, device, loss_fn) * scale
                    precision.backward(part)
                loss = loss + part.detach()
        return self.all_mean(loss)

    @contextmanager
    def _own_draws(self, drawing: bool = True) -> Iterator[None]:
        """Dropout for this rank's rows from a stream of its own, seeded from one draw of the
        shared stream.

        Every rank holds the same RNG state (the same --seed, and :meth:`sync_rng`). Drawing
        masks from it, rank k's row i would get rank 0's row i's mask: the same masks N
        times over on N ranks. The shared stream moves by one draw per step on every rank,
        whatever each rank's share, so it stays in step (the shuffle, evaluation's batches)
        and a checkpoint's copy of rank 0's state resumes every rank exactly. Without dropout
        nothing is drawn, as in one process.
        """
        if self.env.world_size == 1 or not drawing:  # as one process draws
            yield
            return
        seed = int(torch.randint(2**62, (), dtype=torch.int64))  # the same on every rank
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(seed + self.env.rank)
            if devices:
                torch.cuda.manual_seed(seed + self.env.rank)
            yield

    def loader_loss(self, loader, model: nn.Module, num_batches: int) -> float:
        """``calc_loss_loader`` with each batch split across ranks and averaged back."""
        if len(loader) == 0:
            return float("nan")
        num_batches = min(num_batches, len(loader))
        total = torch.zeros((), device=self.device)
        for i, (inputs, targets) in enumerate(loader):
            if i >= num_batches:
                break
            xs, ys, weight = self._share(inputs, targets)
            total = total + calc_loss_batch(xs, ys, model, self.device) * weight
        return self.all_mean(total).item() / num_batches

    def evaluate(self, model: nn.Module, train_loader, val_loader, eval_iter: int) -> tuple[float, float]:
        inner = unwrap_model(model)  # DDP's module: no hooks needed without gradients
        inner.eval()
        with torch.no_grad():
            train_loss = self.loader_loss(train_loader, inner, eval_iter)
            val_loss = self.loader_loss(val_loader, inner, eval_iter)
        inner.train()
        return train_loss, val_loss

    def on_main(self, write: Callable[[], _T]) -> _T | None:
        """``write()`` on rank 0 alone (a collective: every rank calls it). When it fails,
        rank 0 raises its error and every other rank :class:`RankStopped`, together,
        rather than the others dying later in a collective rank 0 never joins."""
        error: Exception | None = None
        result = None
        if self.is_main:
            try:
                result = write()
            except Exception as exc:
                error = exc
        failed = torch.tensor([error is not None], dtype=torch.int64, device=self.device)
        dist.broadcast(failed, src=0)
        if error is not None:
            setattr(error, _AGREED, True)
            raise error
        if failed.item():
            raise RankStopped()
        return result

    def runs_sample(self) -> bool:
        """Rank 0 samples alone, unless the weights are sharded and every rank must join."""
        return self.is_main or self.sharded

    def sync_rng(self) -> None:
        """Give every rank rank 0's CPU RNG, so each epoch's shuffle is one permutation.

        Ranks draw in lockstep already; this keeps them so even when an uneven last batch
        made CPU dropout draw different amounts on different ranks.
        """
        state = [torch.get_rng_state() if self.is_main else None]
        dist.broadcast_object_list(state, src=0, device=self._object_device())
        torch.set_rng_state(state[0])

    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None

    def full_model_and_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """A plain model and optimizer holding the full state, for ``save_run`` on rank 0.

        Under DDP every rank holds it already. Under FSDP this is a collective: all ranks
        gather, rank 0 receives a CPU copy (the others get theirs back unchanged).
        """
        if not self.sharded:
            return unwrap_model(model), optimizer
        from diygpt.fsdp import gather_full_state

        return gather_full_state(model, optimizer, self.is_main)


def wrap_model(
    model: nn.Module, env: DistEnv, device: torch.device, fsdp: bool = False
) -> tuple[nn.Module, Parallel | None]:
    """DDP- or FSDP2-wrap ``model`` for torchrun; a single process gets it back unchanged.

    Call before building the optimizer: FSDP replaces the parameters with sharded ones.
    """
    if not env.launched:
        if fsdp:
            raise ConfigError(
                "--fsdp shards the model across processes started by torchrun; run "
                "`torchrun --nproc_per_node N -m diygpt train ... --fsdp`"
            )
        return model, None
    if fsdp:
        from diygpt.fsdp import shard_model

        return shard_model(model, device, env.world_size), Parallel(env, device, sharded=True)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    # DDP broadcasts rank 0's weights at construction, so every rank starts identical.
    return DDP(model, device_ids=ids), Parallel(env, device)
