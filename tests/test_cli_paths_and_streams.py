"""Where the CLI writes and what it is given as paths: devices, pipes, links, blank paths,
a full or closed standard output, and the advice its errors give (each followed here)."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from cli_helpers import TINY, one_line_error, run_cli, train_tiny

from diygpt.checkpointing import atomic_write_text
from diygpt.errors import CheckpointError, DataError
from diygpt.textfiles import expand_paths


@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert train_tiny(None, data, out, "--max-steps", "1")[0] == 0
    return out


# -- where output goes -------------------------------------------------------------------------
def test_a_pipe_named_as_out_is_refused_and_left_a_pipe(run, data, tmp_path, capsys):
    # os.replace would put a file in its place: for `--out /dev/null` as root, the system's
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for argv in (["prepare", "--data", data, "--out", fifo, "--no-progress"],
                 ["export", "--checkpoint", run, "--out", fifo]):
        line = one_line_error(capsys, *argv)
        assert line == f"diygpt: error: cannot write {fifo}: it is a named pipe, not a regular " \
                       "file; name a file"
        assert fifo.is_fifo()


def test_a_device_is_refused(tmp_path):
    # A private node of /dev/null's kind: never the real one, which a regression would replace.
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except OSError:
        pytest.skip("cannot make a device node here (needs CAP_MKNOD)")
    with pytest.raises(CheckpointError, match="it is a character device, not a regular file"):
        atomic_write_text(node, "x")
    assert node.is_char_device()


def test_out_through_a_symlink_writes_its_target_and_keeps_the_link(data, tmp_path, capsys):
    target = tmp_path / "tokens.bin"
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(target.name)
    rc, _, _ = run_cli(capsys, "prepare", "--data", data, "--out", link, "--no-progress")
    assert rc == 0 and link.is_symlink() and target.stat().st_size > 3
    loop = tmp_path / "loop.bin"
    loop.symlink_to(loop.name)
    assert "a symlink loop" in one_line_error(capsys, "prepare", "--data", data, "--out", loop)


def test_a_run_copied_as_symlinks_is_resumed_without_writing_the_original(data, tmp_path,
                                                                          capsys):
    # `cp -rs RUN COPY`: the copy's files are replaced or copied before they change, never
    # written through (metrics.jsonl was cut and appended to in the original)
    original = tmp_path / "original"
    assert train_tiny(capsys, data, original, "--max-steps", "2", "--save-every", "1")[0] == 0
    copy = tmp_path / "copy"
    for p in sorted(original.rglob("*")):
        twin = copy / p.relative_to(original)
        if p.is_dir():
            twin.mkdir(parents=True)
        else:
            twin.parent.mkdir(parents=True, exist_ok=True)
            twin.symlink_to(p)
    before = {p: p.read_bytes() for p in original.rglob("*") if p.is_file()}
    assert run_cli(capsys, "train", "--resume", copy, "--max-steps", "3")[0] == 0
    assert {p: p.read_bytes() for p in original.rglob("*") if p.is_file()} == before
    assert not (copy / "metrics.jsonl").is_symlink() and not (copy / ".lock").is_symlink()
    assert json.loads((copy / "state.json").read_text())["global_step"] == 2


@contextmanager
def _locked_by_another_process(folder: Path):
    """``folder``'s run lock held by a child process: its pid (skips where locks are not
    available). A second lock in one process is refused by flock, not by every filesystem's."""
    code = ("import sys, time; from diygpt.checkpointing import lock_run_folder; "
            "held = lock_run_folder(sys.argv[1]); print('held' if held else 'none', flush=True); "
            "time.sleep(120)")
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE,
                             text=True)
    try:
        if child.stdout.readline().strip() != "held":
            pytest.skip("no file locks on this filesystem")
        yield child.pid
    finally:
        child.kill()
        child.wait()


