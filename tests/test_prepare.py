"""``diygpt prepare``: streamed multi-threaded tokenization to a uint16 file."""

from __future__ import annotations

import numpy as np
import pytest
from cli_helpers import TINY, one_line_error, run_cli

from diygpt.cli.main import main
from diygpt.data import load_training_data
from diygpt.errors import DataError
from diygpt.prepare import load_tokens, prepare_tokens, read_blocks, safe_cut
from diygpt.tokenizer import EOT_ID


def test_tokens_equal_one_shot_encoding_with_small_blocks(tmp_path, tokenizer, verdict_text):
    src = tmp_path / "verdict.txt"
    src.write_text(verdict_text, encoding="utf-8")
    out = tmp_path / "tokens.bin"
    stats = prepare_tokens(src, out, tokenizer, threads=2, block_bytes=512, progress=False)
    ids = load_tokens(out)
    assert ids.dtype == np.uint16
    assert ids.tolist() == tokenizer.encode_ordinary(verdict_text)
    assert stats.tokens == len(ids) == 5145
    assert stats.bytes_read == src.stat().st_size


def test_blocks_end_before_whitespace_and_cover_the_file(tmp_path):
    src = tmp_path / "a.txt"
    text = "".join(f"line {i} é.\n" for i in range(300)) + "no newline at the end"
    src.write_text(text, encoding="utf-8")
    blocks = list(read_blocks(src, block_bytes=100))
    assert "".join(b for b, _ in blocks) == text
    assert len(blocks) > 30 and all(b[0].isspace() for b, _ in blocks[1:])
    assert sum(n for _, n in blocks) == src.stat().st_size


@pytest.mark.parametrize("text", [
    "I HAD always thought Jack Gisburn rather a cheap genius.\n\n\"The height of his glory\"",
    "CRLF lines\r\nend\r\nlike\r\nthis\r\n",
    "Кириллица без латиницы, строка за строкой.\n\nИ ещё одна.",
    "中文文本。\n第二行。\n",
])
def test_ordinary_text_is_cut_into_small_blocks(tmp_path, text):
    # The first cut rule (only "x\ny") found no place in any of these, so a whole file
    # was one block: memory and time grew with the corpus.
    src = tmp_path / "a.txt"
    src.write_text(text * 400, encoding="utf-8")
    blocks = list(read_blocks(src, block_bytes=256))
    assert max(n for _, n in blocks) < 512 and len(blocks) > src.stat().st_size // 512


# Characters where a cut could go wrong: every Unicode whitespace (\s to GPT-2's regex),
# contractions, digits, punctuation runs, letters of several scripts, and the literal token.
_NASTY = (list(" \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u200a\u2028\u2029\u202f\u205f\u3000")
          + ["'s", "'ll", "'", "a", "Z", "9", "42", ".", "!?", "é", "я", "р", "中", "的", "🙂",
             "\x1c", "<|endoftext|>"])


def test_every_cut_place_keeps_the_ids_of_the_whole(tokenizer):
    import random

    def enc(t):
        return tokenizer.encode(t, allowed_special={"<|endoftext|>"})

    rng = random.Random(0)
    places = 0
    for _ in range(2000):
        text = "".join(rng.choice(_NASTY) for _ in range(rng.randint(2, 14)))
        data = text.encode("utf-8")
        whole = enc(text)
        for p in range(1, len(data)):
            if safe_cut(data[: p + 1], p - 1) == p:  # the rule allows a cut before byte p
                places += 1
                assert enc(data[:p].decode()) + enc(data[p:].decode()) == whole, (text, p)
    assert places > 1000


def test_prepared_ids_equal_train_data_ids_with_tiny_blocks(tmp_path, tokenizer):
    import random

    rng = random.Random(1)
    for name in ("a.txt", "b.txt"):
        text = "".join(rng.choice(_NASTY) for _ in range(400))
        (tmp_path / name).write_text(text, encoding="utf-8")
    out = tmp_path / "t.bin"
    prepare_tokens(tmp_path, out, tokenizer, threads=2, block_bytes=7, progress=False)
    expected = load_training_data([tmp_path], tokenizer, 1.0).train_ids.tolist()
    assert load_tokens(out).tolist() == expected


def test_documents_are_separated_by_endoftext(tmp_path, tokenizer):
    for name, text in (("a.txt", "Hello world\n"), ("b.txt", "Every effort moves you\n")):
        (tmp_path / name).write_text(text)
    out = tmp_path / "out" / "tokens.bin"
    prepare_tokens(tmp_path, out, tokenizer, progress=False)
    expected = (tokenizer.encode_ordinary("Hello world\n") + [EOT_ID]
                + tokenizer.encode_ordinary("Every effort moves you\n"))
    assert load_tokens(out).tolist() == expected


