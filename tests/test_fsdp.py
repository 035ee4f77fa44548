"""FSDP2 (fully_shard) under torchrun, on CPU with gloo: same run as one process, and a run
folder a single process loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed_helpers import (
    assert_same_losses,
    assert_same_optimizer_state,
    assert_same_weights,
    single_run,
    tiny_args,
    torchrun,
)

from diygpt.checkpoints import load_model, unwrap_model


@pytest.fixture(scope="module")
def reference(verdict_path, tmp_path_factory) -> Path:
    return single_run(verdict_path, tmp_path_factory)


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_process_and_save_a_plain_run(verdict_path, tmp_path, reference):
    result = torchrun(2, tiny_args(verdict_path, "run", "--fsdp"), tmp_path, per_rank_dir=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 ranks (FSDP)" in result.stderr
    run0 = tmp_path / "rank0" / "run"
    assert list((tmp_path / "rank1").iterdir()) == []
    # The sharded weights and AdamW state were gathered into the single-process layout.
    assert_same_weights(run0, reference)
    assert_same_optimizer_state(run0, reference)
    assert_same_losses(run0, reference)
    # ... and one process loads the run folder with the normal loader.
    model = load_model(run0)
    assert unwrap_model(model) is model
    assert type(model).__name__ == "GPTModel"


@pytest.mark.slow
def test_fsdp_with_uneven_shares_and_grad_accum_does_not_hang(verdict_path, tmp_path,
                                                               tmp_path_factory):
    # A batch of 3 on 2 ranks is shares of 2 and 1: with --grad-accum 2 the rank with one row
    # ran one micro-batch fewer, its FSDP collectives no longer matched, and the run hung.
    uneven = ("--batch-size", "3")
    reference = single_run(verdict_path, tmp_path_factory, *uneven)
    result = torchrun(2, tiny_args(verdict_path, str(tmp_path / "run"), "--fsdp", *uneven),
                      tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(tmp_path / "run", reference)
    assert_same_losses(tmp_path / "run", reference)


@pytest.mark.slow
def test_a_warm_start_with_adamws_state_under_fsdp_matches_one_process(
        verdict_path, tmp_path, tmp_path_factory, reference):
    # --init-from a run: its AdamW state goes into the sharded optimizer as into one process's.
    warm = ("--init-from", str(reference), "--max-steps", "2")
    single = single_run(verdict_path, tmp_path_factory, *warm)
    result = torchrun(2, tiny_args(verdict_path, str(tmp_path / "run"), "--fsdp", *warm),
                      tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "AdamW's state from it (step 6)" in result.stderr
    assert_same_weights(tmp_path / "run", single)
    assert_same_optimizer_state(tmp_path / "run", single)