# -- blank paths -------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["train", "--data", ""], ["train", "--data", "DATA", "--out", ""],
    ["train", "--data", "DATA", "--init-from", " "], ["train", "--resume", ""],
    ["train", "--data", "DATA", "--tokenizer-dir", ""], ["generate", "--weights", ""],
    ["generate", "--checkpoint", ""], ["eval", "--checkpoint", "RUN", "--data", ""],
    ["prepare", "--data", "DATA", "--out", ""], ["export", "--checkpoint", "RUN", "--out", ""],
    ["download", "gpt2-small", "--dir", ""],
])
def test_a_blank_path_is_an_argument_error(run, data, capsys, argv):
    # `--data "$CORPUS"` with CORPUS unset: "" was the current folder, or no source at all
    argv = [{"DATA": data, "RUN": run}.get(a, a) for a in argv]
    rc, _, err = run_cli(capsys, *argv)
    flag = next(argv[i - 1] for i, a in enumerate(argv) if isinstance(a, str) and not a.strip())
    assert rc == 2 and f"argument {flag}: expected a path, got " in err


def test_the_python_api_refuses_a_blank_data_path_and_names_a_broken_link(tmp_path):
    with pytest.raises(DataError, match="a data path is blank"):
        expand_paths([""])
    link = tmp_path / "gone.txt"
    link.symlink_to(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="is a broken symbolic link"):
        expand_paths(link)


# -- standard output ---------------------------------------------------------------------------
def _diygpt(*argv, stdout=None, env=None, shell_suffix: str = "") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "diygpt", *map(os.fsdecode, argv)]
    if shell_suffix:
        command = ["bash", "-c", shlex.join(command) + shell_suffix]
    return subprocess.run(command, stdout=stdout, stderr=subprocess.PIPE,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_standard_output(run, data, tmp_path):
    with open("/dev/full", "w") as full:
        shown = _diygpt("generate", "--checkpoint", run, "--max-new-tokens", "2", stdout=full)
        # training goes on: hours of it are worth more than the log
        trained = _diygpt("train", "--data", data, *TINY, "--max-steps", "2", "--eval-freq", "1",
                          "--no-progress", "--out", tmp_path / "r", stdout=full)
    err = shown.stderr.decode()
    assert shown.returncode == 2, err
    assert err.splitlines()[-1] == "diygpt: error: cannot write the output: No space left on device"
    err = trained.stderr.decode()
    assert trained.returncode == 0 and "Traceback" not in err, err
    assert "warning: cannot write the log to the standard output (No space left on device)" in err
    records = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r).get("step") for r in records][:2] == [0, 1]


def test_a_closed_standard_output_is_output_discarded(run):
    done = _diygpt("generate", "--checkpoint", run, "--max-new-tokens", "2", shell_suffix=" >&-")
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr.decode()


def test_a_prompt_read_rightly_echoes_unchanged(run, capsys):
    rc, out, _ = run_cli(capsys, "generate", "--checkpoint", run, "--prompt", "café €",
                         "--max-new-tokens", "1")
    assert rc == 0 and out.startswith("café €")


def test_a_prompt_that_is_not_utf8_echoes_as_replacement_characters(run):
    # `--prompt "$(cat latin1.txt)"` under a strict UTF-8 stdout (en_US.UTF-8) failed to echo
    done = _diygpt("generate", "--checkpoint", run, "--prompt", b"caf\xe9", "--max-new-tokens",
                   "2", stdout=subprocess.PIPE, env={"PYTHONIOENCODING": "utf-8:strict"})
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.startswith("caf\ufffd".encode())


