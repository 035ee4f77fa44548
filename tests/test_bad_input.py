"""Every row of docs/bad-input.md: what the user sees for each bad input (no tracebacks)."""

from __future__ import annotations

import errno
import itertools
import os
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY, one_line_error, run_cli, train_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert train_tiny(None, data, out, "--max-steps", "1")[0] == 0
    return out


# -- data --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "expect"),
    [(b"", "is empty"), (b"caf\xe9 au lait", "not valid UTF-8"), (b"\x7fELF\x00\x01", "binary"),
     # Windows Notepad's "Unicode" (with a byte-order mark), and UTF-16 without one
     ("Every effort moves you\n".encode("utf-16"), "is UTF-16 text, not UTF-8; convert it"),
     ("Every effort moves you\n".encode("utf-16-be"), "convert it, e.g. `iconv -f utf-16be "),
     ("Every effort moves you\n".encode("utf-16-le"), "convert it, e.g. `iconv -f utf-16le "),
     (bytes(b for i in range(1, 200) for b in (i, 0)), "binary")],  # 16-bit numbers, not text
)
def test_bad_data_files(tmp_path, capsys, content, expect):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    assert expect in one_line_error(capsys, "train", "--data", path, *TINY)


def test_missing_data_file(tmp_path, capsys):
    assert "does not exist" in one_line_error(capsys, "train", "--data", tmp_path / "nope.txt")


def test_a_pipe_as_data_is_one_line(tmp_path, capsys):
    # `--data <(zcat corpus.gz)` was said not to exist
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for command in ("train", "prepare"):
        line = one_line_error(capsys, command, "--data", fifo, "--out", tmp_path / "x.bin")
        assert f"data file {fifo} is a pipe; write the text to a file first" in line


@pytest.mark.parametrize(("error", "said"), [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                  "allocate memory: you tried to allocate 210793136128 bytes. Error code 12"),
     "tried to allocate 210.8 GB"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a "
                            "total capacity of 139.81 GiB\nof which 1.00 GiB is free."),
     "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 139.81 GiB;"),
])
def test_running_out_of_memory_is_one_line(tmp_path, data, capsys, monkeypatch, error, said):
    # e.g. `--emb-dim 1048576`: the model's 210 GB cannot be allocated
    from diygpt.model import GPTModel

    def fail(self, cfg):
        raise error

    monkeypatch.setattr(GPTModel, "__init__", fail)
    line = one_line_error(capsys, "train", "--data", data, *TINY, "--out", tmp_path / "run")
    assert line.startswith(f"diygpt: error: out of memory: {said}")
    assert "use a smaller --batch-size or model" in line


def test_text_shorter_than_one_window(tmp_path, capsys):
    path = tmp_path / "short.txt"
    path.write_text("Every effort moves you.")
    assert "needs at least 17" in one_line_error(capsys, "train", "--data", path, *TINY)


def test_batch_larger_than_the_windows(data, tmp_path, capsys):
    line = one_line_error(
        capsys, "train", "--data", data, *TINY, "--batch-size", "999", "--out", tmp_path / "r"
    )
    assert "larger than the" in line and "--no-drop-last" in line


def test_empty_validation_split_warns_and_trains(data, tmp_path, capsys):
    rc, out, err = train_tiny(capsys, data, tmp_path / "r", "--train-ratio", "1.0", "--max-steps", "1")
    assert rc == 0 and "validation loss will be nan" in err
    assert "Val loss nan" in out


# -- generation ------------------------------------------------------------------------------
def test_empty_prompt(run, capsys):
    assert "prompt is empty" in one_line_error(capsys, "generate", "--checkpoint", run, "--prompt", "")


def test_prompt_longer_than_the_context(run, capsys):
    rc, out, err = run_cli(
        capsys, "generate", "--checkpoint", run, "--prompt", "word " * 40, "--max-new-tokens", "2"
    )
    assert rc == 0 and "the model sees its last 16" in err


def test_zero_new_tokens_prints_the_prompt(run, capsys):
    rc, out, _ = run_cli(capsys, "generate", "--checkpoint", run, "--max-new-tokens", "0")
    assert rc == 0 and out == "Every effort moves you\n"