def test_cli_reports_rate_and_bad_input_is_one_line(tmp_path, verdict_path, capsys):
    out = tmp_path / "t.bin"
    assert main(["prepare", "--data", str(verdict_path), "--out", str(out), "--no-progress"]) == 0
    done = capsys.readouterr()
    assert "5145 tokens" in done.out and "note" not in done.err
    other = tmp_path / "t.tok"  # written all the same; train would take it for text
    assert main(["prepare", "--data", str(verdict_path), "--out", str(other), "--no-progress"]) == 0
    assert "reads token files named *.bin" in capsys.readouterr().err
    assert other.read_bytes() == out.read_bytes()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe\n")
    assert main(["prepare", "--data", str(bad), "--out", str(out)]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err


def test_train_reads_prepared_token_files(tmp_path, tokenizer, data, capsys):
    out = tmp_path / "train.bin"
    prepare_tokens([data], out, tokenizer, progress=False)
    loaded = load_training_data([out], tokenizer, 0.9)
    ids = tokenizer.encode(data.read_text(encoding="utf-8"))
    split = int(0.9 * len(ids))
    assert loaded.train_ids.tolist() == ids[:split] and loaded.val_ids.tolist() == ids[split:]
    rc, stdout, err = run_cli(capsys, "train", "--data", out, *TINY, "--max-steps", "2",
                              "--eval-freq", "1", "--eval-iter", "1", "--sample-prompt", "",
                              "--no-progress", "--out", tmp_path / "run")
    assert rc == 0 and stdout.startswith("Ep 1 (Step 000000): Train loss "), err
    mixed = run_cli(capsys, "train", "--data", out, data, *TINY, "--out", tmp_path / "r2")
    assert mixed[0] == 2 and "not both" in mixed[2]


def test_a_literal_endoftext_is_its_token_as_in_train(tmp_path, tokenizer):
    src = tmp_path / "eot.txt"
    src.write_text("Once upon a time.<|endoftext|>Another story.\n", encoding="utf-8")
    out = tmp_path / "eot.bin"
    prepare_tokens(src, out, tokenizer, progress=False)
    assert load_tokens(out).tolist() == load_training_data([src], tokenizer, 1.0).train_ids.tolist()
    assert EOT_ID in load_tokens(out).tolist()


def test_several_token_files_are_joined_with_endoftext(tmp_path, tokenizer):
    for name, text in (("a", "Hello world.\n"), ("b", "Every effort.\n")):
        (tmp_path / f"{name}.txt").write_text(text)
        prepare_tokens(tmp_path / f"{name}.txt", tmp_path / f"{name}.bin", tokenizer,
                       progress=False)
    joined = load_training_data([tmp_path / "a.bin", tmp_path / "b.bin"], tokenizer, 1.0)
    as_text = load_training_data([tmp_path / "a.txt", tmp_path / "b.txt"], tokenizer, 1.0)
    assert joined.train_ids.tolist() == as_text.train_ids.tolist()


def test_a_failed_run_keeps_the_old_output_and_leaves_no_temp_file(tmp_path, tokenizer,
                                                                   verdict_path):
    out = tmp_path / "t.bin"
    prepare_tokens(verdict_path, out, tokenizer, progress=False)
    good = out.read_bytes()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("fine text\n")
    (corpus / "b.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(DataError, match="not valid UTF-8"):
        prepare_tokens(corpus, out, tokenizer, progress=False)
    assert out.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == [
        "corpus", "t.bin"]


def test_ctrl_c_and_sigterm_leave_no_part_written_file(tmp_path, verdict_path, monkeypatch,
                                                       capsys):
    import os
    import signal

    import diygpt.prepare as prepare

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the output is being written
        raise AssertionError("SIGTERM did not stop prepare")

    monkeypatch.setattr(prepare, "encode_blocks", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    rc, _, err = run_cli(capsys, "prepare", "--data", verdict_path, "--out", tmp_path / "t.bin",
                         "--no-progress")
    assert rc == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) is before


def test_output_that_is_an_input_a_folder_or_under_a_file_is_one_line(tmp_path, capsys):
    mine = tmp_path / "mine.txt"
    mine.write_text("precious text\n")
    assert "is one of the input files" in one_line_error(
        capsys, "prepare", "--data", mine, "--out", mine)
    assert mine.read_text() == "precious text\n"
    rc, _, err = run_cli(capsys, "prepare", "--data", mine, "--out", tmp_path)
    assert rc == 2 and err.startswith("diygpt: error:") and "is a folder" in err  # no note first
    assert f"cannot write {mine / 'x' / 't.bin'}: {mine} is a file, not a folder" in \
        one_line_error(capsys, "prepare", "--data", mine, "--out", mine / "x" / "t.bin")


def test_empty_inputs_and_outputs_are_one_line(tmp_path, tokenizer, capsys):
    (tmp_path / "blank.txt").write_text(" \n\n")
    assert "is empty" in one_line_error(
        capsys, "prepare", "--data", tmp_path / "blank.txt", "--out", tmp_path / "b.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    assert "empty (0 tokens)" in one_line_error(
        capsys, "train", "--data", tmp_path / "empty.bin", *TINY, "--out", tmp_path / "r")


def test_token_ids_past_the_vocabulary_are_one_line(tmp_path, tokenizer, capsys):
    np.random.default_rng(0).integers(50257, 65536, 4000).astype(np.uint16).tofile(
        tmp_path / "other.bin")
    line = one_line_error(capsys, "train", "--data", tmp_path / "other.bin", *TINY,
                          "--out", tmp_path / "r")
    assert "outside the model's vocabulary of 50257" in line


def test_eval_reads_token_files_as_train_does(tmp_path, tokenizer, data, capsys):
    prepare_tokens(data, tmp_path / "t.bin", tokenizer, progress=False)
    run_cli(capsys, "train", "--data", data, *TINY, "--max-steps", "1", "--sample-prompt", "",
            "--no-progress", "--out", tmp_path / "run")
    text = run_cli(capsys, "eval", "--checkpoint", tmp_path / "run", "--data", data)
    tokens = run_cli(capsys, "eval", "--checkpoint", tmp_path / "run", "--data", tmp_path / "t.bin")
    assert text[0] == tokens[0] == 0 and text[1] == tokens[1] and "perplexity" in text[1]


def test_crlf_text_gives_the_ids_train_gives(tmp_path, tokenizer, verdict_text):
    (tmp_path / "crlf.txt").write_bytes(verdict_text.replace("\n", "\r\n").encode())
    out = tmp_path / "t.bin"
    prepare_tokens(tmp_path / "crlf.txt", out, tokenizer, block_bytes=64, progress=False)
    assert load_tokens(out).tolist() == tokenizer.encode(verdict_text)


def test_llm_c_token_files_are_read_past_their_header(tmp_path, tokenizer, capsys):
    # llm.c's dev/data scripts write 256 int32s (magic 20240520, version 1, count), then
    # GPT-2's ids as uint16: the same tokens as a headerless file from `diygpt prepare`.
    ids = np.array(tokenizer.encode("Every effort moves you forward."), dtype=np.uint16)
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(ids))
    path = tmp_path / "fineweb_val_000000.bin"
    path.write_bytes(header.tobytes() + ids.tobytes())
    assert load_tokens(path).tolist() == ids.tolist()
    header[1] = 2
    path.write_bytes(header.tobytes() + ids.tobytes())
    with pytest.raises(DataError, match="llm.c token file of version 2; only version 1"):
        load_tokens(path)
    header[1] = 1
    path.write_bytes(header.tobytes() + ids[:-1].tobytes())
    with pytest.raises(DataError, match="its llm.c header says 6 tokens, but the file holds 5"):
        load_tokens(path)


def test_token_files_are_recognised_in_any_letter_case(tmp_path, tokenizer, verdict_path):
    out = tmp_path / "V.BIN"
    prepare_tokens(verdict_path, out, tokenizer, progress=False)
    data = load_training_data([out], tokenizer, 0.9)
    assert len(data.train_ids) + len(data.val_ids) == 5145


def test_prepares_utf8_error_says_how_to_convert(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n" * 1000 + b"\xff\n")
    line = one_line_error(capsys, "prepare", "--data", bad, "--out", tmp_path / "t.bin")
    assert line.endswith("bad.txt is not valid UTF-8 (byte 3000); convert it, e.g. "
                         "`iconv -f latin1 -t utf-8 bad.txt`")


def test_token_file_mistakes_are_one_line(tmp_path, verdict_path, capsys):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    (tmp_path / "dir.bin").mkdir()
    cases = [
        ([tmp_path / "odd.bin"], "odd.bin has an odd size, so it is not a uint16 token file"),
        ([tmp_path / "none.bin"], "token file " + str(tmp_path / "none.bin") + " does not exist"),
        ([verdict_path, tmp_path / "odd.bin"], "give either text files or .bin token files "
         "(from `diygpt prepare`), not both"),
        ([tmp_path / "dir.bin"], "dir.bin is a folder, not a token file from `diygpt prepare`"),
    ]
    for data, message in cases:
        line = one_line_error(capsys, "train", "--data", *data, *TINY, "--out", tmp_path / "r")
        assert line.endswith(message), line


def test_ids_saved_wider_than_uint16_are_refused(tmp_path, verdict_text, tokenizer, capsys):
    # as uint16, int32 ids read as each id then a 0 ("!"): every value is a valid id
    ids = np.array(tokenizer.encode(verdict_text))
    for dtype in ("int32", "int64"):
        ids.astype(dtype).tofile(tmp_path / f"{dtype}.bin")
        line = one_line_error(capsys, "train", "--data", tmp_path / f"{dtype}.bin", *TINY,
                              "--out", tmp_path / "r")
        assert f"looks like {dtype} token ids" in line and f"np.{dtype}" in line, line
    ids.astype(np.uint16).tofile(tmp_path / "ok.bin")
    assert load_tokens(tmp_path / "ok.bin").tolist() == ids.tolist()


def test_a_tiny_input_is_reported_in_bytes(tmp_path, capsys):
    (tmp_path / "hi.txt").write_text("Hello there\n")
    assert main(["prepare", "--data", str(tmp_path / "hi.txt"), "--out", str(tmp_path / "t.bin"),
                 "--no-progress"]) == 0
    assert "tokens from 12 B in 1 file(s)" in capsys.readouterr().out


def test_default_threads_follow_the_cpus_this_process_may_use(tmp_path, tokenizer, monkeypatch):
    import os

    import diygpt.prepare as prepare

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert prepare._usable_cpus() == 3


def test_many_small_files_are_joined_into_few_tasks_with_the_same_ids(tmp_path, tokenizer):
    from diygpt.prepare import _blocks, _merged

    for i in range(60):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"Document {i} says hello.\n" * (i % 3 + 1))
    files = sorted(tmp_path.glob("*.txt"))
    assert len(list(_merged(_blocks(files, 1 << 20), 1 << 20))) == 1
    assert len(list(_merged(_blocks(files, 64), 64))) > 20  # up to 64 characters each
    out = tmp_path / "t.bin"
    prepare_tokens(tmp_path, out, tokenizer, threads=2, progress=False)
    assert load_tokens(out).tolist() == load_training_data([tmp_path], tokenizer, 1.0).train_ids.tolist()


def test_text_of_one_id_and_then_exclamation_marks_is_not_taken_for_int32(tmp_path, tokenizer):
    # "Go!" repeated is [5247, 0, 5247, 0, ...]: zeros at every odd place, as int32 ids have
    (tmp_path / "yell.txt").write_text("Go!" * 3000)
    prepare_tokens(tmp_path / "yell.txt", tmp_path / "yell.bin", tokenizer, progress=False)
    assert load_tokens(tmp_path / "yell.bin").tolist() == tokenizer.encode("Go!" * 3000)


def test_text_in_flight_is_capped_however_many_threads(tmp_path):
    from diygpt.prepare import MAX_BATCH_BYTES, batch_blocks

    mib = 1 << 20
    assert batch_blocks(1, mib) == 4 and batch_blocks(8, mib) == 32
    # 63 threads (a 64-core machine) read 64 MiB ahead, not 252 MiB
    assert batch_blocks(63, mib) * mib == MAX_BATCH_BYTES == 64 * mib
    assert batch_blocks(200, mib) == 200  # a block a thread at least: none left idle


@pytest.mark.parametrize(("files", "quota"), [
    ({"cpu.max": "max 100000\n"}, None), ({"cpu.max": "150000 100000\n"}, 2),
    ({"cpu.max": "50000 100000\n"}, 1), ({"cpu.max": "junk"}, None),
    # cgroup v1: -1 is unlimited
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
])
def test_a_container_cpu_quota_lowers_the_default_threads(tmp_path, monkeypatch, files, quota):
    import os

    import diygpt.prepare as prepare

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert prepare._cgroup_cpu_quota(tmp_path) == quota
    assert prepare._cgroup_cpu_quota(tmp_path / "none") is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(prepare, "_cgroup_cpu_quota", lambda: quota)
    assert prepare._usable_cpus() == (quota or 64)


def test_data_given_twice_as_a_flag_reads_both(tmp_path, tokenizer, capsys):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("Hello world.\n")
    b.write_text("Every effort.\n")
    out = tmp_path / "ab.bin"
    # argparse's nargs="+" alone kept only the last --data's files
    assert main(["prepare", "--data", str(a), "--data", str(b), "--out", str(out),
                 "--no-progress"]) == 0
    want = tokenizer.encode("Hello world.\n<|endoftext|>Every effort.\n",
                            allowed_special={"<|endoftext|>"})
    assert load_tokens(out).tolist() == want
    capsys.readouterr()


def test_prepare_and_help_start_without_torch():
    # torch is ~190 MB of RSS and 1.5 s of start-up that tokenizing never uses
    import subprocess
    import sys

    code = ("import sys; from diygpt.cli.main import build_parser; build_parser(); "
            "import diygpt.prepare, diygpt.cli.prepare; from diygpt import read_text; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"
