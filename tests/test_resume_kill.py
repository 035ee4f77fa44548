"""A real `diygpt train` process, SIGKILLed at a random step and inside a save, then resumed.

The resumed run must end with a model.safetensors bit-identical to an uninterrupted run and
print the same log lines after the resume point. Shuffling and dropout are on, so the data
order and the RNG states must be restored exactly.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from diygpt.checkpointing import KILL_HOOK_ENV, latest_checkpoint
from diygpt.resume import read_training_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# ~9 shuffled batches per epoch, 2 epochs, a checkpoint every 4 steps, dropout 0.1.
ARGS = [
    "--preset", "tiny", "--context-length", "16", "--emb-dim", "16", "--n-heads", "2",
    "--drop-rate", "0.1", "--epochs", "2", "--batch-size", "2", "--eval-freq", "3",
    "--eval-iter", "2", "--seed", "7", "--save-every", "4", "--sample-prompt", "Every effort",
    "--no-progress",
]
STEP_LINE = re.compile(r"\(Step (\d+)\)")


def diygpt_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "diygpt", "train", *args]


def env(**extra: str) -> dict[str, str]:
    # One thread: faster on a shared CI box, and the same kernels in every run compared.
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    e["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + e.get("PYTHONPATH", "")
    return e


def train(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        diygpt_cmd(*args), capture_output=True, text=True, env=env(**extra_env), timeout=300
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory, verdict_text) -> Path:
    path = tmp_path_factory.mktemp("data") / "short.txt"
    path.write_text(verdict_text[:1500], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data) -> tuple[list[str], bytes]:
    out = tmp_path_factory.mktemp("base") / "run"
    done = train("--data", str(data), *ARGS, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines(), (out / "model.safetensors").read_bytes()


def resume_and_compare(run: Path, baseline: tuple[list[str], bytes], why: str) -> None:
    ckpt = latest_checkpoint(run)
    assert ckpt is not None, why
    step = read_training_checkpoint(ckpt).state["global_step"]  # loadable, or this raises
    done = train("--resume", str(run), "--no-progress")
    assert done.returncode == 0, f"{why}: {done.stderr}"
    lines, weights = baseline
    resumed = done.stdout.splitlines()
    assert lines[-len(resumed):] == resumed, why
    first_eval = next(m for m in map(STEP_LINE.search, resumed) if m)
    expected = next(int(m[1]) for m in map(STEP_LINE.search, lines) if m and int(m[1]) > step)
    assert int(first_eval[1]) == expected, why
    assert (run / "model.safetensors").read_bytes() == weights, why


def _kill_seed() -> int:
    """A fresh draw each run (a failure message prints it); DIYGPT_KILL_SEED=N replays one."""
    return int(os.environ.get("DIYGPT_KILL_SEED") or random.randrange(2**32))


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, data, baseline):
    seed = _kill_seed()
    # An eval line's step; not 15, after which the run ends within 2 s and could beat the kill.
    kill_after = random.Random(seed).choice([6, 9, 12])
    run = tmp_path / "run"
    proc = subprocess.Popen(
        diygpt_cmd("--data", str(data), *ARGS, "--out", str(run)),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env(),
    )
    for line in proc.stdout:
        m = STEP_LINE.search(line)
        if m and int(m[1]) >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    resume_and_compare(run, baseline, f"killed after step {kill_after} (seed {seed})")


@pytest.mark.slow
def test_sigkill_inside_a_save_leaves_a_loadable_checkpoint(tmp_path, data, baseline):
    # A save makes 8 atomic writes (4 files, the pointer, the run folder's weights, AdamW
    # state and state.json); write 5 onward falls inside the first save's pointer move or
    # in a later save.
    seed = _kill_seed()
    nth = random.Random(seed).randrange(5, 22)
    run = tmp_path / "run"
    done = train("--data", str(data), *ARGS, "--out", str(run), **{KILL_HOOK_ENV: str(nth)})
    assert done.returncode == -signal.SIGKILL, done.stderr
    resume_and_compare(run, baseline, f"killed in atomic write {nth} (seed {seed})")


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_resumes(tmp_path, data, baseline):
    run = tmp_path / "the run"  # a space: the printed resume command quotes it
    proc = subprocess.Popen(
        diygpt_cmd("--data", str(data), *ARGS, "--out", str(run)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
    )
    for line in proc.stdout:
        m = STEP_LINE.search(line)
        if m and int(m[1]) >= 6:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"resume with: diygpt train --resume '{run}'" in err
    assert "Traceback" not in err
    # The run folder as a finished run leaves it (the loss plot was missing after a stop).
    assert (run / "loss.png").is_file() and (run / "optimizer.pt").is_file()
    resume_and_compare(run, baseline, "SIGTERM after step 6")
