"""A run folder loaded into DDP ranks (as a resume does) continues exactly as one process."""

from __future__ import annotations

import subprocess
import sys

import pytest
from distributed_helpers import (
    ROOT,
    assert_same_optimizer_state,
    max_weight_diff,
    single_run,
    torchrun_env,
)

# No shuffling and a long stride: 4 steps per epoch, the same windows in every epoch.
EPOCH_ARGS = ("--no-shuffle", "--stride", "192", "--max-steps", "100", "--sample-prompt", "")


@pytest.mark.slow
def test_ddp_resume_continues_exactly(verdict_path, tmp_path, tmp_path_factory):
    # Epoch 1 in one process (test_distributed shows a DDP run writes the same folder) ...
    first = single_run(verdict_path, tmp_path_factory, *EPOCH_ARGS, "--epochs", "1")
    # ... epoch 2 loaded into two ranks ...
    worker = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              str(ROOT / "tests" / "ddp_resume_worker.py"), str(verdict_path), str(first),
              "second"]
    second = subprocess.run(worker, cwd=tmp_path, env=torchrun_env(), capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    # ... ends where two epochs in one go end.
    straight = single_run(verdict_path, tmp_path_factory, *EPOCH_ARGS, "--epochs", "2")
    assert max_weight_diff(tmp_path / "second", straight) < 1e-5
    assert_same_optimizer_state(tmp_path / "second", straight)
