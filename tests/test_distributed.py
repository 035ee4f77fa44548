"""DDP under torchrun (gloo on CPU): same weights as one process, rank 0 alone writes."""

from __future__ import annotations

import datetime
import gc
import socket
import weakref
from pathlib import Path

import pytest
import torch
from distributed_helpers import (
    assert_same_losses,
    assert_same_optimizer_state,
    assert_same_weights,
    eval_lines,
    single_run,
    tiny_args,
    torchrun,
)

from diygpt.cli.main import main
from diygpt.config import get_preset
from diygpt.distributed import DistEnv, Parallel, rank_slice, wrap_model
from diygpt.errors import ConfigError
from diygpt.fsdp import rekey_optimizer_state
from diygpt.losses import calc_loss_batch
from diygpt.model import GPTModel
from diygpt.precision import Precision


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_slices_split_every_batch_once_and_contiguously(world):
    for rows in range(0, 13):
        slices = [rank_slice(rows, r, world) for r in range(world)]
        covered = [i for s in slices for i in range(rows)[s]]
        assert covered == list(range(rows))  # every row once, in rank order
        sizes = [s.stop - s.start for s in slices]
        assert max(sizes) - min(sizes) <= 1


def test_dist_env_reads_torchrun_variables():
    assert DistEnv.from_env({}) == DistEnv()
    env = DistEnv.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.launched, env.is_main) == (1, 2, 1, True, False)
    with pytest.raises(ConfigError, match="not integers"):
        DistEnv.from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="inconsistent"):
        DistEnv.from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_single_process_is_not_wrapped_and_fsdp_needs_torchrun(tokenizer):
    model = GPTModel(get_preset("tiny"))
    assert wrap_model(model, DistEnv(), torch.device("cpu")) == (model, None)
    with pytest.raises(ConfigError, match="torchrun"):
        wrap_model(model, DistEnv(), torch.device("cpu"), fsdp=True)