@pytest.mark.parametrize(
    ("flag", "value", "expect"),
    [
        ("--max-new-tokens", "-1", "max_new_tokens must be an integer >= 0"),
        ("--temperature", "-0.5", "temperature must be a finite number >= 0"),
        ("--top-p", "0", "top_p must be in (0, 1]"),
        ("--top-p", "1.5", "top_p must be in (0, 1]"),
        ("--top-k", "0", "top_k must be a positive integer"),
        ("--device", "tpu", "unknown device"),
        ("--device", "cuda:7", "device"),
    ],
)
def test_bad_generation_values(run, capsys, flag, value, expect):
    if value.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert expect in one_line_error(capsys, "generate", "--checkpoint", run, flag, value)


def test_nan_temperature_is_an_argument_error(run, capsys):
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", run, "--temperature", "nan")
    assert rc == 2 and "expected a finite number" in err


@pytest.mark.parametrize("command", [["train"], ["generate"], ["eval", "--data", "x"],
                                     ["download", "gpt2-small"],
                                     ["prepare", "--data", "x", "--out", "y"]])
def test_an_unknown_flag_names_the_command_and_its_help(capsys, command):
    rc, _, err = run_cli(capsys, *command, "--bogus", "3")
    command = command[0]
    assert rc == 2
    assert err == (f"diygpt {command}: error: unrecognized arguments: --bogus 3 "
                   f"(see diygpt {command} --help)\n")


def test_a_flag_before_the_command_is_the_top_parsers_to_name(capsys):
    rc, _, err = run_cli(capsys, "--no-cache", "generate", "--checkpoint", "x")
    assert rc == 2
    assert err == "diygpt: error: unrecognized arguments: --no-cache (see diygpt --help)\n"


