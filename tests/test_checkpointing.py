"""Atomic writes, checkpoint rotation, untrusted and damaged files, resume flags, NaN guard."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import shutil
import signal
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error, run_cli, train_tiny

from diygpt.checkpointing import (
    LOCK_FILE,
    atomic_write,
    atomic_write_text,
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
)
from diygpt.checkpoints import safe_torch_load
from diygpt.errors import CheckpointError, TrainingError
from diygpt.signals import StopRequest


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data) -> Path:
    """A tiny run folder with checkpoints after steps 1 and 3."""
    out = tmp_path_factory.mktemp("runs") / "run"
    rc, _, _ = train_tiny(None, data, out, "--max-steps", "4", "--save-every", "2")
    assert rc == 0
    return out


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


# -- atomic files and rotation -----------------------------------------------------------------
def test_run_files_get_a_plain_files_mode(run_copy):
    # safetensors writes 0600; every run file takes the mode the umask gives a new file
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in run_copy.rglob("*") if p.is_file()}
    assert "model.safetensors" in modes and "rng.safetensors" in modes
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_atomic_write_keeps_old_file_when_disk_is_full(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(CheckpointError, match="no space left on device"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left


def test_keep_last_and_latest_pointer(tmp_path):
    def write(folder: Path) -> None:
        atomic_write_text(folder / "state.json", "{}")

    (tmp_path / "ckpt-000000.tmp-999").mkdir()  # left by a crashed save
    for step in (1, 3, 5, 7):
        save_checkpoint(tmp_path, step, write, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000005", "ckpt-000007"]
    assert (tmp_path / "latest").read_text().strip() == "ckpt-000007"
    assert not list(tmp_path.glob("*.tmp-*"))
    (tmp_path / "latest").write_text("garbage")  # a broken pointer: use the newest folder
    assert latest_checkpoint(tmp_path).name == "ckpt-000007"


def test_run_folder_layout(trained_run):
    names = [p.name for p in list_checkpoints(trained_run)]
    assert names == ["ckpt-000001", "ckpt-000003"]
    assert (trained_run / "latest").read_text().strip() == "ckpt-000003"
    for f in ("model.safetensors", "optimizer.pt", "rng.safetensors", "state.json"):
        assert (trained_run / "ckpt-000003" / f).is_file()
    assert (trained_run / "ckpt-000003" / "model.safetensors").read_bytes() == (
        trained_run / "model.safetensors"
    ).read_bytes()


def test_stop_request_turns_a_signal_into_a_flag():
    # Python's own handler, or SIG_IGN where a shell started the tests in the background.
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before


# -- untrusted files -----------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused_without_running(tmp_path, capsys):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))  # the payload is real: plain pickle runs it
    assert control.exists()

    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pth"
    torch.save({"tok_emb.weight": _Payload(marker)}, evil)
    line = one_line_error(capsys, "generate", "--checkpoint", evil, "--preset", "tiny")
    assert "refused to load" in line
    assert not marker.exists()


def test_malicious_optimizer_in_a_run_is_refused_on_resume(run_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(marker)}, run_copy / "ckpt-000003" / "optimizer.pt")
    line = one_line_error(capsys, "train", "--resume", run_copy)
    assert "refused to load" in line and not marker.exists()


def test_old_torch_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1)}, path)
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(CheckpointError, match="CVE-2025-32434"):
        safe_torch_load(path)
    from diygpt.pretrained.readers import open_torch_file  # OpenAI/HF .bin weights too

    with pytest.raises(CheckpointError, match="CVE-2025-32434"):
        open_torch_file(path)


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt", "rng.safetensors"])
def test_truncated_checkpoint_file_is_one_line(run_copy, capsys, victim):
    path = run_copy / "ckpt-000003" / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "ckpt-000003" in one_line_error(capsys, "train", "--resume", run_copy)


def test_corrupted_weights_in_run_folder_is_one_line(run_copy, capsys):
    (run_copy / "model.safetensors").write_bytes(os.urandom(4096))
    line = one_line_error(capsys, "generate", "--checkpoint", run_copy)
    assert "model.safetensors" in line


@pytest.mark.parametrize(
    ("change", "expect"),
    [({"n_heads": 3}, "invalid config"), ({"emb_dim": 32, "n_heads": 2}, "has shape")],
)
def test_tampered_config_json(run_copy, capsys, change, expect):
    path = run_copy / "state.json"
    state = json.loads(path.read_text())
    state["config"].update(change)
    path.write_text(json.dumps(state))
    assert expect in one_line_error(capsys, "generate", "--checkpoint", run_copy)


def test_garbage_state_json(run_copy, capsys):
    (run_copy / "state.json").write_text("{not json")
    assert "unreadable" in one_line_error(capsys, "generate", "--checkpoint", run_copy)


# -- resume flags ------------------------------------------------------------------------------
def test_resume_with_conflicting_preset(run_copy, capsys):
    line = one_line_error(capsys, "train", "--resume", run_copy, "--preset", "book-124m")
    assert "--preset book-124m conflicts with the checkpoint's tiny" in line
    # shown as typed: a switch as on/off, a string quoted (an empty one as '')
    line = one_line_error(capsys, "train", "--resume", run_copy, "--cosine")
    assert "--cosine on conflicts with the checkpoint's off" in line
    line = one_line_error(capsys, "train", "--resume", run_copy, "--sample-prompt", "Hi there")
    assert "--sample-prompt 'Hi there' conflicts with the checkpoint's ''" in line


def test_resume_with_changed_data(run_copy, tmp_path, capsys, verdict_text):
    other = tmp_path / "other.txt"
    other.write_text(verdict_text[:1300])
    line = one_line_error(capsys, "train", "--resume", run_copy, "--data", other)
    assert "the training text changed since" in line


def test_resume_with_the_data_moved(tmp_path, data, capsys):
    corpus = tmp_path / "old" / "corpus.txt"
    corpus.parent.mkdir()
    shutil.copy(data, corpus)
    assert train_tiny(capsys, corpus, tmp_path / "run", "--max-steps", "2",
                      "--save-every", "1")[0] == 0
    moved = tmp_path / "new" / "corpus.txt"
    moved.parent.mkdir()
    corpus.rename(moved)
    line = one_line_error(capsys, "train", "--resume", tmp_path / "run")
    assert "does not exist; if it moved, resume with --data NEW_PATH" in line
    rc, _, err = run_cli(capsys, "train", "--resume", tmp_path / "run", "--data", moved,
                         "--max-steps", "3")
    assert rc == 0 and "resuming from" in err, err


def test_resume_without_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "no checkpoint" in one_line_error(capsys, "train", "--resume", tmp_path / "empty")


def test_fresh_run_into_a_folder_with_checkpoints(run_copy, data, capsys):
    rc, _, err = train_tiny(capsys, data, run_copy)
    assert rc == 2 and "--resume" in err


def test_a_finished_run_without_save_every_can_be_extended(data, tmp_path, capsys):
    # The run ends with a checkpoint even without --save-every (its weights and optimizer
    # state are links, not a second copy): a second fresh run there is refused, and
    # --resume extends it as if it had never stopped.
    out = tmp_path / "a run"
    assert train_tiny(capsys, data, out, "--max-steps", "2")[0] == 0
    before = (out / "model.safetensors").read_bytes()
    line = one_line_error(capsys, "train", "--data", data, "--out", out, "--preset", "tiny")
    assert "already holds checkpoints; continue it with --resume" in line and f"'{out}'" in line
    assert (out / "model.safetensors").read_bytes() == before
    ckpt = out / (out / "latest").read_text().strip()
    assert (out / "optimizer.pt").stat().st_ino == (ckpt / "optimizer.pt").stat().st_ino
    assert run_cli(capsys, "train", "--resume", out, "--max-steps", "4")[0] == 0
    assert train_tiny(capsys, data, tmp_path / "straight", "--max-steps", "4")[0] == 0
    assert (out / "model.safetensors").read_bytes() == (
        tmp_path / "straight" / "model.safetensors").read_bytes()
    rc, _, err = run_cli(capsys, "train", "--resume", out)  # nothing left to do
    assert rc == 0 and "the run has taken 4 steps, all that --max-steps 4 allows: nothing " \
        "to train; raise --max-steps to go on" in err
    left = [p.name for p in out.glob(".*") if p.name != LOCK_FILE]  # the run's lock stays
    assert not left, left  # no temp name left behind


def test_a_stale_temp_name_is_never_written_through(tmp_path):
    # A crash can leave `.NAME.tmp-PID` as a hard link to a kept checkpoint's file; a later
    # process with the same PID (usual in containers) wrote through it into that file.
    kept = tmp_path / "ckpt-000001" / "model.safetensors"
    kept.parent.mkdir()
    kept.write_bytes(b"step 1 weights")
    os.link(kept, tmp_path / f".model.safetensors.tmp-{os.getpid()}")
    atomic_write(tmp_path / "model.safetensors", lambda t: t.write_bytes(b"step 2 weights"))
    assert kept.read_bytes() == b"step 1 weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000001", "model.safetensors"]


def test_resuming_after_an_epochs_end_does_not_end_it_again(data, tmp_path, capsys):
    # The final checkpoint comes after the epoch's sample; a resume printed it again.
    args = ("--sample-prompt", "Every effort", "--train-ratio", "0.5")
    assert train_tiny(capsys, data, tmp_path / "one", "--epochs", "1", *args)[0] == 0
    rc, out, _ = run_cli(capsys, "train", "--resume", tmp_path / "one", "--epochs", "2")
    assert rc == 0 and out.count("Every effort") == 1
    assert train_tiny(capsys, data, tmp_path / "two", "--epochs", "2", *args)[0] == 0
    assert (tmp_path / "one" / "metrics.jsonl").read_text() == (
        tmp_path / "two" / "metrics.jsonl").read_text()
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (
        tmp_path / "two" / "model.safetensors").read_bytes()


def test_a_resumed_run_ends_with_a_checkpoint_so_the_next_resume_goes_on_from_it(data, tmp_path,
                                                                                 capsys):
    # Stopped at step 2 (its only checkpoint), resumed without --save-every to step 5: a third
    # resume must start after step 5, not go back to step 2 and overwrite the newer weights.
    out = tmp_path / "run"
    assert train_tiny(capsys, data, out, "--max-steps", "3", "--save-every", "3")[0] == 0
    # as if it had been stopped by a signal in a run without --save-every
    state_path = latest_checkpoint(out) / "state.json"
    state = json.loads(state_path.read_text())
    state["train_args"]["save_every"] = None
    state_path.write_text(json.dumps(state))
    rc, _, err = run_cli(capsys, "train", "--resume", out, "--max-steps", "6")
    assert rc == 0, err
    assert latest_checkpoint(out).name == "ckpt-000005"
    newest = (out / "model.safetensors").read_bytes()
    rc, _, err = run_cli(capsys, "train", "--resume", out, "--max-steps", "6")
    assert rc == 0 and "after step 5" in err
    assert (out / "model.safetensors").read_bytes() == newest


def test_resume_extends_a_finished_run(run_copy, capsys):
    rc, out, err = run_cli(capsys, "train", "--resume", run_copy, "--max-steps", "6")
    assert rc == 0, err
    assert "(Step 000004)" in out and "resuming from" in err
    assert latest_checkpoint(run_copy).name == "ckpt-000005"


# -- NaN guard ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [[], ["--fused-adamw", "--no-optim-in-backward"]],
                         ids=["host-check", "fused-adamw-device-flag"])
def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(data, tmp_path, capsys, fused,
                                                               monkeypatch):
    guarded = _count_guarded_steps(monkeypatch)
    # AdamW with lr 1e30 blows the weights up in one step; step 1's loss is not finite.
    rc, _, err = train_tiny(capsys, data, tmp_path / "run", "--lr", "1e30", "--save-every", "1",
                            *fused)
    assert rc == 2
    assert "non-finite" in err and "at step 1 " in err and "ckpt-000000" in err
    assert latest_checkpoint(tmp_path / "run").name == "ckpt-000000"
    assert (guarded and all(guarded)) if fused else not any(guarded)  # the device flag


def _tiny_trainer(data: Path, policy: str, in_backward: bool | None = None, fused: bool = False):
    from diygpt.config import get_preset
    from diygpt.data import prepare_loaders
    from diygpt.model import GPTModel
    from diygpt.tokenizer import get_tokenizer
    from diygpt.training import TrainConfig, Trainer

    cfg = get_preset("tiny").with_updates(context_length=16, emb_dim=16, n_heads=2)
    tl, vl = prepare_loaders(data.read_text(), get_tokenizer(), 2, 16)
    torch.manual_seed(0)
    model = GPTModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    tc = TrainConfig(num_epochs=1, eval_freq=100, eval_iter=1, start_context=None, max_steps=4,
                     progress=False, nan_policy=policy, optim_in_backward=in_backward)
    return Trainer(model, opt, tl, vl, "cpu", tc)


@pytest.mark.parametrize(("in_backward", "fused"), [(False, False), (True, False), (False, True)],
                         ids=["after-backward", "in-backward", "fused-adamw-device-flag"])
def test_inf_gradient_is_caught_before_the_update(data, in_backward, fused, monkeypatch):
    guarded = _count_guarded_steps(monkeypatch)
    trainer = _tiny_trainer(data, "stop", in_backward, fused)
    weight = trainer.model.tok_emb.weight
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 3 else grad

    weight.register_hook(poison)
    with pytest.raises(TrainingError, match="non-finite gradient norm .* at step 2"):
        trainer.fit()
    assert torch.isfinite(weight).all()
    assert guarded == ([True] * 3 if fused else [False] * 3 * (not in_backward))


def _count_guarded_steps(monkeypatch) -> list[bool]:
    """Record, for each StepGuard.step, whether it skipped on the device (fused AdamW)."""
    from diygpt import step_guard

    calls, real = [], step_guard.StepGuard.step

    def spy(self, *args):
        calls.append(step_guard.skips_on_device(self.optimizer, self.precision, self.sharded))
        return real(self, *args)

    monkeypatch.setattr(step_guard.StepGuard, "step", spy)
    return calls


@pytest.mark.parametrize("fused", [False, True], ids=["host-check", "fused-adamw-device-flag"])
def test_skip_policy_skips_the_bad_step(data, capsys, fused, monkeypatch):
    guarded = _count_guarded_steps(monkeypatch)
    trainer = _tiny_trainer(data, "skip", in_backward=False if fused else None, fused=fused)
    seen = []
    trainer.model.tok_emb.weight.register_hook(lambda g: seen.append(
        trainer.model.tok_emb.weight.detach().clone()))
    calls = {"n": 0}

    def poison(module, args, out):
        calls["n"] += module.training  # training forwards only, not evaluation
        return out * float("nan") if calls["n"] == 2 else out

    trainer.model.register_forward_hook(poison)
    trainer.fit()
    assert "non-finite loss (nan) at step 1; step skipped" in capsys.readouterr().err
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.history.global_step == 3
    emb = trainer.model.tok_emb.weight
    assert torch.equal(seen[1], seen[2]) and not torch.equal(seen[2], emb.detach())
    if fused:  # each step guarded on the device, the bad one not counted by AdamW
        assert guarded == [True] * 4 and trainer.optimizer.state[emb]["step"].item() == 3


def test_switches_saved_on_can_be_turned_off_on_resume(tmp_path, data, capsys):
    # Plain store_true flags came back from the checkpoint with no way to type them off.
    assert train_tiny(capsys, data, tmp_path / "run", "--max-steps", "1", "--save-every", "1",
                      "--low-memory", "--no-recompute", "--no-malloc-tuning")[0] == 0
    rc, _, err = run_cli(capsys, "train", "--resume", tmp_path / "run", "--max-steps", "2",
                         "--no-low-memory", "--recompute", "--malloc-tuning", "--progress")
    assert rc == 0, err
    state = json.loads((tmp_path / "run" / "state.json").read_text())["train_args"]
    assert not state["low_memory"] and state["recompute"] and state["malloc_tuning"]


def test_fsdp_is_restored_under_torchrun_only():
    from diygpt.cli.main import build_parser
    from diygpt.cli.resume_args import merge_resume_args

    def merged(*typed: str, launched: bool) -> bool:
        argv = ["train", "--resume", "r", *typed]
        args = build_parser().parse_args(argv)
        args.argv = argv
        return merge_resume_args(args, {"fsdp": True}, args.parser, launched=launched).fsdp

    assert merged(launched=True) and not merged("--no-fsdp", launched=True)
    assert not merged(launched=False)


def test_a_fresh_run_starts_its_own_metrics(data, tmp_path, capsys):
    # A run that died before its first checkpoint leaves only metrics.jsonl; the next fresh
    # run there appended to it, mixing two runs in one file.
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "train_loss": NaN}\n')
    assert train_tiny(capsys, data, out, "--max-steps", "2")[0] == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and all(math.isfinite(r["train_loss"]) for r in records)


def test_a_run_with_no_checkpoint_is_not_offered_for_resume(data, tmp_path, capsys):
    # --epochs 0 saves the untrained model and no checkpoint: "continue it with --resume"
    # led to "no checkpoint to resume from".
    out = tmp_path / "r"
    assert train_tiny(capsys, data, out, "--epochs", "0")[0] == 0
    line = one_line_error(capsys, "train", "--data", data, "--out", out, "--preset", "tiny")
    assert "holds a run with no checkpoint to resume; choose another --out" in line


def test_resuming_a_run_that_reached_max_steps_at_an_epochs_end_adds_no_epoch(data, tmp_path,
                                                                               capsys):
    args = ("--sample-prompt", "Every effort", "--train-ratio", "0.5")
    assert train_tiny(capsys, data, tmp_path / "r", "--epochs", "1", *args)[0] == 0
    steps = json.loads((tmp_path / "r" / "state.json").read_text())["global_step"] + 1
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    rc, out, _ = run_cli(capsys, "train", "--resume", tmp_path / "r", "--epochs", "3",
                         "--max-steps", str(steps))
    assert rc == 0 and "Every effort" not in out
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before
    assert json.loads((tmp_path / "r" / "state.json").read_text())["epochs_done"] == 1


def test_resuming_a_run_stopped_part_way_through_an_epoch_by_max_steps_adds_nothing(
        data, tmp_path, capsys):
    # The --max-steps stop ran the epoch's end (its sample) part-way through the epoch; a
    # resume with no step left printed and recorded that sample again.
    args = ("--sample-prompt", "Every effort", "--train-ratio", "0.5", "--max-steps", "3")
    assert train_tiny(capsys, data, tmp_path / "r", *args)[0] == 0
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert before.count("sample") == 1
    rc, out, _ = run_cli(capsys, "train", "--resume", tmp_path / "r")
    assert rc == 0 and "Every effort" not in out
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before
    # ... and a longer resume goes on in the same epoch, as an unbroken run would
    assert run_cli(capsys, "train", "--resume", tmp_path / "r", "--max-steps", "6")[0] == 0
    assert train_tiny(capsys, data, tmp_path / "six", *args[:4], "--max-steps", "6")[0] == 0
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == (
        tmp_path / "six" / "model.safetensors").read_bytes()


def test_a_save_every_save_on_the_last_step_is_redone_after_the_epochs_end(data, tmp_path,
                                                                          capsys):
    # The --save-every save on the run's last step came before the epoch's sample; the final
    # save was skipped as the same step, so a resume printed the sample again.
    args = ("--sample-prompt", "Every effort", "--train-ratio", "0.5", "--epochs", "1")
    assert train_tiny(capsys, data, tmp_path / "probe", *args)[0] == 0
    steps = json.loads((tmp_path / "probe" / "state.json").read_text())["global_step"] + 1
    out = tmp_path / "r"
    assert train_tiny(capsys, data, out, *args, "--save-every", str(steps))[0] == 0
    state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    assert state["epoch_end_done"] and state["epoch_finished"] and state["epochs_done"] == 1
    rc, printed, _ = run_cli(capsys, "train", "--resume", out)
    assert rc == 0 and "Every effort" not in printed
    assert (out / "metrics.jsonl").read_text() == (tmp_path / "probe" / "metrics.jsonl").read_text()


def test_resuming_into_a_read_only_run_folder_is_one_line(run_copy, capsys, monkeypatch):
    import builtins

    def read_only(path, mode="r", *args, **kwargs):
        if "+" in mode or "w" in mode or "a" in mode:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr("diygpt.trainer_state.open", read_only, raising=False)
    line = one_line_error(capsys, "train", "--resume", run_copy, "--max-steps", "6")
    assert f"cannot write {run_copy / 'metrics.jsonl'}: the folder is read-only" in line


def test_a_full_disk_at_the_loss_plot_is_one_line_and_keeps_the_old_plot(run_copy, capsys,
                                                                         monkeypatch):
    from matplotlib.figure import Figure

    old = (run_copy / "loss.png").read_bytes()

    def full(self, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    line = one_line_error(capsys, "train", "--resume", run_copy, "--max-steps", "6")
    assert line.endswith(f"cannot write {run_copy / 'loss.png'}: no space left on device")
    assert (run_copy / "loss.png").read_bytes() == old


def test_a_cosine_run_resumed_with_another_length_says_the_curve_changes(data, tmp_path, capsys):
    out = tmp_path / "r"
    assert train_tiny(capsys, data, out, "--max-steps", "2", "--cosine")[0] == 0
    rc, _, err = run_cli(capsys, "train", "--resume", out, "--max-steps", "4")
    assert rc == 0 and ("note: --cosine's curve now spans 4 steps, not the 2 it spanned when "
                        "ckpt-000001 was saved") in err
    for more in ("--max-steps", "4"), ("--max-steps", "3"), ("--epochs", "9"):
        # the same length (--epochs 9 is still capped by --max-steps 4), or nothing to train
        rc, _, err = run_cli(capsys, "train", "--resume", out, *more)
        assert rc == 0 and "--cosine's curve" not in err, more