# -- what errors advise ------------------------------------------------------------------------
def test_a_text_too_large_for_memory_points_to_prepare(data, tmp_path, capsys, monkeypatch):
    import diygpt.data

    def fail(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(diygpt.data, "load_training_data", fail)
    line = one_line_error(capsys, "train", "--data", data, *TINY, "--out", tmp_path / "r")
    assert line.startswith("diygpt: error: out of memory: a Python allocation failed; ")
    assert "tokenize it with `diygpt prepare` and pass the .bin" in line


@pytest.mark.parametrize("value", ["0", "false", "off", ""])
def test_diygpt_traceback_off_values_keep_one_line(data, tmp_path, capsys, monkeypatch, value):
    from diygpt.model import GPTModel

    def fail(self, cfg):
        raise MemoryError

    monkeypatch.setattr(GPTModel, "__init__", fail)
    monkeypatch.setenv("DIYGPT_TRACEBACK", value)
    assert "out of memory" in one_line_error(capsys, "train", "--data", data, *TINY, "--out",
                                             tmp_path / "r")


def test_the_non_finite_loss_advice_can_be_followed(data, tmp_path, capsys, monkeypatch):
    # --resume keeps the run's --lr and --grad-clip: the advice named flags it refuses
    import torch

    from diygpt.training import Trainer

    finish = Trainer.finish_step

    def nan_at_step_2(self, loss):  # a bad batch, not weights already blown up
        if self.history.global_step + 1 == 2:
            self._non_finite(torch.tensor(float("nan")), torch.tensor(1.0))
        return finish(self, loss)

    monkeypatch.setattr(Trainer, "finish_step", nan_at_step_2)
    line = one_line_error(capsys, "train", "--data", data, *TINY, "--batch-size", "2",
                          "--save-every", "1", "--no-progress", "--out", tmp_path / "run")
    assert "the last good checkpoint is " in line
    commands = re.findall(r"\(diygpt (train [^)]*)\)", line)
    assert len(commands) == 2, line
    new_run, skip = (shlex.split(c.replace("LOWER", "1e-4")) for c in commands)
    assert "--init-from" in new_run and "--resume" in skip
    new_run[new_run.index("NEW")] = str(tmp_path / "new")
    assert new_run[new_run.index("--data") + 1] == str(data.resolve())
    rc, _, err = run_cli(capsys, *new_run, "--max-steps", "2", "--no-progress")
    assert rc == 0, err
    rc, _, err = run_cli(capsys, *skip, "--max-steps", "3")
    assert rc == 0 and "non-finite loss (nan) at step 2; step skipped" in err


def test_a_resume_while_the_run_trains_is_refused_before_it_writes(run, tmp_path, capsys):
    # it cut the running run's metrics.jsonl back to its checkpoint, then met the lock
    import shutil

    out = tmp_path / "busy"
    shutil.copytree(run, out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 99}\n')  # written by the running run after its checkpoint
    before = (out / "metrics.jsonl").read_bytes()
    with _locked_by_another_process(out) as pid:
        line = one_line_error(capsys, "train", "--resume", out, "--max-steps", "5")
    assert line.endswith(f"{out} is in use by another run (pid {pid}); wait for it to end, or "
                         "choose another --out")
    assert (out / "metrics.jsonl").read_bytes() == before


def test_resume_names_what_it_takes(run, capsys):
    ckpt = next(run.glob("ckpt-*"))
    line = one_line_error(capsys, "train", "--resume", ckpt)
    assert f"{ckpt} is one checkpoint of the run {run}: --resume takes the run folder" in line
    assert f"use --init-from {ckpt}" in line
    line = one_line_error(capsys, "train", "--resume", run / "model.safetensors")
    assert "is a file: --resume takes the run folder (--out)" in line
    fifo = run.parent / "pipe"
    os.mkfifo(fifo)
    line = one_line_error(capsys, "train", "--resume", fifo)
    assert "is a named pipe: --resume takes the run folder (--out)" in line
    fifo.unlink()


def test_a_relative_tokenizer_dir_is_saved_resolved(data, tmp_path, capsys, monkeypatch):
    # a resume from another folder found the tokenizer where the first command was typed
    tokenizer = Path(os.environ["DIYGPT_TOKENIZER_DIR"]).resolve()
    monkeypatch.chdir(tokenizer.parent)
    rc, _, _ = train_tiny(capsys, data, tmp_path / "r", "--max-steps", "1", "--tokenizer-dir",
                          tokenizer.name)
    state = json.loads((tmp_path / "r" / "state.json").read_text())
    assert rc == 0 and state["train_args"]["tokenizer_dir"] == str(tokenizer)


@pytest.mark.parametrize(("flags", "said"), [
    (["--min-lr", "1e-3", "--lr", "1e-4", "--cosine"], "--min-lr 0.001 is above --lr 0.0001"),
    (["--min-lr", "1e-5"], "--min-lr 1e-05 needs --cosine"),
])
def test_min_lr_that_cannot_do_what_it_says(data, tmp_path, capsys, flags, said):
    assert said in one_line_error(capsys, "train", "--data", data, *TINY, *flags,
                                  "--out", tmp_path / "r")


def test_a_run_saved_with_an_idle_min_lr_still_resumes(data, tmp_path, capsys):
    # runs saved before the --min-lr checks keep their settings on --resume
    out = tmp_path / "r"
    assert train_tiny(capsys, data, out, "--max-steps", "1")[0] == 0
    for state_file in [out / "state.json", *out.glob("ckpt-*/state.json")]:
        state = json.loads(state_file.read_text())
        state["train_args"]["min_lr"] = 0.5
        state_file.write_text(json.dumps(state))
    assert run_cli(capsys, "train", "--resume", out, "--max-steps", "2")[0] == 0


def test_one_file_of_a_run_names_the_run_folder(run, capsys):
    for name in ("model.safetensors", "state.json"):
        line = one_line_error(capsys, "generate", "--checkpoint", run / name)
        assert line.endswith(f"is one file of the run {run}: give the run folder "
                             f"(--checkpoint {run})")


def test_a_pipe_as_weights_is_one_line(data, tmp_path, capsys):
    # reading a pipe waits for a writer: `--weights <(cat model.pth)` hung
    fifo = tmp_path / "model.pth"
    os.mkfifo(fifo)
    for argv in (["generate", "--weights", fifo], ["generate", "--checkpoint", fifo, "--preset", "tiny"],
                 ["train", "--data", data, "--init-from", fifo, "--out", tmp_path / "r"]):
        assert f"{fifo} is a named pipe, not a weights file" in one_line_error(capsys, *argv)


def test_weights_that_are_not_a_run_are_not_written_over(run, data, tmp_path, capsys):
    folder = tmp_path / "download"
    folder.mkdir()
    weights = (run / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights)
    line = one_line_error(capsys, "train", "--data", data, *TINY, "--out", folder)
    assert line.endswith("holds model.safetensors but is not a diygpt run; a run there would "
                         "write over it: choose another --out")
    assert (folder / "model.safetensors").read_bytes() == weights


def test_skipped_steps_are_counted_in_the_last_line(data, tmp_path, capsys):
    # lr 1e30 blows the weights up at once: every later step is non-finite
    rc, _, err = train_tiny(capsys, data, tmp_path / "r", "--max-steps", "4", "--lr", "1e30",
                            "--nan-policy", "skip")
    assert rc == 0 and "diygpt: 4 steps (3 skipped as non-finite), " in err


def test_negative_zero_is_zero(data, tmp_path, capsys):
    rc, _, _ = train_tiny(capsys, data, tmp_path / "r", "--max-steps", "1", "--drop-rate", "-0")
    state = json.loads((tmp_path / "r" / "state.json").read_text())
    assert rc == 0 and str(state["train_args"]["drop_rate"]) == "0.0"


def test_a_second_run_into_a_folder_in_use_is_refused(data, tmp_path, capsys):
    # two runs on one --out mixed their checkpoints and metrics.jsonl; one died on a temp file
    out = tmp_path / "r"
    out.mkdir()
    with _locked_by_another_process(out) as pid:
        line = one_line_error(capsys, "train", "--data", data, *TINY, "--out", out)
    assert line.endswith(f"{out} is in use by another run (pid {pid}); wait for it to end, or "
                         "choose another --out")
    assert not list(out.glob("ckpt-*"))
    rc, _, _ = train_tiny(capsys, data, out, "--max-steps", "1")  # the lock went with its holder
    assert rc == 0


def test_a_trainer_of_this_process_holding_the_folder_is_named(data, tmp_path):
    from diygpt.checkpointing import lock_run_folder

    held = lock_run_folder(tmp_path)
    if held is None:
        pytest.skip("no file locks on this filesystem")
    try:
        second = lock_run_folder(tmp_path)
    except CheckpointError as exc:
        assert "is held by another Trainer in this process" in str(exc)
    else:  # POSIX-lock emulation (some network filesystems) does not refuse its own process
        if second is not None:
            second.close()
        pytest.skip("this filesystem's locks do not part two opens in one process")
    finally:
        held.close()