def test_fsdp_without_torchrun_is_a_one_line_error(verdict_path, tmp_path, capsys):
    code = main(tiny_args(verdict_path, str(tmp_path / "run"), "--fsdp"))
    err = capsys.readouterr().err
    assert code == 2
    assert "diygpt: error: --fsdp shards the model across processes started by torchrun" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_torchrun_step_uses_the_dtype_like_one_process(dtype, tmp_path):
    """--dtype under torchrun: the rank's forward autocasts and fp16's backward is scaled,
    giving the single-process step's gradients (here a group of one rank, in-process)."""
    torch.manual_seed(0)
    model = GPTModel(get_preset("tiny").with_updates(vocab_size=300, context_length=8,
                                                     drop_rate=0.0))
    x, y = torch.randint(0, 300, (5, 8)), torch.randint(0, 300, (5, 8))

    def grads() -> list[torch.Tensor]:
        out = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return out

    expected = Precision("cpu", dtype)
    for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True):  # the Trainer's --grad-accum 2
        with expected.autocast():
            part = calc_loss_batch(xs, ys, model, "cpu") * (xs.shape[0] / 5)
        expected.backward(part)
    single = grads()
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store",
                                         rank=0, world_size=1,
                                         timeout=datetime.timedelta(seconds=60))
    ddp = None
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        Parallel(DistEnv(), torch.device("cpu")).forward_backward(
            ddp, x, y, 2, "cpu", Precision("cpu", dtype))
    finally:
        # DDP's reducer goes before the group, as in the CLI: holding the group's last
        # reference, it would tear gloo's threads down under the GIL, and deadlock with a
        # worker freeing its finished all-reduce (which takes the GIL) about once in 60.
        del ddp
        torch.distributed.destroy_process_group()
    ranked = grads()
    # Bit for bit: so the forward autocast (bf16 or fp16) and fp16's loss scale were used.
    for a, b in zip(single, ranked, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fails", [False, True])
def test_no_ddp_model_outlives_the_group(fails, verdict_path, tmp_path, capsys, monkeypatch):
    """A DDP reducer freed after destroy_process_group can deadlock in gloo's teardown (see
    distributed.shutdown): after a run, and after a failed one, none is left by then (a
    group of one rank, in-process)."""
    from diygpt import distributed
    from diygpt.errors import TrainingError

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    wrapped, alive = [], []
    wrap = distributed.wrap_model

    def spy_wrap(*args, **kwargs):
        model, parallel = wrap(*args, **kwargs)
        wrapped.append(weakref.ref(model))
        return model, parallel

    destroy = torch.distributed.destroy_process_group

    def spy_destroy(*args, **kwargs):
        try:
            alive.append(bool(wrapped) and wrapped[0]() is not None)
        finally:
            destroy(*args, **kwargs)

    def boom(self):
        try:
            raise RuntimeError("the first failure")
        except RuntimeError as exc:  # chained: its frames are cleared too
            raise TrainingError("stopped for the test") from exc

    monkeypatch.setattr(distributed, "wrap_model", spy_wrap)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", spy_destroy)
    if fails:
        monkeypatch.setattr("diygpt.training.Trainer.fit", boom)
    gc.disable()  # so that only shutdown's own collection can free a reference cycle
    try:
        rc = main(tiny_args(verdict_path, str(tmp_path / "run"), "--max-steps", "2"))
    finally:
        gc.enable()
    err = capsys.readouterr().err
    assert (rc != 0) == fails, err
    assert len(wrapped) == 1 and alive == [False]  # one DDP model, gone by then
    assert not torch.distributed.is_initialized()


def test_fsdp_with_fp16_is_a_one_line_error(verdict_path, tmp_path, capsys):
    assert main(tiny_args(verdict_path, str(tmp_path / "run"), "--fsdp", "--dtype", "fp16")) == 2
    err = capsys.readouterr().err
    assert "diygpt: error: --fsdp does not go with --dtype fp16" in err and "Traceback" not in err


def test_optimizer_state_rekeys_both_ways():
    names = ["a.weight", "b.weight"]
    by_name = {"state": {"a.weight": {"step": 1}, "b.weight": {"step": 2}},
               "param_groups": [{"lr": 0.1, "params": names}]}
    by_index = rekey_optimizer_state(by_name, {n: i for i, n in enumerate(names)})
    assert by_index == {"state": {0: {"step": 1}, 1: {"step": 2}},
                        "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    assert rekey_optimizer_state(by_index, dict(enumerate(names))) == by_name


@pytest.fixture(scope="module")
def reference(verdict_path, tmp_path_factory) -> Path:
    return single_run(verdict_path, tmp_path_factory)


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process_and_only_rank0_writes(
    verdict_path, tmp_path, reference, capsys
):
    capsys.readouterr()
    result = torchrun(2, tiny_args(verdict_path, "run"), tmp_path, per_rank_dir=True)
    assert result.returncode == 0, result.stderr[-3000:]
    run0 = tmp_path / "rank0" / "run"
    # Rank 0 wrote the whole run folder; rank 1 wrote nothing at all.
    assert {p.name for p in run0.iterdir()} >= {
        "model.safetensors", "optimizer.pt", "state.json", "metrics.jsonl", "loss.png"
    }
    assert list((tmp_path / "rank1").iterdir()) == []
    # Global batch 5 over 2 ranks (3 + 2 rows, each in 2 micro-batches): same weights.
    assert_same_weights(run0, reference)
    assert_same_optimizer_state(run0, reference)
    # Losses are averaged over ranks and printed once, by rank 0.
    lines = eval_lines(result.stdout)
    assert [line.split(":")[0] for line in lines] == ["Ep 1 (Step 000000)", "Ep 1 (Step 000003)"]
    assert_same_losses(run0, reference)
    assert "2 ranks (DDP)" in result.stderr
    assert result.stdout.count("Every effort") == 1  # one epoch-end sample


def test_each_rank_draws_dropout_of_its_own_and_the_shared_stream_stays_in_step():
    def draws(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(5)  # every rank's shared stream: the same --seed
        parallel = Parallel(DistEnv(rank, world, rank, launched=True), torch.device("cpu"))
        with parallel._own_draws():
            mask = torch.empty(1000).bernoulli_(0.5)
            torch.empty(rank * 100).bernoulli_(0.5)  # uneven shares draw unequal amounts
        return mask, torch.get_rng_state()

    (mask0, after0), (mask1, after1) = draws(0, 2), draws(1, 2)
    assert not torch.equal(mask0, mask1)  # not the same masks on every rank
    assert torch.equal(after0, after1)  # one draw of the shared stream on each, whatever else
    torch.manual_seed(5)
    alone = torch.empty(1000).bernoulli_(0.5)
    assert torch.equal(draws(0, 1)[0], alone)  # a group of one draws as one process


def test_rank_variables_without_torchrun_s_address_are_one_line(verdict_path, tmp_path,
                                                               capsys, monkeypatch):
    for key, value in {"RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert main(tiny_args(verdict_path, str(tmp_path / "run"))) == 2
    err = capsys.readouterr().err
    assert ("diygpt: error: RANK and WORLD_SIZE are set but MASTER_ADDR and MASTER_PORT are "
            "not: start the run with torchrun") in err and "Traceback" not in err


def test_the_resume_hint_under_torchrun_is_a_torchrun_command(monkeypatch):
    from diygpt.cli.train import _resume_command

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert _resume_command(DistEnv(), "runs/a b") == "diygpt train --resume 'runs/a b'"
    assert (_resume_command(DistEnv(1, 4, 1, launched=True), "runs/x")
            == "torchrun --nproc_per_node 4 -m diygpt train --resume runs/x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 2 nodes of 2
    assert _resume_command(DistEnv(1, 4, 1, launched=True), "runs/x").startswith(
        "the same torchrun command on each node")


def test_mfu_under_torchrun_divides_by_every_gpus_peak(tmp_path, monkeypatch):
    import argparse

    from diygpt.cli import speed_flags

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store",
                                         rank=0, world_size=1,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 4)
        monkeypatch.setattr("diygpt.speed.peak_flops", lambda device: 1e12)
        monkeypatch.setattr(speed_flags, "speed_flags_used", lambda args: True)
        args = argparse.Namespace(lr=4e-4, weight_decay=0.1, fused_adamw=False, compile=False,
                                  dtype="fp32", compile_mode="default")
        model = GPTModel(get_preset("tiny").with_updates(vocab_size=300, context_length=8))
        meter = speed_flags.setup_training(args, model, torch.device("cpu")).meter
    finally:
        torch.distributed.destroy_process_group()
    assert meter.peak == 4e12  # tok/s counts all 4 ranks' tokens


def test_only_a_peer_that_left_is_reported_as_another_ranks_error():
    from diygpt.distributed import lost_peer

    closed = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
                          "closed by peer [127.0.0.1]:5678")
    assert lost_peer(closed)
    timeout = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:129] "
                           "Timed out waiting 3000ms for recv operation to complete")
    nccl = torch.distributed.DistBackendError("NCCL error in: ..., unhandled system error")
    assert not lost_peer(timeout) and not lost_peer(nccl)  # this rank's own to show