def test_model_source_and_run_folder_mistakes_are_one_line(run, data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    bare = tmp_path / "bare.pth"
    torch.save(torch.nn.Module().state_dict(), bare)
    odd_width = tmp_path / "odd.pth"  # not one of GPT-2's four widths, and no config.json
    from diygpt import GPTModel

    torch.save(GPTModel({"vocab_size": 300, "context_length": 16, "emb_dim": 40,
                         "n_heads": 2, "n_layers": 1}).state_dict(), odd_width)
    tiny_hf = Path(__file__).parent / "fixtures" / "gpt2-tiny-hf"
    cases = [
        (["generate", "--weights", odd_width], f"{odd_width}: cannot tell n_heads for emb_dim "
         "40; put a config.json next to the weights"),
        (["generate", "--weights", tiny_hf], "prompt token id 6109 is outside the model's "
         "vocabulary of 500"),
        (["eval", "--checkpoint", run, "--data", data, "--context-length", "1000"],
         "--context-length 1000 exceeds the model's context length 16"),
        (["train", "--data", data, "--compile-mode", "max-autotune"],
         "--compile-mode max-autotune needs --compile"),
        (["train", "--resume", tmp_path / "nope"], f"{tmp_path / 'nope'}: no such run folder"),
        (["generate", "--checkpoint", bare], f"{bare}: a bare weights file needs a model "
         "config (--preset NAME, or --weights FILE"),
        (["generate", "--checkpoint", run, "--weights", run],
         "give exactly one of --checkpoint, --weights or --pretrained"),
        (["generate", "--checkpoint", empty], f"{empty}/state.json: missing (is {empty} a "
         "diygpt run folder?)"),
        (["train", "--data", empty, *TINY], f"folder {empty} contains no .txt files"),
        (["generate", "--checkpoint", run, "--tokenizer-dir", empty],
         f"tokenizer folder {empty} must contain encoder.json and vocab.bpe"),
    ]
    for argv, expect in cases:
        assert expect in one_line_error(capsys, *argv), argv


@pytest.mark.parametrize("flag", ["--batch-size", "--grad-accum", "--max-steps", "--eval-freq",
                                  "--eval-iter", "--save-every", "--keep-last", "--stride",
                                  "--context-length"])
def test_a_count_of_zero_is_an_argument_error(data, capsys, flag):
    rc, _, err = run_cli(capsys, "train", "--data", data, flag, "0")
    assert rc == 2 and err == (f"diygpt train: error: argument {flag}: expected a positive "
                               "integer, got 0 (see diygpt train --help)\n")


def test_eval_warns_of_a_stride_past_the_window(run, data, capsys):
    rc, _, err = run_cli(capsys, "eval", "--checkpoint", run, "--data", data, "--stride", "20")
    assert rc == 0
    assert "diygpt: warning: --stride 20 is past the context length 16: 4 of every 20 tokens " \
           "are never scored" in err


def test_eval_of_a_model_with_a_smaller_vocabulary(data, capsys):
    tiny_hf = Path(__file__).parent / "fixtures" / "gpt2-tiny-hf"  # a 500-token vocabulary
    line = one_line_error(capsys, "eval", "--weights", tiny_hf, "--data", data, "--max-batches", "1")
    assert "outside the model's vocabulary of 500" in line


@pytest.mark.parametrize("seed", ["18446744073709551616", "-9223372036854775809"])
def test_a_seed_past_64_bits_is_an_argument_error(run, data, tmp_path, capsys, seed):
    for argv in (["generate", "--checkpoint", run], ["train", "--data", data, *TINY,
                                                     "--out", tmp_path / "r"]):
        rc, _, err = run_cli(capsys, *argv, "--seed", seed)
        assert rc == 2 and "argument --seed: expected an integer from -2**63 to 2**64-1" in err
        assert "Traceback" not in err


@pytest.mark.parametrize(("flag", "value", "expect"), [
    ("--lr", "0", "a number in (0, 1e+30], got 0"), ("--lr=-0.001", None, "a number in (0, 1e+30]"),
    ("--lr", "1e38", "a number in (0, 1e+30], got 1e38"),  # AdamW's step overflowed float32: a traceback
    ("--weight-decay", "-1", "a number >= 0, got -1"), ("--epochs", "-1", "an integer >= 0"),
    ("--epochs", "1.5", "an integer, got '1.5'"), ("--train-ratio", "1.5", "a number in (0, 1]"),
    ("--train-ratio", "0", "a number in (0, 1], got 0"), ("--drop-rate", "1", "a number in [0, 1), got 1"),
    ("--warmup-steps", "-1", "an integer >= 0"), ("--grad-clip", "0", "a number > 0, got 0"),
    ("--min-lr", "-1", "a number in [0, 1e+30], got -1"), ("--min-lr", "1e38", "a number in [0, 1e+30]")])
def test_bad_training_values_name_the_flag_and_value(data, tmp_path, capsys, flag, value, expect):
    args = [flag] if value is None else [flag, value]
    rc, _, err = run_cli(capsys, "train", "--data", data, *TINY, *args, "--out", tmp_path / "r")
    assert rc == 2 and f"argument {flag.split('=')[0]}: expected {expect}" in err


def test_grad_accum_past_the_batch_gets_a_note(data, tmp_path, capsys):
    rc, _, err = train_tiny(capsys, data, tmp_path / "r", "--max-steps", "1", "--grad-accum", "4")
    assert rc == 0 and "--grad-accum 4 is more than the 2 windows of a batch" in err


def test_a_stride_past_the_context_warns_that_text_is_skipped(data, tmp_path, capsys):
    rc, _, err = train_tiny(capsys, data, tmp_path / "r", "--max-steps", "1", "--stride", "40")
    assert rc == 0 and "--stride 40 is past the context length 16: 24 of every 40 tokens" in err


def test_sampling_flags_at_temperature_0_get_a_note(run, capsys):
    rc, greedy, err = run_cli(capsys, "generate", "--checkpoint", run, "--top-k", "5",
                              "--seed", "3", "--max-new-tokens", "3")
    assert rc == 0 and "--top-k, --seed change nothing at --temperature 0 (greedy)" in err
    rc, plain, err = run_cli(capsys, "generate", "--checkpoint", run, "--max-new-tokens", "3")
    assert rc == 0 and plain == greedy and "note" not in err
    rc, _, err = run_cli(capsys, "generate", "--checkpoint", run, "--top-p", "0.5",
                         "--max-new-tokens", "3")
    assert rc == 0 and "--top-p changes nothing at --temperature 0" in err


def test_int8_generation_with_another_dtype_is_one_line(run, capsys):
    line = one_line_error(capsys, "generate", "--checkpoint", run, "--quantize", "int8",
                          "--dtype", "bf16", "--max-new-tokens", "2")
    assert "--quantize int8 computes in fp32: drop --dtype bf16" in line


def test_top_k_above_the_vocabulary_is_clamped(run, capsys):
    rc, out, _ = run_cli(
        capsys, "generate", "--checkpoint", run, "--top-k", "999999", "--temperature", "1",
        "--seed", "1", "--max-new-tokens", "3",
    )
    assert rc == 0 and out.startswith("Every effort moves you")


def test_huge_max_new_tokens_streams_lazily(run):
    from diygpt.checkpoints import load_model
    from diygpt.generation import stream_generate

    model = load_model(run)
    tokens = stream_generate(model, torch.tensor([[464, 3290]]), 10**18, 16)
    assert len(list(itertools.islice(tokens, 20))) == 20  # slides past the context, no hang


# -- files and folders -----------------------------------------------------------------------
def test_no_space_left_while_saving(data, tmp_path, capsys, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    rc, _, err = train_tiny(capsys, data, tmp_path / "r", "--max-steps", "1")
    assert rc == 2 and "no space left on device" in err
    assert not list((tmp_path / "r").glob(".*.tmp-*"))


def test_read_only_output_folder(data, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
    else:  # root ignores permissions: simulate a read-only filesystem
        real = Path.write_bytes

        def read_only(self, data):
            if self.parent == ro:
                raise OSError(errno.EROFS, "Read-only file system")
            return real(self, data)

        monkeypatch.setattr(Path, "write_bytes", read_only)
    line = one_line_error(capsys, "train", "--data", data, *TINY, "--out", ro)
    assert "read-only or not writable" in line


def test_preset_that_does_not_match_the_checkpoint(run, capsys):
    line = one_line_error(capsys, "generate", "--checkpoint", run, "--preset", "gpt2-small")
    assert "emb_dim" in line or "context_length" in line
    assert line.endswith("(a run folder carries its own config: drop --preset)")


def test_files_that_are_not_state_dicts_say_what_they_are(run, tmp_path, capsys):
    import json

    import torch

    from diygpt.checkpoints import load_model

    (tmp_path / "notes.pth").write_text("my training notes\n")
    line = one_line_error(capsys, "generate", "--checkpoint", tmp_path / "notes.pth",
                          "--preset", "tiny")
    assert line.endswith("notes.pth: not a file torch.save wrote (neither its zip format nor a pickle)")
    torch.save(load_model(run), tmp_path / "whole.pth")  # the whole module, not its state dict
    line = one_line_error(capsys, "generate", "--checkpoint", tmp_path / "whole.pth",
                          "--preset", "tiny")
    assert "holds a whole model (diygpt.model.GPTModel, from torch.save(model))" in line
    assert line.endswith("save model.state_dict(), as the book does")
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(load_model(run).state_dict(), folder / "model.pth")
    (folder / "config.json").write_text(json.dumps({"vocab_size": 50257})[:-1])
    line = one_line_error(capsys, "generate", "--weights", folder / "model.pth")
    assert "config.json: not valid JSON (" in line


def test_eval_reports_the_token_mean_whatever_the_batch_size(run, data, capsys):
    import re

    out = [run_cli(capsys, "eval", "--checkpoint", run, "--data", data, "--batch-size", b)[1]
           for b in ("1", "3", "5")]
    losses = {re.search(r"loss (\S+)", o).group(1) for o in out}
    assert len(losses) == 1, out  # the mean of batch means moved with --batch-size
    assert all(re.search(r"\(\d+ batches, \d+ predictions scored, over a text of \d+ tokens\)",
                         o) for o in out)


def test_eval_of_a_too_short_text_names_its_own_flags(run, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Hi there.")
    line = one_line_error(capsys, "eval", "--checkpoint", run, "--data", short)
    assert "use more text or a smaller --context-length" in line and "ratio" not in line
