"""The command line: a real train -> generate -> eval round trip, and one-line errors."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_cli, train_tiny

FAST = ["--preset", "tiny", "--context-length", "32", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, verdict_path):
    out = tmp_path_factory.mktemp("run")
    cmd = [sys.executable, "-m", "diygpt", "train", "--data", str(verdict_path), *FAST,
           "--epochs", "1", "--max-steps", "8", "--eval-freq", "4", "--eval-iter", "1", "--lr", "0.003",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_train_prints_the_books_lines(trained_run):
    out, proc = trained_run
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("Ep 1 (Step 000000): Train loss ")
    assert lines[-1].startswith("Every effort moves you")
    assert "Traceback" not in proc.stderr
    for name in ("model.safetensors", "optimizer.pt", "state.json", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file()


def test_generate_from_the_run_streams_and_is_reproducible(trained_run, capsys):
    out, _ = trained_run
    args = ["generate", "--checkpoint", str(out), "--prompt", "Every effort moves you",
            "--max-new-tokens", "12", "--temperature", "1.0", "--top-k", "20", "--seed", "7"]
    rc1, text1, _ = run_cli(capsys, *args)
    rc2, text2, _ = run_cli(capsys, *args, "--no-cache")
    assert rc1 == rc2 == 0 and text1 == text2 and text1.startswith("Every effort moves you")


def test_eval_reports_loss_and_perplexity(trained_run, capsys, verdict_path):
    out, _ = trained_run
    rc, text, _ = run_cli(capsys, "eval", "--checkpoint", str(out), "--data", str(verdict_path),
                          "--max-batches", "3")
    assert rc == 0 and text.startswith("loss ") and "perplexity" in text
    # The reference: the book's windows over the whole text, F.cross_entropy over every
    # target of the first 3 batches of 4
    import math

    import torch

    from book_reference import BookGPTDatasetV1
    from diygpt import get_tokenizer
    from diygpt.checkpoints import load_model

    model = load_model(out)
    n = model.context_length
    windows = BookGPTDatasetV1(verdict_path.read_text(), get_tokenizer(), n, n)
    x = torch.stack([windows[i][0] for i in range(12)])
    y = torch.stack([windows[i][1] for i in range(12)])
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    words = text.split()
    loss, ppl = float(words[1]), float(words[3])
    assert loss == pytest.approx(want, abs=1e-4) and ppl == pytest.approx(math.exp(want), rel=1e-4)
    assert f"(3 batches, {12 * n} predictions scored" in text


def test_every_command_has_help(capsys):
    for cmd in ("train", "generate", "eval", "download"):
        rc, text, _ = run_cli(capsys, cmd, "--help")
        assert rc == 0 and "--" in text
    rc, text, _ = run_cli(capsys, "train", "--help")
    for flag in ("--data", "--preset", "--epochs", "--batch-size", "--lr", "--weight-decay",
                 "--train-ratio", "--context-length", "--stride", "--drop-rate", "--eval-freq",
                 "--eval-iter", "--seed", "--no-shuffle", "--drop-last", "--no-drop-last", "--attn",
                 "--sample-prompt", "--out", "--device", "--max-steps", "--tokenizer-dir"):
        assert flag in text, flag
    rc, text, _ = run_cli(capsys, "generate", "--help")
    for flag in ("--checkpoint", "--prompt", "--max-new-tokens", "--temperature", "--top-k",
                 "--top-p", "--seed", "--eos"):
        assert flag in text, flag


def _bad_inputs(tmp, verdict):
    empty = tmp / "empty.txt"
    empty.write_text("")
    short = tmp / "short.txt"
    short.write_text("Only a handful of words here.")
    junk = tmp / "junk.safetensors"
    junk.write_bytes(b"garbage")
    train = ["train", "--out", str(tmp / "never"), *FAST]
    gen = ["generate", "--checkpoint", str(junk), "--preset", "tiny"]
    return [
        (train + ["--data", str(tmp / "missing.txt")], "does not exist"),
        (train + ["--data", str(empty)], "is empty"),
        (train + ["--data", str(short)], "tokens but needs at least 33"),
        (train + ["--data", str(verdict), "--n-heads", "3"], "divisible"),
        (train + ["--data", str(verdict), "--drop-rate", "1.5"], "--drop-rate"),
        (train + ["--data", str(verdict), "--preset", "gpt3"], "invalid choice"),
        (train + ["--data", str(verdict), "--device", "tpu"], "device"),
        (gen + ["--temperature", "-1"], "temperature"),
        (gen + ["--top-k", "0"], "top_k"),
        (gen + ["--top-p", "1.5"], "top_p"),
        (gen + ["--top-p", "0"], "top_p"),
        (gen, "junk.safetensors: cannot read"),
        (["generate", "--checkpoint", str(tmp / "nope")], "no such checkpoint"),
    ]


def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path, verdict_path, capsys):
    for argv, message in _bad_inputs(tmp_path, verdict_path):
        rc, _, err = run_cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert rc == 2, (argv, err)
        assert len(lines) == 1 and message in lines[0], (argv, err)
        assert "Traceback" not in err


def test_console_script_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diygpt", "--version"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("diygpt ")


def test_train_into_a_closed_pipe_still_trains_and_saves(tmp_path, verdict_path):
    # `diygpt train ... | head -1`: the reader leaves after one line; the run must not end
    # there as a success with nothing saved.
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "diygpt", "train", "--data", str(verdict_path), *FAST,
           "--max-steps", "6", "--eval-freq", "1", "--eval-iter", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("Ep 1 (Step 000000)")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert "6 steps" in err and "Traceback" not in err
    assert (out / "model.safetensors").is_file()


def test_generate_into_a_closed_pipe_ends_quietly(tmp_path):
    # `diygpt generate ... | head -c 20`: exit 0 and nothing on stderr (a catch for compile
    # errors placed before the broken-pipe one turned this into a traceback).
    weights = Path(__file__).parent / "fixtures" / "gpt2-tiny-hf"
    cmd = [sys.executable, "-m", "diygpt", "generate", "--weights", str(weights), "--prompt",
           "!", "--max-new-tokens", "3000", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(20)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0 and err == "", err


def test_the_last_line_names_only_what_was_written(tmp_path, verdict_path, capsys):
    rc, _, err = run_cli(capsys, "train", "--data", str(verdict_path), *FAST, "--epochs", "0",
                         "--out", str(tmp_path / "none"))
    assert rc == 0 and "0 steps, 0 tokens seen" in err and "(model.safetensors)" in err
    rc, _, err = run_cli(capsys, "train", "--data", str(verdict_path), *FAST, "--max-steps", "1",
                         "--out", str(tmp_path / "one"))
    assert rc == 0 and "1 step, " in err and "(model.safetensors, loss.png, metrics.jsonl)" in err


@pytest.mark.parametrize(("module", "says"), [
    ("fast_draws", "torch's dropout draws, not the fast ones"),
    ("fast_adamw", "torch's AdamW update, not the fast one"),
    ("fast_gelu", "torch's GELU ops, not the fast ones"),
])
def test_cli_says_in_one_line_when_a_kernel_is_unavailable(module, says, data, tmp_path, capsys,
                                                           monkeypatch):
    # Without a C compiler training goes on with torch's own ops, and says which.
    kernels = importlib.import_module(f"diygpt.{module}")
    monkeypatch.setattr(kernels, "load_kernel", lambda: None)
    monkeypatch.setattr(kernels._loaded, "reason", "no C compiler found (set CC)")
    rc, _, err = train_tiny(capsys, data, tmp_path / "run", "--max-steps", "1")
    assert rc == 0, err
    assert f"{says}: no C compiler found (set CC)" in err


def test_an_error_on_another_rank_names_it(monkeypatch, tmp_path, capsys):
    from cli_helpers import run_cli

    monkeypatch.setenv("RANK", "1")
    rc, _, err = run_cli(capsys, "train", "--data", tmp_path / "missing.txt")
    assert rc == 2 and err.startswith("diygpt: error (rank 1): data file") and err.count("\n") == 1


def test_each_error_line_reaches_stderr_in_one_write(monkeypatch, tmp_path):
    # Under torchrun the ranks share one stderr; print() wrote the text and its newline in two
    # calls, and CI once saw rank 1's line glued onto the end of rank 0's.
    import io
    import sys

    from diygpt.cli.main import main

    class Writes(io.StringIO):
        def __init__(self):
            super().__init__()
            self.calls = []

        def write(self, text):
            self.calls.append(text)
            return super().write(text)

    err = Writes()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--data", str(tmp_path / "missing.txt")]) == 2
    assert len(err.calls) == 1 and err.calls[0].endswith("\n"), err.calls
    assert err.calls[0].startswith("diygpt: error (rank 1): data file")


def test_a_failed_compile_is_one_line_on_its_own_line(tmp_path, capsys, monkeypatch):
    # torch.compile without a working C++ compiler raised a page of InductorError.
    from pathlib import Path

    import torch
    from torch._inductor.exc import InductorError

    import diygpt.generation as generation

    def fails(*args, **kwargs):
        yield torch.tensor([[0]])
        raise InductorError(RuntimeError("InvalidCxxCompiler: No working C++ compiler found"),
                            None)

    monkeypatch.setattr(generation, "stream_generate", fails)
    weights = Path(__file__).parent / "fixtures" / "gpt2-tiny-hf"
    rc, out, err = run_cli(capsys, "generate", "--weights", weights, "--prompt", "!",
                           "--compile", "--max-new-tokens", "3", "--device", "cpu")
    assert rc == 2 and out.endswith("\n")
    assert err.startswith("diygpt: error: --compile failed: ") and "C++ compiler" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("command", ["train", "eval", "prepare"])
def test_data_flag_given_twice_keeps_both(command):
    # nargs="+" alone replaced the first --data's files with the second's, silently
    from diygpt.cli.main import build_parser
    from diygpt.cli.resume_args import explicit_dests

    argv = [command, "--data", "a.txt", "b.txt", "--data", "c.txt", "--out", "x.bin"]
    if command == "eval":
        argv = [*argv[:-2], "--checkpoint", "run"]
    args = build_parser().parse_args(argv)
    assert args.data == ["a.txt", "b.txt", "c.txt"]
    if command == "train":  # what a resume checks against the run's own flags
        assert "data" in explicit_dests(args.parser, argv[1:])
        assert "data" not in explicit_dests(args.parser, ["--resume", "run"])
