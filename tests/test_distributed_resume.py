"""`torchrun ... diygpt train --resume RUN` under DDP continues exactly as an unbroken run."""

from __future__ import annotations

import pytest
from distributed_helpers import (
    assert_same_losses,
    assert_same_optimizer_state,
    assert_same_weights,
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
    assert_same_weights(tmp_path / "run", straight)
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
    assert_same_weights(tmp_path / "run", straight)
    assert_same_losses(tmp_path / "run", straight)


@pytest.mark.slow
def test_a_torchrun_resume_with_dropout_and_uneven_shares_is_exact(verdict_path, tmp_path):
    # Batch 5 on 2 ranks (3 + 2 rows) draws unequal amounts of dropout on each rank; the
    # shared stream still moves alike, so a checkpoint of rank 0's RNG resumes both exactly.
    drop = ("--drop-rate", "0.1")
    straight = torchrun(2, tiny_args(verdict_path, "straight", *drop), tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = torchrun(2, tiny_args(verdict_path, "run", *drop, "--save-every", "3",
                                  "--max-steps", "3"), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(2, ["train", "--resume", "run", "--max-steps", "6", "--no-progress"],
                      tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert max_weight_diff(tmp_path / "run", tmp_path / "straight") == 0.0
    assert_same_losses(tmp_path / "run", tmp_path / "straight")


SLOW_RANK1 = """
import os
import time

if os.environ.get("RANK") == "1":
    import diygpt.cli.report as report

    say = report.say
    report.say = lambda line: (time.sleep(2), say(line))
"""


@pytest.mark.slow
def test_an_error_only_rank0_meets_stops_every_rank_with_one_line(verdict_path, tmp_path):
    # torchrun stops the other ranks as soon as rank 0 exits, so a rank 1 slower to speak
    # than rank 0 to leave lost its line. Made 2 s slow here, it must still say it, after
    # rank 0's.
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_RANK1)
    (tmp_path / "taken").write_text("a file where the run folder would go")
    result = torchrun(2, tiny_args(verdict_path, "taken"), tmp_path, path_first=slow)
    assert result.returncode != 0
    lines = [ln for ln in result.stderr.splitlines() if "diygpt: error" in ln]
    assert len(lines) == 2, lines
    assert lines[0].startswith("diygpt: error: cannot write taken"), lines
    assert lines[1] == ("diygpt: error (rank 1): the run stopped on another rank; that rank's "
                        "error is above"), lines
    assert "[rank1]: Traceback" not in result.stderr and "[rank0]: Traceback" not in result.stderr
