"""Shared by the torchrun tests: a tiny dropout-free run, launched one way or another."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from diygpt.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(data: Path, out: str, *extra: str) -> list[str]:
    """6 steps of the tiny preset with dropout 0; batch 5 splits unevenly over 2 ranks (3 + 2)
    and --grad-accum 2 splits each share again, so weighting and no_sync are both exercised."""
    return [
        "train", "--data", str(data), "--preset", "tiny", "--drop-rate", "0",
        "--batch-size", "5", "--grad-accum", "2", "--max-steps", "6", "--eval-freq", "3",
        "--eval-iter", "2", "--no-progress", "--device", "cpu", "--seed", "123",
        "--sample-prompt", "Every effort", "--out", out, *extra,
    ]


@contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def torchrun_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def torchrun(nproc: int, argv: list[str], cwd: Path, per_rank_dir: bool = False,
             timeout: float = 300, path_first: Path | None = None):
    """``torchrun --standalone --nproc_per_node N -m diygpt ARGV``.

    With ``per_rank_dir`` each rank runs in its own ``rank<RANK>/`` folder under ``cwd``, so
    a relative ``--out`` shows which ranks wrote files. ``path_first`` goes before ``src`` on
    the ranks' PYTHONPATH (a ``sitecustomize.py`` there changes them for a test).
    """
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}"]
    if per_rank_dir:
        script = 'mkdir -p "rank$RANK" && cd "rank$RANK" && exec "$0" -m diygpt "$@"'
        cmd = [*launcher, "--no-python", "sh", "-c", script, sys.executable, *argv]
    else:
        cmd = [*launcher, "-m", "diygpt", *argv]
    # A session of its own: a run that hangs is killed with its ranks, not only torchrun
    # (the ranks would otherwise wait out gloo's 30-minute timeout after the test).
    env = torchrun_env()
    if path_first is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path_first), env["PYTHONPATH"]])
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def max_weight_diff(run_a: Path, run_b: Path) -> float:
    a, b = load_file(run_a / "model.safetensors"), load_file(run_b / "model.safetensors")
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    """The weights of two runs that summed their gradients in different orders.

    AdamW divides by sqrt(v), so an element whose gradient is near 0 turns float noise into
    a visible step: one element of the tiny run differs by 5e-6 here, and by how much depends
    on the CPU's kernels. The bound on the largest difference is a quarter of one step's
    size (lr 4e-4); the mean, 1.7e-10 here, is where a mis-weighted rank shows (3e-5 when
    the ranks' 3 and 2 rows were weighted alike).
    """
    a, b = load_file(run_a / "model.safetensors"), load_file(run_b / "model.safetensors")
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diff.max().item() < 1e-4 and diff.mean().item() < 1e-8, (diff.max(), diff.mean())


def assert_same_losses(run_a: Path, run_b: Path) -> None:
    """metrics.jsonl of both runs: the same records, the losses within fp32 noise."""
    a, b = (
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (run_a, run_b)
    )
    assert [r.keys() for r in a] == [r.keys() for r in b] and len(a) >= 3
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss"):
            if key in ra:
                assert abs(ra[key] - rb[key]) < 1e-5, (key, ra, rb)
        assert ra.get("sample") == rb.get("sample")


def eval_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("Ep ")]


def assert_same_optimizer_state(run_a: Path, run_b: Path, atol: float = 1e-5) -> None:
    a = torch.load(run_a / "optimizer.pt", weights_only=True)
    b = torch.load(run_b / "optimizer.pt", weights_only=True)
    # The same numbers; torch.distributed.checkpoint hands a loaded group's betas back as a
    # list where AdamW made a tuple.
    def groups(state):
        return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
                for g in state["param_groups"]]

    assert groups(a) == groups(b)
    assert a["state"].keys() == b["state"].keys()
    for i, state in a["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(value, b["state"][i][key], atol=atol, rtol=0)


def single_run(data: Path, tmp_path_factory, *extra: str) -> Path:
    """The reference: the same global batch in this one process."""
    out = tmp_path_factory.mktemp("single") / "run"
    with one_thread():  # as each torchrun rank runs; two threads thrash on a busy 2-core box
        assert main(tiny_args(data, str(out), *extra)) == 0
    return out
