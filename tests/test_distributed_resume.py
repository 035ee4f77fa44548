"""`torchrun ... diygpt train --resume RUN` under DDP continues exactly as an unbroken run."""

from __future__ import annotations

import pytest
from distributed_helpers import (
    assert_same_losses,
    assert_same_optimizer_state,
    max_weight_diff,
    single_run,
    tiny_args,
    torchrun,
)


@pytest.mark.slow
def test_ddp_cli_resume_continues_exactly(verdict_path, tmp_path, tmp_path_factory):
    # Two ranks stop after 3 of the 6 steps, leaving a checkpoint ...
    first = torchrun(2, tiny_args(verdict_path, "run", "--save-every", "3", "--max-steps", "3"),
                     tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "run" / "latest").is_file()
    # ... two ranks resume it to step 6 ...
    second = torchrun(2, ["train", "--resume", "run", "--max-steps", "6", "--no-progress"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr
    # ... and end where 6 steps in one go end (one process, same global batch).
    straight = single_run(verdict_path, tmp_path_factory)
    assert max_weight_diff(tmp_path / "run", straight) < 1e-5
    assert_same_optimizer_state(tmp_path / "run", straight)
    assert_same_losses(tmp_path / "run", straight)


@pytest.mark.slow
def test_an_fsdp_run_resumes_in_one_process(verdict_path, tmp_path, tmp_path_factory, capsys):
    from distributed_helpers import one_thread

    from diygpt.cli.main import main

    first = torchrun(2, tiny_args(verdict_path, "run", "--fsdp", "--save-every", "3",
                                  "--max-steps", "3"), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    # The checkpoint says fsdp; one process cannot shard, so it resumes unsharded (this
    # was refused: "--fsdp shards the model across processes started by torchrun").
    with one_thread():
        assert main(["train", "--resume", str(tmp_path / "run"), "--max-steps", "6",
                     "--no-progress"]) == 0, capsys.readouterr().err
    straight = single_run(verdict_path, tmp_path_factory)
    assert max_weight_diff(tmp_path / "run", straight) < 1e-5
    assert_same_losses(tmp_path / "run", straight)
